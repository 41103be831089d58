"""The manifest's schema: every field's type and range, and the cross-checks between them.

`manifest.json` is a file that comes from outside like any other: a hand edit,
a bad merge or a hostile folder must give one line naming the field, never an
onnxruntime error, a 698 TiB allocation or a silently wrong default. `check_raw`
runs on the parsed JSON before any record is built or anything is allocated;
`check_graph_io` holds the manifest against the loaded graph's own inputs and
shapes; `check_kv_memory` holds the KV cache a manifest asks for against the
memory this machine has available.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn

from edge_infer.contract.embedding import TASK_EMBED, EmbeddingRecord
from edge_infer.contract.errors import ModelFileError
from edge_infer.contract.io_names import (ATTENTION_INPUTS, INPUT_IDS, KV_KINDS, LAST_HIDDEN_STATE, LOGITS, PAST_PREFIX,
                                          PRESENT_PREFIX, past, present)

MAX_LAYERS = 1024
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_HIDDEN = 1 << 17
MAX_VOCAB = 1 << 22
MAX_LENGTH = 1 << 24
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("fp32", "fp16")
_KV_LAYOUTS = ("shared", "concat", "static")  # static: the npu profile (runtime/static_plan.py)
_KV_CACHE_DTYPES = ("int8", "int4")  # kv_cache.dtype; absent: the graph's float dtype
# What onnxruntime reports for the past_key_values inputs of each cache dtype.
KV_ONNX_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "int8": "tensor(int8)", "int4": "tensor(uint8)"}


class SchemaError(ModelFileError):
    """One manifest field is missing, of the wrong type, out of range or inconsistent."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Section:
    """Typed reads of one JSON object of the manifest, each naming `section.key` when it fails."""

    def __init__(self, path: Path, raw: dict, name: str):
        self.path, self.name = path, name
        value = raw.get(name)
        if not isinstance(value, dict):
            self.fail(name, f"is {_show(value)}, expected an object")
        self.d: dict = value

    def fail(self, key: str, problem: str) -> NoReturn:
        raise SchemaError(f"{self.path}: {key} {problem}; re-export the model")

    def integer(self, key: str, low: int, high: int) -> int:
        v: Any = self.d.get(key)
        if not _is_int(v) or not low <= v <= high:
            self.fail(f"{self.name}.{key}", f"is {_show(v)}, expected an integer from {low} to {high}")
        return v

    def optional_integer(self, key: str, low: int, high: int) -> int | None:
        return None if self.d.get(key) is None else self.integer(key, low, high)

    def text(self, key: str, optional: bool = False, choices: tuple[str, ...] = ()) -> str | None:
        v = self.d.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v or (choices and v not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            self.fail(f"{self.name}.{key}", f"is {_show(v)}, expected {want}")
        return v

    def str_list(self, key: str) -> list[str]:
        v = self.d.get(key)
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(set(v)) != len(v):
            self.fail(f"{self.name}.{key}", "must be a list of distinct non-empty strings")
        return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_raw(path: Path, raw: dict) -> None:
    """Every field the runtime reads, typed and in range, and consistent with the others."""
    m = _Section(path, raw, "model")
    m.text("architecture")
    layers = m.integer("num_layers", 1, MAX_LAYERS)
    heads = m.integer("num_heads", 1, MAX_HEADS)
    kv_heads = m.integer("num_kv_heads", 1, MAX_HEADS)
    m.integer("head_dim", 1, MAX_HEAD_DIM)
    m.integer("hidden_size", 1, MAX_HIDDEN)
    vocab = m.integer("vocab_size", 1, MAX_VOCAB)
    m.integer("max_length", 2, MAX_LENGTH)
    m.integer("context_length", 1, MAX_LENGTH)
    m.optional_integer("sliding_window", 1, MAX_LENGTH)
    m.optional_integer("intermediate_size", 1, 1 << 20)
    if heads % kv_heads:
        m.fail("model.num_heads", f"{heads} is not a multiple of model.num_kv_heads {kv_heads}")

    g = _Section(path, raw, "graph")
    g.text("file")
    g.text("dtype", choices=_DTYPES)
    g.text("kv_layout", optional=True, choices=_KV_LAYOUTS)
    inputs, outputs = g.str_list("inputs"), g.str_list("outputs")
    if raw.get("task") == TASK_EMBED:  # an embedding graph: last_hidden_state out, KV inputs only on decoders
        _check_embedding(path, raw, g, inputs, outputs)
    for kind, names, template, prefix in (("inputs", inputs, past, PAST_PREFIX),
                                          ("outputs", outputs, present, PRESENT_PREFIX)):
        want = {template(i, kv) for i in range(layers) for kv in KV_KINDS}
        have = {n for n in names if n.startswith(prefix)}
        if have != want and not (raw.get("task") == TASK_EMBED and not have):
            g.fail(f"graph.{kind}", f"has {len(have) // 2} layers of {prefix}*, but model.num_layers is {layers}")
    if INPUT_IDS not in inputs or (LOGITS not in outputs and raw.get("task") != TASK_EMBED):
        g.fail("graph", f"must have an {INPUT_IDS} input and a {LOGITS} output")
    _check_headers(g, g.d.get("headers"))
    if g.d.get("kv_layout") == "static":  # two fixed-shape graphs: what the runtime allocates comes from here
        plan: Any = g.d.get("static_plan")
        ok = isinstance(plan, dict) and _is_int(plan.get("max_length")) and plan["max_length"] == m.d.get("max_length")
        for part in ("prefill", "decode"):
            step = plan.get(part) if isinstance(plan, dict) else None
            ok = ok and isinstance(step, dict) and isinstance(step.get("file"), str) and _is_int(
                step.get("sequence_length")) and 1 <= step["sequence_length"] <= plan["max_length"]
        if not ok:
            g.fail("graph.static_plan", f"is {_show(plan)}, expected {{max_length: model.max_length, prefill: "
                   "{file, sequence_length}, decode: {file, sequence_length}}")

    _check_tokenizer(path, raw, vocab)
    _check_files(path, raw)

    if "kv_cache" in raw:
        kv = _Section(path, raw, "kv_cache")
        kv.text("dtype", choices=_KV_CACHE_DTYPES)
        if g.d.get("kv_layout", "shared") != "shared":
            kv.fail("kv_cache.dtype", f"needs graph.kv_layout 'shared', not {_show(g.d.get('kv_layout'))}")
        if kv.d["dtype"] == "int4" and m.d["head_dim"] % 2:
            kv.fail("kv_cache.dtype", f"int4 needs an even model.head_dim, not {m.d['head_dim']}")
    for name in ("quantization", "generation", "source", "validation"):
        if name in raw:
            _Section(path, raw, name)
    if "quantization" in raw:
        q = _Section(path, raw, "quantization")
        q.optional_integer("bits", 2, 8)
        q.optional_integer("block_size", 1, 4096)
        q.text("scheme", optional=True)
    if "generation" in raw:
        gen = _Section(path, raw, "generation")
        gen.optional_integer("max_new_tokens", 1, MAX_LENGTH)
        defaults = gen.d.get("source_defaults")
        if defaults is not None:
            _check_source_defaults(gen, defaults)


def _check_tokenizer(path: Path, raw: dict, vocab: int) -> None:
    t = _Section(path, raw, "tokenizer")
    t.text("file")
    t.text("chat_template_file", optional=True)
    t.text("chat_template_origin", optional=True)  # "model", "built-in NAME" or "file NAME"
    for key in ("bos_token_id", "pad_token_id"):
        t.optional_integer(key, 0, vocab - 1)
    eos = t.d.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(_is_int(i) and 0 <= i < vocab for i in eos):
        t.fail("tokenizer.eos_token_ids", f"is {_show(eos)}, expected a list of token ids in [0, {vocab})")
    for key in ("bos_token", "eos_token"):
        if t.d.get(key) is not None and not isinstance(t.d[key], str):
            t.fail(f"tokenizer.{key}", f"is {_show(t.d[key])}, expected a string or null")


def _check_files(path: Path, raw: dict) -> None:
    files = _Section(path, raw, "files")
    for name, entry in files.d.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.fullmatch(entry["sha256"]) or not _is_int(entry.get("size")) or entry["size"] < 0:
            files.fail(f"files['{name}']", f"is {_show(entry)}, expected {{\"sha256\": 64 hex digits, "
                       "\"size\": bytes}")


def _check_embedding(path: Path, raw: dict, g: _Section, inputs: list[str], outputs: list[str]) -> None:
    """An embedding folder (manifest task "embed"): its record readable, its graph ending in last_hidden_state."""
    if raw.get("task") != TASK_EMBED:
        g.fail("task", f"is {_show(raw.get('task'))}, expected {TASK_EMBED!r} or absent")
    try:
        EmbeddingRecord.from_manifest(raw.get("embedding"))
    except ModelFileError as e:
        raise SchemaError(f"{path}: {e}") from None
    if LAST_HIDDEN_STATE not in outputs or INPUT_IDS not in inputs:
        g.fail("graph", f"of an embedding model must have an {INPUT_IDS} input and a {LAST_HIDDEN_STATE} output")


def _check_headers(g: _Section, headers: Any) -> None:
    """graph.headers: the graph headers over the weights, best first (export/graph_headers.py)."""
    if headers is None:
        return
    ok = isinstance(headers, list) and bool(headers) and all(
        isinstance(h, dict) and isinstance(h.get("file"), str) and isinstance(h.get("needs", []), list)
        and all(n in ATTENTION_INPUTS for n in h.get("needs", [])) for h in headers)
    if not ok:
        g.fail("graph.headers", f"is {_show(headers)}, expected a list of {{file, needs: [GroupQueryAttention "
               "input names]}}")


def _check_source_defaults(gen: _Section, defaults: Any) -> None:
    """The source model's own sampling defaults (generation_config.json), as far as we would read them."""
    where = "generation.source_defaults"
    if not isinstance(defaults, dict):
        gen.fail(where, f"is {_show(defaults)}, expected an object")
    numbers = ("temperature", "top_p", "min_p", "repetition_penalty")
    for key in numbers:
        v = defaults.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 0):
            gen.fail(f"{where}.{key}", f"is {_show(v)}, expected a non-negative number")
    for key in ("top_k", "max_new_tokens", "max_length"):
        v = defaults.get(key)
        if v is not None and not (_is_int(v) and v >= 0):
            gen.fail(f"{where}.{key}", f"is {_show(v)}, expected a non-negative integer")
    if defaults.get("do_sample") is not None and not isinstance(defaults["do_sample"], bool):
        gen.fail(f"{where}.do_sample", f"is {_show(defaults['do_sample'])}, expected true or false")


def check_graph_io(graph_path: Path, geometry, inputs, outputs, kv_dtype: str = "fp32") -> None:
    """The graph's own inputs and outputs against the manifest: names, and the KV shapes
    (batch, num_kv_heads, sequence, head_dim) where the graph fixes them."""
    have_in = {i.name: i.shape for i in inputs}
    have_type = {i.name: i.type for i in inputs}
    stored = geometry.head_dim // 2 if kv_dtype == "int4" else geometry.head_dim  # int4: two values per byte
    have_out = {o.name for o in outputs}
    past_names = sorted(n for n in have_in if n.startswith(PAST_PREFIX))
    if len(past_names) != 2 * geometry.num_layers:
        raise SchemaError(f"{graph_path}: the graph has {len(past_names) // 2} layers of past_key_values, but the "
                          f"manifest says model.num_layers {geometry.num_layers}; re-export the model")
    for name in (past(i, kv) for i in range(geometry.num_layers) for kv in KV_KINDS):
        shape = have_in.get(name)
        if shape is None:
            raise SchemaError(f"{graph_path}: the graph has no input {name}; re-export the model")
        want = [None, geometry.num_kv_heads, None, stored]
        if len(shape) != 4 or any(isinstance(s, int) and w is not None and s != w for s, w in zip(shape, want)):
            raise SchemaError(f"{graph_path}: input {name} has shape {shape}, but the manifest says "
                              f"(batch, {geometry.num_kv_heads}, sequence, {stored}); re-export the model")
        if have_type.get(name) != KV_ONNX_TYPES[kv_dtype]:
            raise SchemaError(f"{graph_path}: input {name} is {have_type.get(name)}, but the manifest says a "
                              f"{kv_dtype} KV cache ({KV_ONNX_TYPES[kv_dtype]}); re-export the model")
    if LOGITS not in have_out:
        raise SchemaError(f"{graph_path}: the graph has no {LOGITS} output; re-export the model")


def available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, lowered by a cgroup v2 limit; None if unknown."""
    best = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                best = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if best is None:
        try:
            best = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            best = min(best, int(limit) - used)
    except (OSError, ValueError):
        pass
    return best


def check_kv_memory(where: Path, kv_bytes: int, what: str) -> None:
    """Refuse a KV cache larger than the memory available, before allocating it."""
    avail = available_memory()
    if avail is not None and kv_bytes > avail:
        raise ModelFileError(f"{where}: {what} needs {_size(kv_bytes)} of KV cache, but this machine has "
                             f"{_size(avail)} available; use a smaller max_length (export --max-length or "
                             "serve --max-length) or fewer parallel slots")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
