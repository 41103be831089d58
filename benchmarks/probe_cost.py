"""What the batch invariance probe costs at load: cold (an empty probe cache) and cached.

    .venv/bin/python benchmarks/probe_cost.py [MODEL ...] [--threads 2] [--repeats 3]

For each MODEL folder: reading the graph's kernel configurations and probing them with an empty
cache (what the first load of a shape class pays), then the same with the cache filled (every
later load). Then the same for the kernel shapes of two 1B-class models that are not exported
here (Qwen2.5-1.5B and Llama-3.2-1B geometry, int4 weights with an int8 lm_head, fp32 cache), as
synthetic configurations. Each number is the median of --repeats runs, in a fresh cache folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def nbits(K: int, N: int, bits: int = 4):
    from edge_infer.devices.invariance import KernelConfig

    return KernelConfig("MatMulNBits", (("K", K), ("N", N), ("bits", bits), ("block_size", 32), ("accuracy_level", 4),
                                        ("dtype", "float"), ("zero_points", "uint8" if bits == 4 else ""),
                                        ("g_idx", 0), ("bias", 0)))


def gqa(heads: int, kv_heads: int, head_dim: int):
    from edge_infer.devices.invariance import KernelConfig

    feeds = (("query", "dynamic"), ("key", ""), ("value", ""), ("cos_cache", f"float[{head_dim // 2}]"),
             ("sin_cache", f"float[{head_dim // 2}]"), ("position_ids", ""), ("attention_bias", ""), ("head_sink", ""),
             ("k_scale", ""), ("v_scale", ""), ("q_norm_weight", ""), ("k_norm_weight", ""),
             ("query_seqlens", "dynamic"))
    return KernelConfig("GroupQueryAttention", (
        ("do_rotary", 1), ("kv_num_heads", kv_heads), ("num_heads", heads), ("rotary_interleaved", 0),
        ("scale", head_dim ** -0.5), ("head_dim", head_dim), ("dtype", "float"), ("past_dtype", "float"),
        ("past_width", head_dim), ("feeds", feeds)))


SHAPES = {  # hidden, ffn, heads, kv heads, head dim, vocab
    "Qwen2.5-1.5B": (1536, 8960, 12, 2, 128, 151936),
    "Llama-3.2-1B": (2048, 8192, 32, 8, 64, 128256),
}


def synthetic(hidden: int, ffn: int, heads: int, kv: int, hd: int, vocab: int) -> list:
    return [nbits(hidden, (heads + 2 * kv) * hd), nbits(heads * hd, hidden), nbits(hidden, 2 * ffn),
            nbits(ffn, hidden), nbits(hidden, vocab, bits=8), gqa(heads, kv, hd)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import onnx

    from edge_infer.bench.measure import cpu_model
    from edge_infer.devices import cpu_session_options
    from edge_infer.devices.invariance import kernel_configs
    from edge_infer.devices.probe_cache import probe_graph

    def options():
        o = cpu_session_options(args.threads)
        o.log_severity_level = 3
        return o

    def timed(configs_of) -> tuple[float, float, list]:
        cold, warm, first = [], [], []
        for _ in range(args.repeats):
            root = Path(tempfile.mkdtemp(prefix="probe-cost-"))
            for times in (cold, warm):
                start = time.perf_counter()
                results = probe_graph(configs_of(), options, ["CPUExecutionProvider"], args.threads, root)
                times.append(time.perf_counter() - start)
                first = first or results  # the cold run's, with each probe's time
        return float(np.median(cold)) * 1e3, float(np.median(warm)) * 1e3, first

    print(f"CPU: {cpu_model()}, {args.threads} threads, median of {args.repeats}\n")
    print("| graph | configurations | cold ms | cached ms | slowest probe |")
    print("|---|---:|---:|---:|---|")
    cases = [(m, lambda m=m: kernel_configs(onnx.load(str(Path(m) / "model.onnx"), load_external_data=False)))
             for m in args.models]
    cases += [(f"{name} shapes (synthetic)", lambda s=s: synthetic(*s)) for name, s in SHAPES.items()]
    for name, configs_of in cases:
        cold, warm, results = timed(configs_of)
        slow = max(results, key=lambda r: r.seconds)
        print(f"| {name} | {len(results)} | {cold:.0f} | {warm:.1f} | {slow.config.describe()} {slow.seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
