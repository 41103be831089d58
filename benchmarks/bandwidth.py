"""Memory bandwidth and the weight bytes one decode step reads, for `sidebyside.py --bandwidth`.

The fraction of the bandwidth ceiling an engine reaches is (weight bytes read per token x decode
tok/s) / the best read bandwidth numpy measures on the same machine in the same run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

ENGINES = ("edge", "genai", "llamacpp")


def memory_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> dict:
    """GB/s (1e9) of numpy over a mib-MiB float64 array split across `threads` threads (numpy releases
    the GIL in these loops): read = one pass over it (a sum, and a dot with itself: the faster one is
    the read ceiling), copy = read + write of it (STREAM's convention, write-allocate not counted).
    Best of reps."""
    from concurrent.futures import ThreadPoolExecutor

    n = mib * 2**20 // 8
    a, b = np.ones(n), np.zeros(n)
    parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    kernels = {"read_sum": (lambda s: a[s].sum(), 1), "read_dot": (lambda s: a[s].dot(a[s]), 1),
               "copy": (lambda s: np.copyto(b[s], a[s]), 2)}
    out = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, (kernel, passes) in kernels.items():
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                list(pool.map(kernel, parts))
                best = min(best, time.perf_counter() - start)
            out[name] = round(passes * a.nbytes / best / 1e9, 2)
    out["read"] = max(out["read_sum"], out["read_dot"])
    return out


GATHERS = ("Gather", "GatherBlockQuantized")


def onnx_weight_bytes(path: Path) -> dict:
    """Bytes of the initializers one decode step reads: all of them, except tensors only an embedding
    lookup reads (it reads one row). By consumer op type: MatMulNBits, the embedding, the rest."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)
    users: dict = {}
    for node in m.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    packed = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4") if hasattr(onnx.TensorProto, t)}
    out = {"total": 0, "MatMulNBits": 0, "other": 0, "embedding_table_skipped": 0}
    for t in m.graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        size = count // 2 if t.data_type in packed else count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        ops = users.get(t.name, set())
        if ops and ops <= set(GATHERS):
            out["embedding_table_skipped"] += size
            continue
        out["total"] += size
        out["MatMulNBits" if "MatMulNBits" in ops else "other"] += size
    return out


def gguf_weight_bytes(path: Path) -> dict:
    """Bytes of the GGUF's tensors one decode step reads: all (a tied token_embd is the output matrix),
    except token_embd when a separate output.weight exists (then only its looked-up row is read)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    skip = tensors["token_embd.weight"] if "output.weight" in tensors else 0
    return {"total": sum(tensors.values()) - skip, "embedding_table_skipped": skip}


def weight_bytes(args, peers: dict) -> dict:
    edge = Path(args.model)
    manifest = json.loads((edge / "manifest.json").read_text())
    edge_onnx = edge / manifest["graph"]["file"]
    genai = Path(args.genai_model or peers["genai_model"])
    genai_cfg = json.loads((genai / "genai_config.json").read_text())
    return {"edge": onnx_weight_bytes(edge_onnx),
            "genai": onnx_weight_bytes(genai / genai_cfg["model"]["decoder"]["filename"]),
            "llamacpp": gguf_weight_bytes(Path(args.gguf or peers["gguf"]))}


def bandwidth_section(args, meta: dict, med: dict, lengths: list[int], label: dict[str, str]) -> list[str]:
    """The markdown section: the measured ceiling, and each engine's weight bytes per token against it."""
    bw = meta["bandwidth"]
    read = max(b["read"] for b in bw)
    copy = max(b["copy"] for b in bw)
    lines = ["", "## Fraction of the memory-bandwidth ceiling (decode)", "",
             f"Bandwidth measured in this run, once per round before the engines ({args.threads} threads, numpy over a "
             "512 MiB float64 array, best of 5; GB = 1e9 bytes): " + "; ".join(
                 f"round {i + 1}: read {b['read_sum']} (sum) / {b['read_dot']} (dot) GB/s, copy {b['copy']} GB/s "
                 f"(load {b['load']})" for i, b in enumerate(bw)) + f". Ceiling used: the best read, {read} GB/s "
             f"(copy, read + write: {copy} GB/s).", "",
             "Bytes per decoded token = the weight tensors one step reads, summed from each engine's model file "
             "(all weights; an embedding table only a lookup reads counts as one row: zero here; tied embeddings are "
             "read in full as the output matrix). The KV cache read per step is not counted (at 1024 tokens "
             f"edge-infer's is {meta['kv_mib'][lengths[-1]]:.0f} MiB allocated, of which the step reads the filled part).",
             "", "| prompt | engine | weight MB read per token | decode tok/s | GB/s of weights | fraction of read "
             "ceiling |", "|---:|---|---:|---:|---:|---:|"]
    for n in lengths:
        for e in ENGINES:
            mb = meta["weight_bytes"][e]["total"] / 1e6
            tok_s = med[(e, n)]["decode_tok_s"]
            lines.append(f"| {n} | {label[e]} | {mb:.0f} | {tok_s:.1f} | {mb * tok_s / 1e3:.2f} | "
                         f"{mb * tok_s / 1e3 / read:.0%} |")
    wb = meta["weight_bytes"]
    lines += ["", "Weight bytes by kind (MB): " + "; ".join(
        f"{label[e]} {wb[e]['total'] / 1e6:.0f}" + (f" (MatMulNBits {wb[e]['MatMulNBits'] / 1e6:.0f}, other "
                                                   f"{wb[e]['other'] / 1e6:.0f})" if "MatMulNBits" in wb[e] else "")
        + (f", embedding table not read {wb[e]['embedding_table_skipped'] / 1e6:.0f}"
           if wb[e]["embedding_table_skipped"] else "") for e in ("edge", "genai", "llamacpp")) + "."]
    return lines
