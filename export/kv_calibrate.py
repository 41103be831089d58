"""`--kv-cache int8|int4`: calibrate the cache's scales on the exported graph, rewrite it, check it.

Runs after the weights are final (so the scales see the keys and values the shipped graph
writes): one pass of the float-cache graph over the calibration text (export/calibration.txt,
behind the chat template when the model has one) gives every layer's stored keys and values;
quantize/kv_cache.py turns them into per-channel scales and rewrites the graph header (the
weights file is untouched). Then both graphs score a held-out text, so the manifest records
what the quantized cache costs on text the scales never saw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge_infer.contract.io_names import LOGITS, present_pair
from edge_infer.devices.ort import ort
from edge_infer.export.progress import Progress
from edge_infer.export.rope import inv_freq
from edge_infer.export.sources import Source
from edge_infer.export.spec import DecoderSpec
from edge_infer.export.segments import cpu_session
from edge_infer.export.validate import is_fp16, prompt_feed
from edge_infer.quantize.kv_cache import HEADROOM, LayerRope, kv_scales, quantize_kv_graph

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
CALIBRATION_TOKENS = 1024  # the text's first tokens; the rest (up to CHECK_TOKENS) is held out
CHECK_TOKENS = 384
WARN_RATIO = 1.05  # a perplexity cost the export says out loud


def calibrate_kv_cache(folder: Path, graph_file: str, source: Source, spec: DecoderSpec, kind: str,
                       max_length: int, progress: Progress) -> dict[str, Any]:
    """Quantize the cache of `folder/graph_file` to `kind`; returns the manifest's kv_cache record."""
    # two passes over the text (held-out, calibration), then each layer's scales
    bar = progress.stage(f"calibrating the {kind} KV cache", total=2 + spec.num_layers, unit="step")
    calib, held_out = _token_ids(source, spec, max_length)
    path = folder / graph_file
    session = cpu_session(str(path))
    float_logits, presents = _run(session, spec, held_out, np.float16 if is_fp16(session) else np.float32)
    bar.advance()
    _, presents = _run(session, spec, calib, presents[0].dtype)
    bar.advance()
    del session
    scales = []
    for i in range(spec.num_layers):
        keys, values = presents[2 * i][0], presents[2 * i + 1][0]  # (kv_heads, n, head_dim)
        scales.append(kv_scales(keys, values, _layer_rope(spec, i, max_length), kind))
        bar.advance()
    model = onnx.load(str(path), load_external_data=False)  # the header only: weights stay where they are
    quantize_kv_graph(model, scales, kind)
    onnx.save_model(model, str(path))
    del model

    progress.stage("checking the quantized KV cache on held-out text")
    session = cpu_session(str(path))
    cache_dtype = np.int8 if kind == "int8" else np.uint8
    quant_logits, _ = _run(session, spec, held_out, cache_dtype, packed=kind == "int4")
    check = _compare(float_logits, quant_logits, held_out)
    progress.note(f"KV cache {kind}: perplexity x{check['perplexity_ratio']:.4f} of the float cache, top-1 "
                  f"agreement {check['top1_agreement']:.3f} on {check['tokens']} held-out tokens")
    if check["perplexity_ratio"] > WARN_RATIO:
        progress.note(f"warning: the {kind} KV cache costs more than {WARN_RATIO - 1:.0%} perplexity on this "
                      "model; --kv-cache int8 (or float) keeps more of its quality")
    return {"dtype": kind, "bits": 8 if kind == "int8" else 4,
            "scales": "per (kv head, channel), calibrated; keys bounded over every rotary position up to "
                      "max_length", "headroom": HEADROOM[kind],
            "calibration": {"text": CALIBRATION_TEXT.name, "tokens": len(calib)}, "check": check}


def _token_ids(source: Source, spec: DecoderSpec, max_length: int) -> tuple[list[int], list[int]]:
    """(calibration ids, held-out ids): the text behind a chat turn when the model has a chat
    template (so the template's special tokens are calibrated too), split in two. The held-out part
    starts the way the calibration part (and a prompt) does: a sequence's first key is an outlier on
    many models, and one that no prompt starts with (Qwen2.5's GGUF declares <|endoftext|> as its BOS
    but never adds it) made the check read x0.857 of the float cache at 0.5B where prompts get x1.003."""
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    ids: list[int] = []
    if source.chat_template:
        from edge_infer.runtime.chat_template import ChatTemplate

        try:
            prefix = ChatTemplate(source.chat_template, source.bos_token or "", source.eos_token or "").render(
                [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Summarise these notes."}])
            ids = source.tokenizer.encode(prefix, add_special_tokens=False).ids
        except Exception:  # a template that needs more than plain messages: calibrate on the text alone
            ids = []
    if not ids and spec.bos_token_id is not None:
        ids = [int(spec.bos_token_id)]
    head = [i for i in ids if i < spec.vocab_size]  # how a sequence starts: the chat turn, or BOS
    body = [i for i in source.tokenizer.encode(text, add_special_tokens=False).ids if i < spec.vocab_size]
    n = min(CALIBRATION_TOKENS, max_length, len(head) + len(body) - 16)
    calib, rest = (head + body)[:n], (head + body)[n:]
    return calib, (head + rest)[: min(CHECK_TOKENS, max_length)]


def _layer_rope(spec: DecoderSpec, i: int, max_length: int) -> LayerRope | None:
    rope = spec.local_rope if spec.layer_type(i) == "sliding" and spec.local_rope is not None else spec.rope
    if rope is None:
        return None
    return LayerRope(inv_freq(rope, max_length), max_length)


def _run(session: ort.InferenceSession, spec: DecoderSpec, ids: list[int], cache_dtype,
         packed: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits at every position (n, vocab) and the present keys/values of one pass from an empty cache."""
    names = {i.name for i in session.get_inputs()}
    feed = prompt_feed(spec, ids, cache_dtype, spec.head_dim // 2 if packed else None)
    outputs = [LOGITS] + [name for i in range(spec.num_layers) for name in present_pair(i)]
    out = session.run(outputs, {k: v for k, v in feed.items() if k in names})
    return out[0][0], out[1:]


def _compare(reference: np.ndarray, quantized: np.ndarray, ids: list[int]) -> dict[str, Any]:
    """Perplexity ratio and top-1 agreement of the quantized cache's logits against the float cache's."""
    targets = np.asarray(ids[1:])
    ref, q = reference[:-1].astype(np.float64), quantized[:-1].astype(np.float64)

    def nll(x: np.ndarray) -> float:
        x = x - x.max(axis=-1, keepdims=True)
        lp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        return float(-lp[np.arange(len(targets)), targets].mean())

    ratio = math.exp(nll(q) - nll(ref))
    return {"tokens": len(targets), "perplexity_ratio": round(ratio, 5),
            "top1_agreement": round(float((ref.argmax(-1) == q.argmax(-1)).mean()), 4)}
