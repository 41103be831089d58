"""A loaded model: manifest, onnxruntime session on the chosen device, tokenizer, chat template.

`Model.forward` runs one pass (a prefill chunk or a decode step) over a KVCache
through IOBinding: the cache arrays are bound as both past and present, so the
graph writes new keys in place and nothing is copied per step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from edge_infer.devices.ort import ort

from edge_infer.devices import DevicePlan, ModelTraits, available_providers, cpu_session_options, resolve
from edge_infer.devices import padding as padding_modes
from edge_infer.devices.accelerators import did_not_start
from edge_infer.devices.invariance import kernel_configs
from edge_infer.devices.native_output import stdout_to_stderr
from edge_infer.devices.probe_cache import probe_graph
from edge_infer.devices.providers import share_threads
from edge_infer.runtime.cache import ConcatKVCache, KVCache
from edge_infer.runtime.device_cache import DEVICE_KV, DeviceKVCache
from edge_infer.runtime.chat_template import ChatTemplate
from edge_infer.contract.embedding import TASK_EMBED
from edge_infer.contract.errors import ContextLengthError, ModelFileError, UserError
from edge_infer.contract.model_folder import MANIFEST
from edge_infer.runtime.manifest import Manifest, load_manifest
from edge_infer.runtime.manifest_schema import check_graph_io, check_kv_memory
from edge_infer.runtime.tokenizer import Tokenizer
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS, QUERY_SEQLENS,
                                            past_pair, present_pair)

log = logging.getLogger("edge_infer")


def load_text_side(folder: Path, manifest: Manifest) -> tuple[Tokenizer, ChatTemplate | None]:
    """The folder's tokenizer and (when it has one) its chat template, as the manifest names them."""
    tok = manifest.tokenizer
    template = None
    if tok.chat_template_file:
        template = ChatTemplate((folder / tok.chat_template_file).read_text(encoding="utf-8"),
                                bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    return Tokenizer(folder / tok.file, tok), template


def check_external_data(graph_path: Path) -> onnx.ModelProto:
    """Refuse external-data references that leave the model folder (absolute, `..`, links); returns
    the graph without its external data (what the batch invariance probe reads)."""
    root = graph_path.parent.resolve()
    proto = onnx.load(str(graph_path), load_external_data=False)
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        p = Path(location)
        target = graph_path.parent / p
        if p.is_absolute() or ".." in p.parts or not location:
            raise ModelFileError(f"{graph_path}: tensor '{t.name}' points at '{location}', outside the model folder")
        if target.is_symlink() or not target.resolve().is_relative_to(root):
            raise ModelFileError(f"{graph_path}: external data '{location}' is a link out of the model folder")
        if target.exists() and target.stat().st_nlink > 1:
            raise ModelFileError(f"{graph_path}: external data '{location}' is a hard link; copy the file instead")
    return proto


STATIC_UNPADDED = "a static plan (--profile npu) runs separate fixed-shape prefill and decode graphs"


def model_traits(manifest: Manifest) -> ModelTraits:
    """What the model needs from a provider, from its manifest."""
    bits = manifest.quantization.bits
    contrib = manifest.kv_layout == "shared" or bool(bits)  # GroupQueryAttention / MatMulNBits
    return ModelTraits(dtype=manifest.dtype, contrib_ops=contrib, quant_bits=bits)


def choose_padding(manifest: Manifest, proto: onnx.ModelProto, plan: DevicePlan, asked: str,
                   threads: int | None = None, allow_spinning: bool = True,
                   shared_threads: bool = False) -> padding_modes.Padding:
    """The padding `manifest`'s graph `proto` runs with on `plan`'s device, from a probe of its kernels
    with the session options the model gets (devices/padding.py; cached per machine)."""
    if manifest.kv_layout == "static":
        return padding_modes.unpadded(STATIC_UNPADDED, asked)
    if manifest.kv_layout != "shared":
        return padding_modes.unpadded("the graph concatenates its cache, so a pass cannot carry a padding row", asked)
    pads_in_graph = manifest.graph.attention_padding == "in-graph"
    if LOGITS_TO_KEEP not in manifest.inputs and not pads_in_graph:
        return padding_modes.unpadded("an export without logits_to_keep cannot take a padding id", asked)

    def options() -> ort.SessionOptions:  # the model session's options, for the probe's one-node sessions
        o = cpu_session_options(threads, allow_spinning=allow_spinning, shared=shared_threads)
        o.log_severity_level = 3
        return o

    pool = options()
    count = pool.intra_op_num_threads if pool.use_per_session_threads else share_threads(threads)
    results = probe_graph(kernel_configs(proto), options, plan.session_providers(), count)
    where = "this CPU" if plan.device == "cpu" else f"this {plan.device} device"
    return padding_modes.choose(results, asked, pads_in_graph, where)


class Model:
    def __init__(self, manifest: Manifest, device: str = "auto", threads: int | None = None,
                 allow_spinning: bool = True, shared_threads: bool = False, padding: str | None = None):
        self.manifest = manifest
        folder = manifest.folder
        graph_path = folder / manifest.graph_file
        asked = padding_modes.requested(padding)
        proto = check_external_data(graph_path)
        check_kv_memory(folder / MANIFEST, manifest.kv_bytes(), f"max_length {manifest.geometry.max_length}")
        self.plan: DevicePlan = resolve(device, available_providers(), model_traits(manifest))
        options = cpu_session_options(threads, allow_spinning=allow_spinning, shared=shared_threads)
        self.shared_threads = not options.use_per_session_threads  # also True once the process has the pool
        options.log_severity_level = 3
        try:
            with stdout_to_stderr():  # provider libraries' chatter stays off stdout (devices/native_output.py)
                self.session = ort.InferenceSession(str(graph_path), options,
                                                    providers=self.plan.session_providers())
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise did_not_start(self.plan) or ModelFileError(
                f"{graph_path}: onnxruntime could not load it on {self.plan.device} ({e})") from None
        check_graph_io(graph_path, manifest.geometry, self.session.get_inputs(), self.session.get_outputs(),
                       manifest.kv_dtype)
        self.providers = self.session.get_providers()
        if self.providers[0] != self.plan.providers[0]:  # onnxruntime fell back to the CPU: say why
            raise did_not_start(self.plan) or UserError(
                f"requested {self.plan.providers[0]} but onnxruntime runs {self.providers[0]}")
        self.tokenizer, self.chat_template = load_text_side(folder, manifest)
        self._has_keep = LOGITS_TO_KEEP in manifest.inputs
        # query_seqlens (exports from issue 12 on): rows with different numbers of new ids in one pass.
        self._ragged = QUERY_SEQLENS in manifest.inputs
        # Batch invariance (devices/padding.py): the graph pads one-token attention itself (exports from
        # issue 12's second round on, export/graph.py _one_token_padding), and where this machine's
        # matmuls differ between 1 and M rows forward_rows gives every one-id row a padding id too
        # (pad_ids; the only mechanism of older exports). Graphs that concatenate their cache cannot pad.
        self.pads_in_graph = manifest.graph.attention_padding == "in-graph"
        self.padding = choose_padding(manifest, proto, self.plan, asked, threads, allow_spinning, shared_threads)
        self.pad_ids = self.padding.mode == "rows"  # False turns the padding id off (benchmarks do)
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        width = next(o.shape[-1] for o in self.session.get_outputs() if o.name == LOGITS)
        self._vocab = width if isinstance(width, int) else manifest.geometry.vocab_size
        g = manifest.geometry
        self._past = [past_pair(i) for i in range(g.num_layers)]
        self._present = [present_pair(i) for i in range(g.num_layers)]
        # Where new caches live: the device's memory on CUDA (runtime/device_cache.py), else numpy arrays.
        self.kv_device: str | None = DEVICE_KV.get(self.plan.device) if manifest.kv_layout == "shared" else None

    @property
    def batch_invariant(self) -> bool:
        """Whether a position's logits are the same bits however its pass was grouped: what the probe
        verified on this machine under the padding in force (self.padding says why)."""
        return self.padding.invariant and self.pad_ids == (self.padding.mode == "rows")

    def _binding(self, cache: KVCache) -> ort.IOBinding:
        """The cache's IOBinding for this session, its KV buffers bound once as past and present."""
        def make() -> ort.IOBinding:
            binding = self.session.io_binding()
            binding.bind_output(LOGITS)  # bound first, so it comes back first
            if isinstance(cache, DeviceKVCache):  # buffers in the device's memory, bound by address
                cache.bind_kv(binding, self._past, self._present)
                return binding
            for i, ((pk, pv), (ok, ov)) in enumerate(zip(self._past, self._present)):
                binding.bind_ortvalue_input(pk, cache.key_values[i])
                binding.bind_ortvalue_input(pv, cache.value_values[i])
                binding.bind_ortvalue_output(ok, cache.key_values[i])
                binding.bind_ortvalue_output(ov, cache.value_values[i])
            return binding
        return cache.binding(self.session, make)

    @property
    def max_length(self) -> int:
        return self.manifest.geometry.max_length

    def describe_device(self) -> str:
        return f"{self.plan.device} ({', '.join(self.providers)})"

    def describe_padding(self) -> str:
        """'rows (forced), batch-invariant: MatMulNBits bits=4 ... differs between 1 and 2 rows on this CPU'."""
        return self.padding.describe()

    def new_cache(self, batch: int = 1, max_length: int | None = None) -> KVCache:
        if self.manifest.kv_layout == "concat":
            return ConcatKVCache(self.manifest, batch, max_length)
        if self.kv_device is not None:
            return DeviceKVCache(self.manifest, batch, max_length, device=self.kv_device)
        return KVCache(self.manifest, batch, max_length)

    def forward(self, ids: np.ndarray, cache: KVCache, logits_to_keep: int = 1) -> np.ndarray:
        """Run `ids` (batch, sequence_length) after the cached positions; returns
        logits (batch, logits_to_keep, vocab) and advances the cache."""
        batch, seq = ids.shape
        assert batch == cache.batch, "ids batch must equal the cache's batch"
        total = cache.offset + seq
        if total > cache.max_length:
            raise ContextLengthError(f"{total} positions do not fit the KV cache of {cache.max_length}")
        keep = min(logits_to_keep, seq)
        if isinstance(cache, ConcatKVCache):
            mask = np.ones((batch, total), dtype=np.int64)  # (batch, total_sequence_length)
            positions = np.arange(cache.offset, total, dtype=np.int64)[None, :].repeat(batch, 0)
            logits = self._run_concat(ids, mask, positions, cache, keep)
        elif batch == 1:
            logits = self.forward_rows([ids[0]], cache, np.array([cache.offset]), keep)[0][None]
        else:  # rows of equal length (a caller's own batch, not a slot view)
            logits = np.stack(self.forward_rows(list(ids), cache, np.full(batch, cache.offset), keep))
        cache.advance(ids[0])
        return logits

    def _run_concat(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: "ConcatKVCache",
                    keep: int) -> np.ndarray:
        """A plain run for graphs that concatenate past and new keys (the optimum route)."""
        feed = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64), ATTENTION_MASK: mask}
        if POSITION_IDS in self._input_names:
            feed[POSITION_IDS] = positions
        for i, (pk, pv) in enumerate(self._past):
            feed[pk], feed[pv] = cache.keys[i], cache.values[i]
        outputs = self.session.run(None, feed)
        by_name = dict(zip(self._output_names, outputs))
        cache.replace([by_name[k] for k, _ in self._present], [by_name[v] for _, v in self._present])
        return by_name[LOGITS][:, -keep:]  # (batch, keep, vocab)

    def decode_batch(self, tokens: np.ndarray, cache: KVCache, lengths: np.ndarray) -> np.ndarray:
        """One decode step for every row of a batched cache, each row at its own length.

        tokens (batch,) are written at positions lengths (batch,); returns logits
        (batch, vocab). The caller owns the lengths (continuous batching: rows are
        slots that join and leave between steps).
        """
        assert tokens.shape == (cache.batch,) and lengths.shape == (cache.batch,), "one token and one length per row"
        return np.stack([r[0] for r in self.forward_rows([[int(t)] for t in tokens], cache, lengths)])

    def forward_rows(self, feeds: list, cache: KVCache, lengths: np.ndarray, keep: int | None = None,
                     pad: bool | None = None) -> list[np.ndarray]:
        """One pass over every row of a (batched) shared-buffer cache, each row at its own length.

        Row r feeds the ids feeds[r] (any number, 0 for an idle row) at positions lengths[r]...;
        returns per row the logits of its last min(keep, len(feeds[r])) fed ids, (n_r, vocab)
        (keep None: all). The cache's offset is not touched: the caller owns the lengths (a batched
        view of slots), or forward() advances a batch-1 cache.

        Batch invariance: GroupQueryAttention's one-token path (on every CPU measured) and, on some
        CPUs, a matmul's one-row kernel round differently from their paths for two or more rows,
        while passes of two or more agree bitwise (devices/invariance.py probes this machine). So a
        row with one id also feeds a padding id after it (its KV entry lands past the row's length,
        where the next pass overwrites it) in "rows" mode (pad_ids), and in a wider pass in either
        mode (free: the pass is that wide anyway); a one-token pass in "attention" mode keeps one row
        and the graph pads only its attention. A position's logits then do not depend on how its pass
        was grouped (decode step, verification, prefill chunk, server row). Needs room for the padding
        position; at the very end of the cache the row runs alone, unpadded. A decode step at batch 1
        in "rows" mode feeds the previous id again in front of its id instead of a padding id after
        it: the pass recomputes that position's keys and values to the same bits (passes of two or
        more rows agree), and the id stays last, so the lm_head computes one row of logits, not two.
        """
        batch = cache.batch
        assert len(feeds) == batch and lengths.shape == (batch,), "one feed and one length per row"
        if isinstance(cache, ConcatKVCache):  # the optimum route: batch 1, past + new keys as new arrays
            ids = np.asarray([feeds[0]], dtype=np.int64)  # (1, n)
            start, n = int(lengths[0]), ids.shape[1]
            if start + n > cache.max_length:
                raise ContextLengthError(f"{start + n} positions do not fit the KV cache of {cache.max_length}")
            mask = np.ones((1, start + n), dtype=np.int64)  # (1, total_sequence_length)
            positions = np.arange(start, start + n, dtype=np.int64)[None, :]  # (1, n)
            return [self._run_concat(ids, mask, positions, cache, min(keep or n, n))[0]]
        prev = self._previous_id(feeds, cache, lengths) if pad is None and self.pad_ids else None
        if prev is not None:  # "rows" mode, one id at batch 1: re-feed the id before it instead (see below)
            return self.forward_rows([[prev, feeds[0][0]]], cache, lengths - 1, keep=1, pad=False)
        real = [len(f) for f in feeds]
        if pad is None:  # a graph that pads its attention does it for one-token passes; in a wider pass
            # a one-id row still takes a padding id (free: the pass is that wide anyway)
            pad = self.pad_ids or (self.pads_in_graph and max(real, default=0) > 1)
        # Ids per row in the graph: real ids, plus a padding id where a row has exactly one.
        fed = [n + 1 if pad and n == 1 and lengths[r] + 2 <= cache.max_length else n for r, n in enumerate(real)]
        seq = max(max(fed), 1)
        if max(int(lengths[r]) + real[r] for r in range(batch)) > cache.max_length:
            raise ContextLengthError(f"{max(lengths) + max(real)} positions do not fit the KV cache of "
                                     f"{cache.max_length}")
        if batch > 1 and not self._ragged:
            # A graph without query_seqlens (exported before it) takes several ids per row only at
            # batch 1: rows of one id run unpadded together (not batch-invariant), others one by one.
            if max(real) > 1:
                return [self.forward_rows([feeds[r]], cache.row(r), lengths[r:r + 1], keep, pad)[0]
                        if real[r] else np.zeros((0, self.manifest.geometry.vocab_size), np.float32)
                        for r in range(batch)]
            fed, seq = [1] * batch, 1  # an idle row writes a dummy entry just past its length
        ids = np.zeros((batch, seq), dtype=np.int64)  # (batch, sequence_length); right padding is id 0
        for r, f in enumerate(feeds):
            ids[r, :real[r]] = f
        ends = np.array([int(lengths[r]) + fed[r] for r in range(batch)], dtype=np.int64)
        # Right-padded mask of the positions each row holds after this pass. An idle row (0 ids fed,
        # query_seqlens 0) writes nothing; at length 0 it still shows one position, as the op needs.
        total = max(int(ends.max()), seq)
        mask = (np.arange(total)[None, :] < np.maximum(ends, 1)[:, None]).astype(np.int64)  # (batch, total)
        positions = lengths.astype(np.int64)[:, None] + np.arange(seq)[None, :]  # (batch, sequence_length)
        # Logits for the last k positions of the pass: enough to reach the first one any row wants.
        want = [n if keep is None else min(keep, n) for n in real]
        first = min((real[r] - want[r] for r in range(batch) if real[r]), default=seq - 1)
        k = seq - first
        out = self._run(ids, mask, positions, cache, k, np.array(fed, dtype=np.int64))  # (batch, k, vocab)
        return [out[r, real[r] - want[r] - first:real[r] - first] for r in range(batch)]

    @staticmethod
    def _previous_id(feeds: list, cache: KVCache, lengths: np.ndarray) -> int | None:
        """The id a batch-1 cache holds just before a lone id fed at lengths[0], when it knows it."""
        if cache.batch != 1 or len(feeds[0]) != 1:
            return None
        at = int(lengths[0]) - 1
        return int(cache.tokens[at]) if 0 <= at < len(cache.tokens) and at < cache.offset else None

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KVCache,
             keep: int, query_lengths: np.ndarray) -> np.ndarray:
        binding = self._binding(cache)
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        if self.manifest.uses_position_ids:
            binding.bind_cpu_input(POSITION_IDS, positions)  # (batch, sequence_length)
        if self._has_keep:
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array([keep], dtype=np.int64))
        if self._ragged:
            binding.bind_cpu_input(QUERY_SEQLENS, query_lengths)  # (batch,)
        # A fresh array for the logits every pass (their shape changes between passes, and a caller may
        # hold the last ones), bound as the output so onnxruntime writes into it: no copy out, and no
        # Python wrapper for each of the cache's outputs (get_outputs makes one per output).
        rows = keep if self._has_keep else ids.shape[1]
        logits = np.empty((ids.shape[0], rows, self._vocab), dtype=np.float32)  # (batch, logits_to_keep, vocab)
        binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits


def load(path: str | os.PathLike, device: str = "auto", threads: int | None = None, verify: bool = True,
         allow_spinning: bool = True, shared_threads: bool = False, padding: str | None = None,
         chat_template: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> Model:
    """Load an exported model folder (or a model store name, `edge-infer list`): verify its manifest and
    hashes, then open a session.

    padding: "auto" (default; $EDGE_INFER_PADDING when None) picks the cheapest padding that makes
    every pass grouping give the same bits on this machine, measured by a probe of the graph's
    kernels (devices/padding.py, cached per machine); "attention" or "rows" forces one (tests, A/Bs).
    `Model.batch_invariant` and `Model.describe_padding()` say what was verified and why.

    allow_spinning=False stops onnxruntime's worker threads spinning after each run: a little
    slower alone, but a second session on the same cores no longer fights it.
    shared_threads=True runs the model on the process-wide thread pool
    (devices.providers.share_threads, sized by the first model that asks): load a target
    and its draft model this way and they take turns on the same threads. That is for the
    whole process: onnxruntime then refuses sessions with pools of their own, so every later
    `load` joins the pool, and a session you open with onnxruntime directly needs
    `SessionOptions.use_per_session_threads = False`.

    chat_template: a built-in template's name (chatml, llama3, gemma, ...) or a Jinja file, used in
    place of the folder's own (runtime/template_library.py).

    progress: `progress(stage, done, total)` for an application's bar: "verifying" counts the bytes
    hashed (with verify), then "opening" (the session and the padding probe) goes 0 -> 1.
    """
    def report(stage: str) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, total: progress(stage, done, total)

    manifest = load_manifest(Path(path), verify=verify, progress=report("verifying") if verify else None)
    if manifest.task == TASK_EMBED:
        raise UserError(f"{manifest.folder}: is an embedding model (exported with --task embed or from an encoder); "
                        "it does not generate text: use edge_infer.embed() or POST /v1/embeddings with it, and a "
                        "text-generation export for chat")
    opening = report("opening")
    if opening is not None:
        opening(0, 1)
    model: Model
    if manifest.kv_layout == "static":  # a fixed-shape plan (--profile npu): runtime/static_plan.py
        from edge_infer.runtime.static_plan import StaticModel

        model = StaticModel(manifest, device=device, threads=threads, allow_spinning=allow_spinning,
                            shared_threads=shared_threads, padding=padding)
    else:
        model = Model(manifest, device=device, threads=threads,
                      allow_spinning=allow_spinning, shared_threads=shared_threads, padding=padding)
    if chat_template is not None:
        from edge_infer.runtime.template_library import override

        override(model, chat_template)
    if opening is not None:
        opening(1, 1)
    return model
