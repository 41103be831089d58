"""Validation at export, stored in the manifest.

fp32: the exported graph against the source model in transformers (when the
`export` extra is installed), max |logit difference| over every position of a
few prompts, for models up to TRANSFORMERS_MAX_PARAMS (transformers holds the whole
model in fp32). int8/int4: against the fp32 graph of the same weights, top-1 agreement
and mean KL divergence over every position; that graph is run segment by segment
(export/segments.py), so memory stays bounded at any model size.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import onnx
from edge_infer.devices.ort import ort

from edge_infer.export.progress import Progress
from edge_infer.runtime.sampling import kl_divergence
from edge_infer.export.segments import StoredGraph, cpu_session, run_segmented
from edge_infer.export.sources import Source
from edge_infer.export.spec import DecoderSpec
from edge_infer.contract.model_folder import GRAPH_FILE
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PAD_ATTENTION, POSITION_IDS,
                                          QUERY_SEQLENS, past_pair)

REFERENCE_SEGMENT_BYTES = 256 << 20
# fp32/fp16 exports are compared with transformers (which loads the whole model in fp32) up to this size.
TRANSFORMERS_MAX_PARAMS = 300_000_000
PROMPTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower, museums and cafes.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes it boils at lower temperatures "
    "because the air pressure is lower.",
)


def all_logits(session: ort.InferenceSession, spec: DecoderSpec, ids: list[int], dtype=np.float32) -> np.ndarray:
    """Logits for every position of one prompt, (sequence_length, vocab), without a cache."""
    n = len(ids)
    names = {i.name for i in session.get_inputs()}
    feed = prompt_feed(spec, ids, dtype)
    return session.run([LOGITS], {k: v for k, v in feed.items() if k in names})[0][0][-n:]


def prompt_feed(spec: DecoderSpec, ids: list[int], dtype=np.float32, width: int | None = None) -> dict[str, np.ndarray]:
    """Every input of a cacheless pass over one prompt, asking for every position's logits (a graph
    without position_ids, logits_to_keep or query_seqlens ignores those). `dtype` and `width` (values
    stored per head and position, head_dim unless a 4-bit cache packs two per byte) are the cache's."""
    n = len(ids)
    feed = {INPUT_IDS: np.asarray([ids], dtype=np.int64), ATTENTION_MASK: np.ones((1, n), np.int64),
            LOGITS_TO_KEEP: np.array([n], dtype=np.int64), QUERY_SEQLENS: np.array([n], dtype=np.int64),
            PAD_ATTENTION: np.ones(1, dtype=np.int64),
            POSITION_IDS: np.arange(n, dtype=np.int64)[None, :]}
    empty = np.zeros((1, spec.num_kv_heads, 0, width or spec.head_dim), dtype=dtype)  # (1, kv_heads, 0, width)
    for i in range(spec.num_layers):
        for name in past_pair(i):
            feed[name] = empty
    return feed


def prompt_ids(source: Source, max_length: int) -> list[list[int]]:
    out = []
    for text in PROMPTS:
        ids = source.tokenizer.encode(text, add_special_tokens=False).ids
        if source.config.get("bos_token_id") is not None and source.kind == "hf":
            ids = [int(source.config["bos_token_id"])] + ids
        out.append([i for i in ids if i < source.config.get("vocab_size", 1 << 31)][: max_length])
    return [ids for ids in out if ids]


def validate_export(folder: Path, source: Source, spec: DecoderSpec,
                    reference: onnx.ModelProto | Path | StoredGraph | None,
                    max_length: int, progress: Progress) -> dict:
    """`reference`: the float graph of an int8/int4 export (a proto, the path of a graph whose
    weights are external data beside it, or a StoredGraph), or None to compare an fp32/fp16 export with transformers."""
    progress.stage("validating", unit="pass")
    prompts = prompt_ids(source, max_length)
    if reference is None:
        return _against_source(folder / GRAPH_FILE, source, spec, prompts, progress)
    return _against_reference(folder / GRAPH_FILE, reference, spec, prompts, progress)


def _against_source(graph: Path, source: Source, spec: DecoderSpec, prompts, progress: Progress) -> dict:
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError:
        msg = "skipped: transformers is not installed (pip install 'edge-infer[export]')"
        progress.note(f"source comparison {msg}")
        return {"source_comparison": msg}
    try:
        session = cpu_session(str(graph))
    except Exception as e:  # fp16 graphs may not run on the CPU provider
        msg = f"skipped: the graph does not run on the CPU provider here ({str(e).splitlines()[0][:200]})"
        progress.note(f"source comparison {msg}")
        return {"source_comparison": msg}
    import torch

    params = _parameter_count(graph)
    if params > TRANSFORMERS_MAX_PARAMS:
        msg = (f"skipped: the model has {params / 1e6:.0f}M parameters; transformers would hold all of them in "
               f"fp32 beside the graph's own session (the comparison runs up to {TRANSFORMERS_MAX_PARAMS / 1e6:.0f}M)."
               " Validate at that size on a smaller model of the same family, or export int8/int4, which is "
               "compared with the float graph segment by segment")
        progress.note(f"source comparison {msg}")
        return {"source_comparison": msg}
    if source.kind == "gguf":
        from edge_infer.export.gguf_arch import transformers_overrides

        overrides, why_not = transformers_overrides(source.config)
        if why_not:
            progress.note(f"source comparison skipped: {why_not}")
            return {"source_comparison": f"skipped: {why_not}"}
        from transformers import AutoConfig

        where = dict(pretrained_model_name_or_path=str(source.path.parent), gguf_file=source.path.name)
        config = AutoConfig.from_pretrained(**where)
        for key, value in overrides.items():  # set after the class's __init__: a field it lacks is kept aside
            setattr(config, key, value)
        hf = AutoModelForCausalLM.from_pretrained(**where, config=config, torch_dtype=torch.float32,
                                                  attn_implementation="eager")  # sdpa drops Gemma's soft-cap
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(source.path), torch_dtype=torch.float32,
                                                  attn_implementation="eager")
    hf.eval()
    worst, greedy_same = 0.0, 0
    total = 0
    bar = progress.bar("validating", len(prompts))
    for ids in prompts:
        ours = all_logits(session, spec, ids, np.float16 if spec and is_fp16(session) else np.float32)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().numpy()
        worst = max(worst, float(np.abs(ours.astype(np.float32) - ref).max()))
        greedy_same += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        bar.advance()
    progress.note(f"fp32 vs transformers: max |logit diff| {worst:.2e} over {total} positions, "
                  f"argmax agreement {greedy_same}/{total}")
    return {"source_comparison": "transformers", "max_abs_logit_diff": worst, "positions": total,
            "argmax_agreement": greedy_same / total}


def is_fp16(session: ort.InferenceSession) -> bool:
    return any("float16" in i.type for i in session.get_inputs())


def compare_graphs(graph: Path, reference: onnx.ModelProto | Path, spec, tokenizer, max_length: int,
                   progress: Progress) -> dict:
    """Top-1 agreement and KL of `graph` against `reference` on the validation prompts.
    `spec` needs num_layers, num_kv_heads, head_dim and vocab_size (a DecoderSpec or a manifest Geometry)."""
    prompts = [[i for i in tokenizer.encode(t, add_special_tokens=False).ids if i < spec.vocab_size][:max_length]
               for t in PROMPTS]
    return _against_reference(graph, reference, spec, [p for p in prompts if p], progress)


def _against_reference(graph: Path, reference: onnx.ModelProto | Path | StoredGraph, spec: DecoderSpec, prompts,
                       progress: Progress) -> dict:
    # The quantized graph first, on its own: its session is freed before the reference runs.
    bar = progress.bar("validating", len(prompts) + 1)  # each prompt on the graph, then the reference run
    quant = cpu_session(str(graph))
    ours = []
    for ids in prompts:
        ours.append(all_logits(quant, spec, ids, np.float16 if is_fp16(quant) else np.float32))
        bar.advance()
    del quant
    release_freed_memory()
    with tempfile.TemporaryDirectory(prefix=".edge-infer-ref-", dir=graph.parent) as tmp:
        if isinstance(reference, onnx.ModelProto):
            # A proto in memory goes to a file beside the graph (removed below) with its weights as
            # external data. It consumes `reference`: its tensors now point at that file.
            path = Path(tmp) / "ref.onnx"
            onnx.save_model(reference, str(path), save_as_external_data=True, location="ref.onnx.data")
            reference = path
        stored = StoredGraph.load(reference) if isinstance(reference, (str, Path)) else reference
        ref, n_segments = _reference_logits(stored, spec, prompts)
        bar.advance()
        float_name = "fp16" if _float_dtype(stored.model) == np.float16 else "fp32"
    agree, total, kls = 0, 0, []
    for a, b, ids in zip(ref, ours, prompts):
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        kls.append(kl_divergence(a, b))
    kl = float(np.concatenate(kls).mean())
    progress.note(f"quantized vs {float_name}: top-1 agreement {agree}/{total} ({agree / total:.1%}), mean KL {kl:.4f} "
                  f"(fp32 reference run in {n_segments} segment(s) of <= {REFERENCE_SEGMENT_BYTES >> 20} MiB "
                  "of weights)")
    return {"reference": f"{float_name} export of the same weights", "top1_agreement": agree / total,
            "mean_kl": kl, "positions": total,
            "reference_run": f"whole graph, every position of {len(prompts)} prompts, run in {n_segments} "
                             f"segment(s) of <= {REFERENCE_SEGMENT_BYTES >> 20} MiB of weights each"}


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's malloc_trim):
    a freed onnxruntime session leaves about its weights' size (1 GB at 1.5B) in malloc's arenas,
    which would otherwise count in the process's RSS under everything that runs after it."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reference_logits(stored: StoredGraph, spec, prompts) -> tuple[list[np.ndarray], int]:
    """Every position's logits of the float graph, run segment by segment (bounded memory)."""
    feeds = []
    for ids in prompts:
        feeds.append(prompt_feed(spec, ids, _float_dtype(stored.model)))
    outs, n_segments = run_segmented(stored, feeds, [LOGITS], REFERENCE_SEGMENT_BYTES)
    return [o[0][0][-len(ids):] for o, ids in zip(outs, prompts)], n_segments


def _float_dtype(model: onnx.ModelProto) -> type[np.floating]:
    """The dtype of a float graph's KV cache inputs (fp16 in the gpu profile's float graph)."""
    kv = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    return np.float16 if kv and kv[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32


def _parameter_count(graph: Path) -> int:
    model = onnx.load(str(graph), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if len(t.dims) >= 2)
