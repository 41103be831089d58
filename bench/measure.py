"""What `edge-infer bench` and `edge-infer eval` compute: generation timings and text quality.

Engine-agnostic on purpose. Timing takes two callables (`prefill(ids) -> first token`,
`step(token) -> next token`) and scoring takes one (`logits(ids) -> all-position logits`),
so `benchmarks/` measures onnxruntime-genai and llama.cpp with exactly this code. The
module imports only the standard library and numpy at load time, which lets a peer's
virtual environment load it by file path; edge-infer's own adapters import the runtime
inside the functions that need it.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# The shipped English text (bench/text/*.txt, installed as package data).
TEXT_DIR = Path(__file__).resolve().parent / "text"
Prefill = Callable[[Sequence[int]], int]  # runs the prompt, returns the greedy first token
Step = Callable[[int], int]  # feeds one token, returns the greedy next token
Logits = Callable[[np.ndarray], np.ndarray]  # ids (seq,) -> logits (seq, vocab), one fresh pass


# ---------------------------------------------------------------- the machine

def describe_machine(threads: int | None = None) -> dict:
    """CPU, cores, memory, OS and library versions: enough to tell two machines apart."""
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version("onnxruntime"),
    }
    if threads is not None:
        info["threads"] = threads
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_rss_mib() -> float | None:
    """The process's peak resident set size so far (the whole process: interpreter, libraries, model).

    On Linux this is VmHWM, the high-water mark of this process's own memory since it started.
    getrusage's ru_maxrss would keep the mark of the memory the process had before exec: a bench
    started by a harness holding 1 GiB would report at least that (found by benchmarks/worker.py).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------- text and prompts

def read_text(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, description) from a file, or from a folder's *.txt files joined in name order.
    None means the shipped English text."""
    from edge_infer.contract.errors import UserError

    if path is None:
        if not TEXT_DIR.is_dir():
            raise UserError("no text given and the shipped bench/text folder is missing "
                            "(a damaged install); pass --text FILE")
        path = TEXT_DIR
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"{p}: no .txt files in this folder")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"{p}: no such text file or folder")
    try:
        text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"{p}: the text is empty")
    return text, str(p) if len(files) == 1 else f"{p}/*.txt, {len(files)} files"


def prompt_ids(ids: Sequence[int], n: int) -> list[int]:
    """Exactly n token ids: the text's first n, the text repeated when it is shorter."""
    if not ids:
        raise ValueError("no token ids to build a prompt from")
    reps = -(-n // len(ids))
    return (list(ids) * reps)[:n]


# ---------------------------------------------------------------- timing a generation

@dataclass(frozen=True)
class RunStats:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prompt in, first token out (prefill + picking the token)
    prefill_tok_s: float  # prompt_tokens / ttft_s
    decode_tok_s: float  # (new_tokens - 1) / time from the first token to the last
    itl_p50_ms: float  # inter-token latency of the decode steps
    itl_p95_ms: float
    peak_rss_mib: float | None  # the process's peak so far, read after the run
    first_tokens: tuple[int, ...]  # the first few generated ids, to check engines agree

    def as_dict(self) -> dict:
        d = asdict(self)
        d["first_tokens"] = list(self.first_tokens)
        return d


def time_generation(prefill: Prefill, step: Step, ids: Sequence[int], new_tokens: int) -> RunStats:
    """Greedy generation of new_tokens after ids, ignoring eos; the first token comes from the prefill."""
    if new_tokens < 1:
        raise ValueError("new_tokens must be at least 1")
    return time_tokens(step_tokens(prefill, step, ids, new_tokens), len(ids), new_tokens)


def step_tokens(prefill: Prefill, step: Step, ids: Sequence[int], new_tokens: int) -> Iterator[int]:
    """The ids of a prefill/step engine: the prefill's token, then new_tokens - 1 steps."""
    token = prefill(ids)
    yield token
    for _ in range(new_tokens - 1):
        token = step(token)
        yield token


def time_tokens(tokens: Iterator[int], n_prompt: int, new_tokens: int, keep: list[int] | None = None) -> RunStats:
    """Time a generator that runs the prompt on its first next() and then yields new_tokens ids
    (one per step, or several per pass when speculating: those arrive together). `keep` gets every id."""
    start = time.perf_counter()
    out = keep if keep is not None else []
    stamps = []
    for token in tokens:
        stamps.append(time.perf_counter())
        out.append(token)
        if len(stamps) == new_tokens:
            break
    if len(stamps) != new_tokens:
        raise RuntimeError(f"the generator stopped after {len(stamps)} of {new_tokens} tokens")
    first, last = stamps[0], stamps[-1]
    gaps = np.diff(np.asarray(stamps))  # seconds between consecutive tokens
    ttft = first - start
    decode = last - first
    return RunStats(
        prompt_tokens=n_prompt, new_tokens=new_tokens, ttft_s=ttft, prefill_tok_s=n_prompt / ttft,
        decode_tok_s=(new_tokens - 1) / decode if new_tokens > 1 and decode > 0 else 0.0,
        itl_p50_ms=float(np.percentile(gaps, 50) * 1e3) if len(gaps) else 0.0,
        itl_p95_ms=float(np.percentile(gaps, 95) * 1e3) if len(gaps) else 0.0,
        peak_rss_mib=peak_rss_mib(), first_tokens=tuple(out[:8]),
    )


MEDIAN_FIELDS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "itl_p50_ms", "itl_p95_ms", "peak_rss_mib")


def medians(runs: Sequence[RunStats | dict]) -> dict:
    """The median of each timing field over runs (dicts or RunStats)."""
    rows = [r.as_dict() if isinstance(r, RunStats) else r for r in runs]
    out = {}
    for f in MEDIAN_FIELDS:
        values = [r[f] for r in rows if r.get(f) is not None]
        out[f] = float(np.median(values)) if values else None
    return out


def edge_engine(model, new_tokens: int) -> tuple[Prefill, Step]:
    """prefill/step callables over an edge-infer Model, as users get them: runtime.generate.prefill
    (chunked) for the prompt, Model.forward for each decode step, greedy argmax."""
    from edge_infer.runtime.generate import prefill as run_prefill

    state = {}

    def prefill(ids: Sequence[int]) -> int:
        # A fresh cache sized for this request (prompt + new tokens), like the peers' generators.
        cache = model.new_cache(max_length=min(len(ids) + new_tokens, model.max_length))
        state["cache"] = cache
        return int(np.argmax(run_prefill(model, list(ids), cache)))  # logits (vocab,)

    def step(token: int) -> int:
        logits = model.forward(np.array([[token]], dtype=np.int64), state["cache"])  # (1, 1, vocab)
        return int(np.argmax(logits[0, -1]))

    return prefill, step


def edge_speculative(model, config, new_tokens: int) -> Callable[[Sequence[int], object], Iterator[int]]:
    """tokens(ids, stats): the greedy ids of a speculative generation (runtime.speculative) with eos
    ignored, as edge_engine's are, from a fresh cache; stats (a SpecStats) gets the acceptance counts."""
    from edge_infer.runtime.sampling import SamplingParams, make_sampler
    from edge_infer.runtime.generate import decode_tokens

    def tokens(ids: Sequence[int], stats) -> Iterator[int]:
        cache = model.new_cache(max_length=min(len(ids) + new_tokens, model.max_length))
        return decode_tokens(model, list(ids), cache, make_sampler(SamplingParams()), new_tokens, config,
                             stats, ignore_eos=True)

    return tokens


# ---------------------------------------------------------------- perplexity and agreement

@dataclass(frozen=True)
class Window:
    begin: int  # the window is ids[begin:end]
    end: int
    first_target: int  # it scores targets ids[first_target:end], each predicted from the position before


def strided_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Sliding windows as in Hugging Face's perplexity guide: each window of `window` tokens moves
    by `stride` and scores only the targets no earlier window scored, so every token but the
    first (which has no context) is scored exactly once, with up to window - 1 tokens of context."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    if not 1 <= stride < window:  # at stride == window a window's first token would have no context
        raise ValueError(f"stride must be at least 1 and smaller than the window ({window}), got {stride}")
    if n_tokens < 2:
        raise ValueError("the text must be at least 2 tokens long")
    out, scored_to = [], 1  # targets before scored_to are done; token 0 is never a target
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return out


@dataclass(frozen=True)
class Quality:
    tokens: int  # length of the text in tokens
    scored: int  # targets scored (tokens - 1)
    windows: int
    nll_mean: float  # nats per token
    perplexity: float
    top1_agreement: float | None = None  # with the reference, over the same positions
    kl_mean: float | None = None  # mean KL(reference || model), nats
    kl_p99: float | None = None
    reference_nll_mean: float | None = None
    reference_perplexity: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(logits: Logits, ids: Sequence[int], window: int = 512, stride: int = 256,
             reference: Logits | None = None, progress: Callable[[int, int], None] | None = None,
             rows_per_chunk: int = 64) -> Quality:
    """Perplexity of the model over ids (strided windows), and with a reference, top-1 agreement
    and mean KL(reference || model) at every scored position."""
    from edge_infer.runtime.sampling import kl_of_log_probs, log_softmax  # (this module imports only numpy)

    tokens = np.asarray(ids, dtype=np.int64)  # (n,)
    wins = strided_windows(len(tokens), window, stride)
    nll, kls, agree, ref_nll = [], [], 0, []
    for i, w in enumerate(wins):
        piece = tokens[w.begin:w.end]  # (seq,)
        rows = slice(w.first_target - 1 - w.begin, w.end - 1 - w.begin)  # positions that predict the targets
        targets = tokens[w.first_target:w.end]
        out = _all_logits(logits, piece)[rows]  # (scored, vocab)
        ref = _all_logits(reference, piece)[rows] if reference is not None else None
        for c in range(0, len(targets), rows_per_chunk):  # float64 in chunks bounds the memory
            sl = slice(c, c + rows_per_chunk)
            lp = log_softmax(out[sl])  # (chunk, vocab)
            t = targets[sl]
            nll.append(-lp[np.arange(len(t)), t])
            if ref is not None:
                rp = log_softmax(ref[sl])
                kls.append(kl_of_log_probs(rp, lp))
                agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
                ref_nll.append(-rp[np.arange(len(t)), t])
        if progress:
            progress(i + 1, len(wins))
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    q: dict[str, Any] = dict(tokens=len(tokens), scored=len(all_nll), windows=len(wins), nll_mean=mean,
                             perplexity=math.exp(mean))
    if reference is not None:
        all_kl = np.maximum(np.concatenate(kls), 0.0)  # rounding can leave -1e-17 where the two agree
        rmean = float(np.concatenate(ref_nll).mean())
        q.update(top1_agreement=agree / len(all_nll), kl_mean=float(all_kl.mean()),
                 kl_p99=float(np.percentile(all_kl, 99)), reference_nll_mean=rmean,
                 reference_perplexity=math.exp(rmean))
    return Quality(**q)


def _all_logits(fn: Logits, piece: np.ndarray) -> np.ndarray:
    out = np.asarray(fn(piece))
    if out.ndim != 2 or out.shape[0] != len(piece):
        raise ValueError(f"logits for {len(piece)} positions should be (seq, vocab), got {out.shape}")
    return out


def edge_logits(model) -> Logits:
    """All-position logits of an edge-infer Model: one pass over a fresh cache sized to the window."""
    def fn(ids: np.ndarray) -> np.ndarray:
        cache = model.new_cache(max_length=len(ids))
        return model.forward(ids[None, :], cache, logits_to_keep=len(ids))[0]  # (seq, vocab)

    return fn

