"""Driving fixed-shape graphs: the plan of a model exported with `--profile npu`.

The manifest's `graph.static_plan` names two graphs over one weights file: a prefill
graph that takes `chunk` tokens and a decode graph that takes 1 (export/npu_graph.py).
Both read the whole KV cache, (1, kv_heads, max_length, head_dim) per layer, and return
only the new tokens' keys and values, which this module writes into the cache at its
offset. A prompt runs in chunks; a short chunk is left-padded (mask 0 in the padding
slots), so the last real token is always the graph's last position, the only one with
logits.

On the CPU provider everything is bound once through IOBinding: the cache arrays as
`past`, preallocated arrays as `present` and `logits`; a pass copies only the new
positions (S * kv_heads * head_dim values per layer). Accelerator providers copy the
bound CPU arrays into their own memory each pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edge_infer.devices import DevicePlan, ModelTraits, available_providers, cpu_session_options, resolve
from edge_infer.devices.accelerators import did_not_start, session_for, strict_plan
from edge_infer.devices.contention import CpuSample
from edge_infer.runtime.cache import KVCache
from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.contract.graph_record import GraphHeader
from edge_infer.runtime.manifest import Manifest
from edge_infer.runtime.model import STATIC_UNPADDED, Model, check_external_data
from edge_infer.devices import padding as padding_modes
from edge_infer.contract.io_names import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past, present


@dataclass(frozen=True)
class StaticGraph:
    file: str
    sequence_length: int


@dataclass(frozen=True)
class StaticPlan:
    """What `graph.static_plan` in the manifest says."""

    max_length: int
    prefill: StaticGraph
    decode: StaticGraph

    @classmethod
    def from_manifest(cls, m: Manifest) -> StaticPlan:
        try:
            raw: Any = m.graph.static_plan
            plan = cls(int(raw["max_length"]), StaticGraph(str(raw["prefill"]["file"]), int(raw["prefill"]["sequence_length"])),
                       StaticGraph(str(raw["decode"]["file"]), int(raw["decode"]["sequence_length"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{m.folder / 'manifest.json'}: malformed graph.static_plan ({e}); re-export") from None
        for g in (plan.prefill, plan.decode):
            if g.file not in m.files:
                raise ModelFileError(f"{m.folder / 'manifest.json'}: '{g.file}' is referenced but not listed in files")
        if plan.decode.sequence_length != 1 or plan.max_length != m.geometry.max_length:
            raise ModelFileError(f"{m.folder / 'manifest.json'}: graph.static_plan does not match the model geometry")
        return plan


class _Pass:
    """One graph's session with its preallocated present/logits outputs, bound per cache."""

    def __init__(self, session, g: StaticGraph, manifest: Manifest):
        self.session, self.S = session, g.sequence_length
        geo = manifest.geometry
        shape = (1, geo.num_kv_heads, self.S, geo.head_dim)  # (1, kv_heads, S, head_dim)
        self.present_k = [np.zeros(shape, np.float32) for _ in range(geo.num_layers)]
        self.present_v = [np.zeros(shape, np.float32) for _ in range(geo.num_layers)]
        self.logits = np.zeros((1, 1, geo.vocab_size), np.float32)  # (1, 1, vocab)

    def binding(self, cache: KVCache):
        from edge_infer.devices.ort import ort

        def make():
            b = self.session.io_binding()
            b.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))
            for i in range(len(self.present_k)):
                b.bind_ortvalue_input(past(i, "key"), cache.key_values[i])
                b.bind_ortvalue_input(past(i, "value"), cache.value_values[i])
                b.bind_ortvalue_output(present(i, "key"), ort.OrtValue.ortvalue_from_numpy(self.present_k[i]))
                b.bind_ortvalue_output(present(i, "value"), ort.OrtValue.ortvalue_from_numpy(self.present_v[i]))
            return b

        return cache.binding(self.session, make)


CONTEXT_DIR = "epcontext"  # compiled accelerator contexts, beside the graphs (not in the manifest's files)


def context_dir(folder: Path) -> Path | None:
    """Where compiled contexts of this model folder go; None when the folder is read-only."""
    import os

    path = folder / CONTEXT_DIR
    return path if os.access(folder, os.W_OK) else None


class StaticModel(Model):
    """A Model whose manifest describes a static plan (prefill-chunk graph + decode graph)."""

    def __init__(self, manifest: Manifest, device: str = "auto", threads: int | None = None,
                 allow_spinning: bool | None = True, shared_threads: bool = False, strict: bool = True,
                 padding: str | None = None, load_started: CpuSample | None = None):
        self.strict = strict
        super().__init__(manifest, device, threads, allow_spinning, shared_threads, padding, load_started)

    @property
    def respinnable(self) -> bool:
        return False  # two sessions (prefill chunk, decode) on an accelerator's static plan: nothing to respin

    def _open(self, device: str, threads: int | None, allow_spinning: bool, shared_threads: bool, asked: str) -> None:
        """Open the prefill-chunk and decode graphs' sessions on the device (both strict by default)."""
        manifest, strict = self.manifest, self.strict
        # its prefill-chunk and decode graphs are different graphs: no padding makes them agree bitwise
        self.padding = padding_modes.unpadded(STATIC_UNPADDED, asked)
        self.pad_ids = self.ragged_rows = False
        self.static = StaticPlan.from_manifest(manifest)
        self.header, self.headers_skipped = GraphHeader(self.static.decode.file), list[str]()
        traits = ModelTraits(dtype=manifest.dtype, contrib_ops=False, static_shapes=True)
        self.plan: DevicePlan = strict_plan(resolve(device, available_providers(), traits)) if strict else \
            resolve(device, available_providers(), traits)
        sessions = [self._session(g, threads, allow_spinning, shared_threads) for g in (self.static.prefill,
                                                                                       self.static.decode)]
        self.session = sessions[1]
        self.providers = self.session.get_providers()
        self._prefill = _Pass(sessions[0], self.static.prefill, manifest)
        self._decode = _Pass(sessions[1], self.static.decode, manifest)

    def _session(self, g: StaticGraph, threads: int | None, allow_spinning: bool, shared_threads: bool):
        manifest, strict = self.manifest, self.strict
        path = manifest.folder / g.file
        check_external_data(path)
        options = cpu_session_options(threads, allow_spinning=allow_spinning, shared=shared_threads)
        options.log_severity_level = 3
        self.shared_threads = not options.use_per_session_threads
        try:
            return session_for(str(path), self.plan, options, strict, cache_dir=context_dir(manifest.folder),
                               graph_sha256=str(manifest.files[g.file]["sha256"]))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            not_started = did_not_start(self.plan)  # the provider, not the graph's nodes
            if not_started is not None:
                raise not_started from None
            hint = ""
            if "fallback to CPU EP has been explicitly disabled" in first:
                hint = (f"; {self.plan.device} cannot run some nodes (onnxruntime's log names them) and the CPU "
                        "fallback is off so that nothing runs on the CPU unseen")
                if self.plan.device == "qnn" and manifest.quant_scheme != "fp32":
                    hint += "; QNN's HTP runs no weight-only DequantizeLinear: export with --quant fp32 for QNN"
            raise ModelFileError(f"{path}: onnxruntime could not load it on {self.plan.device} ({first}){hint}") \
                from None

    def new_cache(self, batch: int = 1, max_length: int | None = None) -> KVCache:
        if batch != 1:
            raise UserError("a model exported with --profile npu runs one sequence at a time (batch 1)")
        if max_length is not None and not 0 < max_length <= self.static.max_length:
            raise UserError(f"a model exported with --profile npu has a fixed cache of {self.static.max_length} "
                            f"positions; re-export with --max-length {max_length} for a longer one")
        cache = KVCache(self.manifest, 1)  # the graphs read all max_length positions, whatever the limit
        if max_length is not None:
            cache.max_length = max_length  # a shorter limit on the same buffers: the context checks read it
        return cache

    def _pass_rows(self, feeds: list, cache: KVCache, keep: int | None, pad: bool | None) -> list[np.ndarray]:
        """Model.forward_rows' pass (batch 1 here): the logits of the last min(keep, n) fed ids, (k, vocab);
        forward_rows then advances the cache. A prompt runs in prefill chunks; several kept logits
        (speculative verification) come from one decode pass per kept id."""
        if len(feeds) != 1 or cache.batch != 1:
            raise UserError("a model exported with --profile npu runs one sequence at a time (batch 1)")
        row = [int(t) for t in feeds[0]]
        seq = len(row)
        off = cache.offset
        cache.check_fits(np.array([off + seq]))
        keep = max(1, min(seq if keep is None else keep, seq))
        head, tail = row[:seq - keep + 1], row[seq - keep + 1:]
        out = [self._chunked(head, cache, off)]
        off += len(head)
        for token in tail:
            out.append(self._pass(self._decode, [token], cache, off))
            off += 1
        return [np.concatenate(out, axis=1)[0]]  # (keep, vocab)

    def decode_batch(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        raise UserError("a model exported with --profile npu runs one sequence at a time (batch 1)")

    def _chunked(self, ids: list[int], cache: KVCache, off: int) -> np.ndarray:
        C = self._prefill.S
        assert ids, "a pass needs at least one id"
        logits = np.empty(0)
        for start in range(0, len(ids), C):
            piece = ids[start:start + C]
            logits = self._pass(self._decode if len(piece) == 1 else self._prefill, piece, cache, off + start)
        return logits  # (1, 1, vocab)

    def _pass(self, p: _Pass, piece: list[int], cache: KVCache, off: int) -> np.ndarray:
        """One run of a graph over `piece` (n <= S tokens, left-padded) after `off` positions; writes the
        new keys and values into the cache (its length is the caller's to move)."""
        n, S, P = len(piece), p.S, self.static.max_length
        ids = np.zeros((1, S), np.int64)  # (1, S), padding first
        ids[0, S - n:] = piece
        mask = np.zeros((1, P + S), np.int64)  # (1, P + S): [cache | new]
        mask[0, :off] = 1
        mask[0, P + S - n:] = 1
        positions = np.zeros((1, S), np.int64)  # (1, S)
        positions[0, S - n:] = np.arange(off, off + n)
        b = p.binding(cache)
        b.bind_cpu_input(INPUT_IDS, ids)
        b.bind_cpu_input(ATTENTION_MASK, mask)
        b.bind_cpu_input(POSITION_IDS, positions)
        p.session.run_with_iobinding(b)
        for i in range(len(p.present_k)):  # the new positions into the cache: (1, kv_heads, n, head_dim)
            cache.keys[i][:, :, off:off + n] = p.present_k[i][:, :, S - n:]
            cache.values[i][:, :, off:off + n] = p.present_v[i][:, :, S - n:]
        return p.logits.copy()
