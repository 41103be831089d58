"""A loaded model: manifest, onnxruntime session on the chosen device, tokenizer, chat template.

`Model.forward` runs one pass (a prefill chunk or a decode step) over a KVCache
through IOBinding: the cache arrays are bound as both past and present, so the
graph writes new keys in place and nothing is copied per step.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from edge_infer.devices.ort import ort

from edge_infer.devices import DevicePlan, ModelTraits, available_providers, cpu_session_options, resolve
from edge_infer.devices import contention
from edge_infer.devices import padding as padding_modes
from edge_infer.devices.accelerators import did_not_start
from edge_infer.devices.invariance import kernel_configs
from edge_infer.devices.capabilities import pick_header
from edge_infer.devices.native_output import stdout_to_stderr
from edge_infer.devices.probe_cache import probe_graph
from edge_infer.devices.providers import physical_cores, share_threads, shared_pool_size
from edge_infer.runtime.cache import ConcatKVCache, KVCache, Pass
from edge_infer.runtime.device_cache import DEVICE_KV, DeviceKVCache
from edge_infer.runtime import mapped_weights
from edge_infer.runtime.chat_template import ChatTemplate
from edge_infer.contract.embedding import TASK_EMBED
from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.contract.graph_record import GraphHeader
from edge_infer.contract.model_folder import MANIFEST
from edge_infer.runtime.manifest import Manifest, load_manifest
from edge_infer.runtime.manifest_schema import check_graph_io, check_kv_memory
from edge_infer.runtime.tokenizer import Tokenizer
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PAD_ATTENTION, POSITION_IDS,
                                          QUERY_SEQLENS, past_pair, present_pair)

log = logging.getLogger("edge_infer")

# A pass feeding more ids than this (a prefill chunk) grows onnxruntime's CPU arena by its activations
# (tens of MB at 0.5B, which the arena keeps); the next narrower pass hands those chunks back to the
# system (run option memory.enable_memory_arena_shrinkage), so a decode does not hold its prefill's
# activations for good. With prefill chunks of 128 (runtime/decode.py), peak RSS at a 1024-token prompt
# went 1943 -> 1838 MiB at 1.5B and 908 -> 859 at 0.5B (benchmarks/RESULTS.md).
WIDE_PASS_IDS = 64


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


def external_files(graph_path: Path, proto: onnx.ModelProto) -> set[Path]:
    """The external data files `proto`'s initializers live in (the folder's model.onnx.data)."""
    return {graph_path.parent / e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


RAGGED_OFF = ("GroupQueryAttention before onnxruntime 1.32 has no query_seqlens and takes one id per row in a "
              "pass of several rows, so batched server rows decode without speculation and without attention "
              "padding (their logits may differ from a solo run's in the last bits); speculation and batch "
              "invariance hold at batch 1")
STATIC_UNPADDED = "a static plan (--profile npu) runs separate fixed-shape prefill and decode graphs"


def describe_header(manifest: Manifest, header: GraphHeader) -> str:
    """'model.compat.onnx on onnxruntime 1.24.4: <what a release before 1.32 costs>', one line."""
    line = f"{header.file} on onnxruntime {ort.__version__}"
    if manifest.kv_layout != "shared" or QUERY_SEQLENS in header.needs:
        return line
    return f"{line}: {RAGGED_OFF}"


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
    if asked == "off" and manifest.kv_layout == "shared":
        return padding_modes.turned_off()
    if manifest.kv_layout == "static":
        return padding_modes.unpadded(STATIC_UNPADDED, asked)
    if manifest.kv_layout != "shared":
        return padding_modes.unpadded("the graph concatenates its cache, so a pass cannot carry a padding row", asked)

    def options() -> ort.SessionOptions:  # the model session's options, for the probe's one-node sessions
        o = cpu_session_options(threads, allow_spinning=allow_spinning, shared=shared_threads)
        o.log_severity_level = 3
        return o

    pool = options()
    count = pool.intra_op_num_threads if pool.use_per_session_threads else share_threads(threads)
    results = probe_graph(kernel_configs(proto), options, plan.session_providers(), count)
    where = "this CPU" if plan.device == "cpu" else f"this {plan.device} device"
    return padding_modes.choose(results, asked, where)


class Model:
    def __init__(self, manifest: Manifest, device: str = "auto", threads: int | None = None,
                 allow_spinning: bool | None = True, shared_threads: bool = False, padding: str | None = None,
                 load_started: contention.CpuSample | None = None):
        self.manifest = manifest
        self.tokenizer, self.chat_template = load_text_side(manifest.folder, manifest)
        # Whether onnxruntime's threads spin (devices/contention.py): None measures other processes' use of
        # the cores since load_started (the whole load: manifest, hashes, tokenizer) and spins where it is free.
        self._spin_threads = threads or physical_cores()
        if shared_threads or shared_pool_size() is not None:  # onnxruntime fixed the pool's spinning when it made it
            self.spinning = contention.Spinning(True, "the process-wide thread pool spins (onnxruntime's default)")
        else:
            self.spinning = contention.decide(allow_spinning, self._spin_threads, load_started)
        self._open(device, threads, self.spinning.on, shared_threads, padding_modes.requested(padding))

    def _open(self, device: str, threads: int | None, allow_spinning: bool, shared_threads: bool, asked: str) -> None:
        """Pick the graph header, open its session on the device, choose the padding."""
        manifest = self.manifest
        folder = manifest.folder
        # The first graph header this onnxruntime can load (devices/capabilities.py): the full graph, or
        # one without query_seqlens for onnxruntime before 1.32 (export/graph_headers.py).
        self.header, self.headers_skipped = pick_header(manifest.headers, str(folder / MANIFEST))
        graph_path = folder / self.header.file
        proto = check_external_data(graph_path)
        check_kv_memory(folder / MANIFEST, manifest.kv_bytes(), f"max_length {manifest.geometry.max_length}")
        self.plan: DevicePlan = resolve(device, available_providers(), model_traits(manifest))
        self._graph_path, self._threads = graph_path, threads
        self._bound: weakref.WeakSet[KVCache] = weakref.WeakSet()  # caches holding a binding to self.session
        options = cpu_session_options(threads, allow_spinning=allow_spinning, shared=shared_threads)
        self.shared_threads = not options.use_per_session_threads  # also True once the process has the pool
        self.session = self._open_session(options)
        check_graph_io(graph_path, manifest.geometry, self.session.get_inputs(), self.session.get_outputs(),
                       manifest.kv_dtype)
        self.providers = self.session.get_providers()
        if self.providers[0] != self.plan.providers[0]:  # onnxruntime fell back to the CPU: say why
            raise did_not_start(self.plan) or UserError(
                f"requested {self.plan.providers[0]} but onnxruntime runs {self.providers[0]}")
        self._input_names = {i.name for i in self.session.get_inputs()}
        # query_seqlens: rows of one pass write only their own ids (else every row writes the widest feed)
        self.ragged_rows = QUERY_SEQLENS in self._input_names
        # Batch invariance (devices/padding.py): the graph pads one-token attention itself (export/graph.py
        # _one_token_padding), and where this machine's matmuls differ between 1 and M rows forward_rows
        # gives every one-id row a padding id too (pad_ids). Graphs that concatenate their cache cannot pad.
        self.padding = choose_padding(manifest, proto, self.plan, asked, threads, allow_spinning, shared_threads)
        self.pad_ids = self.padding.mode == "rows"  # False turns the padding id off (benchmarks do)
        # The graph's attention padding can be switched off (export/graph.py _one_token_padding): padding="off".
        self.pad_switch = PAD_ATTENTION in self._input_names
        self._pad_flag = np.array([int(self.padding.mode != "off")], dtype=np.int64)
        self._output_names = [o.name for o in self.session.get_outputs()]
        width = next(o.shape[-1] for o in self.session.get_outputs() if o.name == LOGITS)
        self._vocab = width if isinstance(width, int) else manifest.geometry.vocab_size
        g = manifest.geometry
        self._past = [past_pair(i) for i in range(g.num_layers)]
        self._present = [present_pair(i) for i in range(g.num_layers)]
        # Where new caches live: the device's memory on CUDA (runtime/device_cache.py), else numpy arrays.
        self.kv_device: str | None = DEVICE_KV.get(self.plan.device) if manifest.kv_layout == "shared" else None
        self._shrink_arena: ort.RunOptions | None = None  # the run options of the pass after a wide one
        if self.providers[0] == "CPUExecutionProvider":
            self._shrink_arena = ort.RunOptions()
            self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._arena_grown = False  # the last pass was wider than WIDE_PASS_IDS
        # The weights file's pages the session read while packing its kernels stay mapped and resident,
        # though no pass reads most of them again: hand them back (runtime/mapped_weights.py).
        self._external = external_files(graph_path, proto)
        self.released_bytes = mapped_weights.release(self._external)

    def _open_session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        graph_path = self._graph_path
        options.log_severity_level = 3
        try:
            with stdout_to_stderr():  # provider libraries' chatter stays off stdout (devices/native_output.py)
                return ort.InferenceSession(str(graph_path), options, providers=self.plan.session_providers())
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise did_not_start(self.plan) or ModelFileError(
                f"{graph_path}: onnxruntime could not load it on {self.plan.device} ({e})") from None

    @property
    def respinnable(self) -> bool:
        """Whether respin can change this model's spinning: its own CPU thread pool, not a forced choice."""
        return not self.shared_threads and not self.spinning.forced and self.providers[0] == "CPUExecutionProvider"

    def spinning_watch(self, confirm: int = contention.WATCH_CONFIRM) -> contention.Watch | None:
        """A Watch that re-decides this model's spinning from idle windows (None where it is fixed)."""
        return contention.Watch(self._spin_threads, self.spinning.on, confirm=confirm) if self.respinnable else None

    def respin(self, spinning: contention.Spinning) -> float:
        """Reopen the session with `spinning` (onnxruntime fixes a pool's spinning when the session opens);
        returns the seconds it took. Where the new session fails to open, the old one's is opened again
        and the error raised (and where that fails too, its error: the model then has no session).

        The same graph, options and padding; only the threads' spinning differs, so every pass gives the
        same bits as before. The old session's bindings are dropped first, so its packed weights are freed
        before the new session packs its own (no second copy in memory); the reopening costs what the
        session's part of a load costs (0.3 s at 135M, 0.9 s at 0.5B, 2.6 s at 1.5B on the Xeon), and no pass
        may run meanwhile. Its peak is the process's memory plus the file pages the packing reads before
        they are released (1.5B: 1722 MiB, 115 over the first load's peak, for those seconds).
        """
        if not self.respinnable:
            raise UserError("this model's spinning is fixed (asked for, a shared thread pool, or not the CPU)")
        t0 = time.monotonic()
        for cache in list(self._bound):
            cache.forget_bindings()
        self._bound.clear()
        self.session = None  # its weights go before the new session packs its own
        gc.collect()  # (a binding in a reference cycle would keep them)
        mapped_weights.trim_heap()  # freed, they stay resident, and the new session would not reuse them all
        try:
            self.session = self._open_session(cpu_session_options(self._threads, allow_spinning=spinning.on))
            self.spinning = spinning
        except Exception:
            self.session = self._open_session(cpu_session_options(self._threads, allow_spinning=self.spinning.on))
            raise
        finally:
            self.released_bytes = mapped_weights.release(self._external)
        return time.monotonic() - t0

    @property
    def batch_invariant(self) -> bool:
        """Whether a position's logits are the same bits however its pass was grouped: what the probe
        verified on this machine under the padding in force (self.padding says why)."""
        return self.padding.invariant and self.pad_ids == (self.padding.mode == "rows")

    def _binding(self, cache: KVCache) -> ort.IOBinding:
        """The cache's IOBinding for this session, its KV buffers bound once as past and present."""
        def make() -> ort.IOBinding:
            self._bound.add(cache)
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

    def describe_spinning(self) -> str:
        """'off: other processes used 1.0 of 2 CPUs while the model loaded; ...'."""
        return self.spinning.describe()

    def describe_padding(self) -> str:
        """'rows (forced), batch-invariant: MatMulNBits bits=4 ... differs between 1 and 2 rows on this CPU'."""
        return self.padding.describe()

    def new_cache(self, batch: int = 1, max_length: int | None = None) -> KVCache:
        if batch > 1 and self.manifest.kv_layout == "shared" and not self.ragged_rows:
            log.warning("%s", self.describe_graph())  # a batched cache (the server) on an older onnxruntime
        if self.manifest.kv_layout == "concat":
            return ConcatKVCache(self.manifest, batch, max_length)
        if self.kv_device is not None:
            return DeviceKVCache(self.manifest, batch, max_length, device=self.kv_device)
        return KVCache(self.manifest, batch, max_length)

    def describe_graph(self) -> str:
        """Which graph header runs and what the installed onnxruntime's release costs, one line."""
        return describe_header(self.manifest, self.header)

    def forward(self, ids: np.ndarray, cache: KVCache, logits_to_keep: int = 1) -> np.ndarray:
        """Run `ids` (batch, sequence_length) after the cached positions (rows of one length); returns
        logits (batch, logits_to_keep, vocab). The cache advances by every id (forward_rows)."""
        return np.stack(self.forward_rows(list(ids), cache, logits_to_keep))

    def decode_batch(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """One decode step for every row of a batched cache, each row at its own length: tokens (batch,)
        are written after each row's cached positions (each row advances by one); returns logits (batch, vocab)."""
        assert tokens.shape == (cache.batch,), "one token per row"
        return np.stack([r[0] for r in self.forward_rows([[int(t)] for t in tokens], cache)])

    def forward_rows(self, feeds: list, cache: KVCache, keep: int | None = None,
                     pad: bool | None = None) -> list[np.ndarray]:
        """One pass over every row of a (batched) cache, each row after its own cached positions.

        Row r feeds the ids feeds[r] (any number, 0 for an idle row); returns per row the logits of its
        last min(keep, len(feeds[r])) fed ids, (n_r, vocab) (keep None: all). The cache builds the
        pass (KVCache.plan), and each row advances by the ids it fed: this is the one place a cache
        advances (prefill chunks, decode steps, server rows and draft steps alike). A caller that keeps
        fewer (speculative verification: runtime/decode.py `Decoding.settle`) trims the rest off.
        """
        rows = self._pass_rows(feeds, cache, keep, pad)
        cache.advance_rows(feeds)
        return rows

    def _pass_rows(self, feeds: list, cache: KVCache, keep: int | None, pad: bool | None) -> list[np.ndarray]:
        """forward_rows' pass, leaving the cache's lengths as they were.

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
        assert len(feeds) == cache.batch, "one feed per row"
        if isinstance(cache, ConcatKVCache):  # the optimum route: past + new keys as new arrays
            p = cache.plan(feeds, pad=False, uniform=True, keep=keep)
            return p.split(self._run_concat(p, cache))
        back = 0
        if self.padding.mode == "off":
            pad = False  # load(padding="off"): no padding id, and _run turns the graph's attention padding off
        if pad is None and self.pad_ids and cache.batch == 1 and len(feeds[0]) == 1:
            prev = cache.previous_id()
            if prev is not None:  # "rows" mode, one id at batch 1: re-feed the id before it instead
                feeds, back, keep, pad = [[prev, feeds[0][0]]], 1, 1, False
        if pad is None:  # a one-id row in a wider pass takes a padding id (free: the pass is that wide anyway)
            pad = self.pad_ids or max(len(f) for f in feeds) > 1
        if not self.ragged_rows and cache.batch > 1:  # a header without query_seqlens (RAGGED_OFF)
            if max(len(f) for f in feeds) > 1 or not cache.fits_uniform(feeds):  # rows one by one
                return [self._pass_rows([f], cache.row(r), keep, pad)[0] if f
                        else np.zeros((0, self._vocab), np.float32) for r, f in enumerate(feeds)]
            pad = False  # one id per row; an idle row writes a dummy entry just past its length
        p = cache.plan(feeds, pad, uniform=not self.ragged_rows, keep=keep, back=back)
        return p.split(self._run(p, cache))

    def _run_concat(self, p: Pass, cache: "ConcatKVCache") -> np.ndarray:
        """A plain run for graphs that concatenate past and new keys (the optimum route)."""
        feed = {INPUT_IDS: p.ids, ATTENTION_MASK: p.mask}
        if POSITION_IDS in self._input_names:
            feed[POSITION_IDS] = p.positions
        for i, (pk, pv) in enumerate(self._past):
            feed[pk], feed[pv] = cache.keys[i], cache.values[i]
        outputs = self.session.run(None, feed)
        by_name = dict(zip(self._output_names, outputs))
        cache.replace([by_name[k] for k, _ in self._present], [by_name[v] for _, v in self._present])
        return by_name[LOGITS][:, -p.keep:]  # (batch, keep, vocab)

    def _run(self, p: Pass, cache: KVCache) -> np.ndarray:
        binding = self._binding(cache)
        binding.bind_cpu_input(INPUT_IDS, p.ids)
        binding.bind_cpu_input(ATTENTION_MASK, p.mask)
        if self.manifest.uses_position_ids:
            binding.bind_cpu_input(POSITION_IDS, p.positions)  # (batch, sequence_length)
        binding.bind_cpu_input(LOGITS_TO_KEEP, np.array([p.keep], dtype=np.int64))
        if self.ragged_rows:
            binding.bind_cpu_input(QUERY_SEQLENS, p.query_lengths)  # (batch,)
        if self.pad_switch:
            binding.bind_cpu_input(PAD_ATTENTION, self._pad_flag)
        # A fresh array for the logits every pass (their shape changes between passes, and a caller may
        # hold the last ones), bound as the output so onnxruntime writes into it: no copy out, and no
        # Python wrapper for each of the cache's outputs (get_outputs makes one per output).
        logits = np.empty((p.ids.shape[0], p.keep, self._vocab), dtype=np.float32)  # (batch, logits_to_keep, vocab)
        binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        wide = p.ids.size > WIDE_PASS_IDS  # chunks of one prefill keep the arena; the step after them shrinks it
        self.session.run_with_iobinding(binding, self._shrink_arena if self._arena_grown and not wide else None)
        self._arena_grown = wide and self._shrink_arena is not None
        return logits


def load(path: str | os.PathLike, device: str = "auto", threads: int | None = None, verify: bool = True,
         allow_spinning: bool | None = None, shared_threads: bool = False, padding: str | None = None,
         chat_template: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> Model:
    """Load an exported model folder (or a model store name, `edge-infer list`): verify its manifest and
    hashes, then open a session.

    padding: "auto" (default; $EDGE_INFER_PADDING when None) picks the cheapest padding that makes
    every pass grouping give the same bits on this machine, measured by a probe of the graph's
    kernels (devices/padding.py, cached per machine); "attention" or "rows" forces one (tests, A/Bs);
    "off" pads nothing: faster one-token steps, no invariance (speculation may differ from plain at a tie).
    `Model.batch_invariant` and `Model.describe_padding()` say what was verified and why.

    allow_spinning: whether onnxruntime's threads spin between the kernels of a run. None (default;
    $EDGE_INFER_SPIN=auto|on|off when set) measures, while the model loads, how much of the cores other
    processes use, and spins only where they leave the threads' cores free (devices/contention.py):
    spinning is 1.2-1.4x faster on an idle machine and 1.5x slower beside one busy core.
    False also keeps a second session on the same cores from fighting this one. `Model.spinning` and
    `Model.describe_spinning()` say what was chosen and why.
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

    started = contention.sample()  # other processes' CPU use is measured over the load (devices/contention.py)
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
                            shared_threads=shared_threads, padding=padding, load_started=started)
    else:
        model = Model(manifest, device=device, threads=threads, allow_spinning=allow_spinning,
                      shared_threads=shared_threads, padding=padding, load_started=started)
    if chat_template is not None:
        from edge_infer.runtime.template_library import override

        override(model, chat_template)
    if opening is not None:
        opening(1, 1)
    return model
