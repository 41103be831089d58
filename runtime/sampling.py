"""Turn one step's logits into the next token id.

`make_sampler(params)` returns a `Sampler`, a plain callable the generation loop
calls once per decode step (mlx-lm style). Everything here is a pure function
of (logits, tokens, n_prompt) plus the sampler's own random generator.

The distribution is built in a fixed order:

    penalties -> temperature -> top-k -> top-p -> min-p

1. repetition_penalty (HF/CTRL): over every distinct token in the context,
   a positive logit is divided by the penalty, a negative one multiplied.
2. presence/frequency penalty (OpenAI): over generated tokens only,
   logit -= presence * (count > 0) + frequency * count.
3. temperature 0 means greedy: argmax of the penalised logits, ties -> lowest id.
   Otherwise logits are divided by the temperature and soft-maxed.
4. top-k keeps the k most likely tokens; top-p then keeps the smallest set of
   most likely tokens whose mass reaches top_p (renormalised after top-k);
   min-p then drops tokens whose probability is below min_p * max probability.
   The most likely token always survives, so at least one token is kept.

Cost per step on a (vocab,) row: one float32 copy when a penalty is active,
np.unique over the context, one argpartition for top-k, and a softmax over the
surviving candidates (the full vocab unless top-k is set). top-p without top-k
sorts only a growing head of the distribution, not the whole vocab.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from edge_infer.contract.errors import UserError

# top-p without top-k sorts the head of the distribution, growing it by this
# factor until it holds top_p of the mass (a peaked row needs one round).
_TOP_P_FIRST_HEAD = 64
_TOP_P_GROWTH = 8
# Drawing from a long distribution walks block sums first (see draw).
_DRAW_BLOCK = 1024


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; over the whole context
    presence_penalty: float = 0.0  # over generated tokens only
    frequency_penalty: float = 0.0  # over generated tokens only
    seed: int | None = None  # None = fresh entropy

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """Build from user options (a request body, CLI flags); validates."""
        if not isinstance(d, Mapping):
            raise UserError(f"sampling options must be a mapping of name to value, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise UserError(
                f"unknown sampling option(s) {', '.join(unknown)}; known options are {', '.join(known)}"
            )
        params = cls(**d)  # type: ignore[arg-type]
        params.validate()
        return params

    def validate(self) -> None:
        """Raise UserError naming the first field outside its allowed range."""
        _number(self.temperature, "temperature", ">= 0 (0 = greedy)", lambda v: v >= 0)
        _integer(self.top_k, "top_k", ">= 0 (0 = off)", lambda v: v >= 0)
        _number(self.top_p, "top_p", "in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _number(self.min_p, "min_p", "in [0, 1) (0 = off)", lambda v: 0 <= v < 1)
        _number(self.repetition_penalty, "repetition_penalty", "> 0 (1 = off)", lambda v: v > 0)
        _number(self.presence_penalty, "presence_penalty", "in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2)
        _number(self.frequency_penalty, "frequency_penalty", "in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _integer(self.seed, "seed", ">= 0 or None (None = random)", lambda v: v >= 0)


def _number(value: Any, name: str, allowed: str, ok) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # NaN fails every comparison, so `ok` rejects it; inf is refused explicitly.
    if not is_number or not math.isfinite(value) or not ok(value):
        raise UserError(f"{name} must be a finite number {allowed}, got {value!r}")


def _integer(value: object, name: str, allowed: str, ok) -> None:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or not ok(value):
        raise UserError(f"{name} must be an integer {allowed}, got {value!r}")


class Sampler:
    """A callable from one step's logits to a token id; owns its RNG."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._penalised = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )

    def __call__(self, logits: np.ndarray, tokens: Sequence[int] | np.ndarray, n_prompt: int) -> int:
        """Pick the next token. logits: (vocab,); tokens: (n_context,), generated from n_prompt."""
        x = self._penalise(logits, tokens, n_prompt)  # (vocab,) float32
        if self.params.temperature == 0.0:
            return _argmax(x)
        ids, p = self._distribution(x)  # (m,) int64 or None for all, (m,) float64
        i = draw(p, self.rng.random())
        return i if ids is None else int(ids[i])

    def probs(self, logits: np.ndarray, tokens: Sequence[int] | np.ndarray, n_prompt: int) -> np.ndarray:
        """The distribution `__call__` samples from: (vocab,) float64 summing to 1.

        A one-hot at the greedy choice when temperature is 0. Uses no randomness.
        """
        x = self._penalise(logits, tokens, n_prompt)  # (vocab,) float32
        out = np.zeros(x.shape[0], dtype=np.float64)  # (vocab,)
        if self.params.temperature == 0.0:
            out[_argmax(x)] = 1.0
            return out
        ids, p = self._distribution(x)
        if ids is None:
            return p
        out[ids] = p
        return out

    # -- steps -------------------------------------------------------------

    def _penalise(self, logits: np.ndarray, tokens: Sequence[int] | np.ndarray, n_prompt: int) -> np.ndarray:
        """Apply the penalties; returns the input itself when none is active."""
        if logits.ndim != 1:
            raise ValueError(f"logits must be one row (vocab,), got shape {logits.shape}")
        if not self._penalised:
            return logits
        prm = self.params
        vocab = logits.shape[0]
        context = np.asarray(tokens, dtype=np.int64)  # (n_context,)
        x = logits.astype(np.float32, copy=True)  # (vocab,)

        if prm.repetition_penalty != 1.0 and context.size:
            seen = _checked_ids(np.unique(context), vocab)  # (n_distinct,)
            v = x[seen]
            x[seen] = np.where(v > 0, v / prm.repetition_penalty, v * prm.repetition_penalty)

        generated = context[n_prompt:]
        if (prm.presence_penalty != 0.0 or prm.frequency_penalty != 0.0) and generated.size:
            ids, counts = np.unique(generated, return_counts=True)  # (n_distinct,) each
            _checked_ids(ids, vocab)
            x[ids] -= prm.presence_penalty + prm.frequency_penalty * counts
        return x

    def _distribution(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Temperature, top-k, top-p, min-p over penalised logits x: (vocab,).

        Returns (ids, p): the surviving token ids (m,) -- None meaning all of
        the vocab in order -- and their renormalised probabilities (m,) float64.
        """
        prm = self.params
        vocab = x.shape[0]

        # top-k on the logits: dividing by a positive temperature keeps the order.
        ids: np.ndarray | None = None
        if 0 < prm.top_k < vocab:
            ids = np.argpartition(x, vocab - prm.top_k)[vocab - prm.top_k :]  # (k,) unordered
            z = x[ids].astype(np.float64)  # (k,)
        else:
            z = x.astype(np.float64)  # (vocab,)
        with np.errstate(invalid="ignore"):  # NaN / all -inf rows are caught just below
            z -= z.max()
            z *= 1.0 / prm.temperature
            p = np.exp(z, out=z)  # (m,), reuses z
            total = p.sum()
        if not (math.isfinite(total) and total > 0):
            raise ValueError("logits contain NaN or +inf, or are all -inf; cannot sample")
        p /= total

        # top-p and min-p each keep a head of the tokens sorted by probability,
        # so together they keep the shorter head. The max token is always kept.
        if prm.top_p < 1.0:
            ids, p = _top_p(ids, p, prm.top_p)
        if prm.min_p > 0.0:
            keep = np.flatnonzero(p >= prm.min_p * p.max())  # (m',)
            ids = keep if ids is None else ids[keep]
            p = p[keep]
        if ids is not None:
            p = p / p.sum()
        return ids, p


def _top_p(ids: np.ndarray | None, p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest most-likely head of p: (m,) whose mass reaches top_p.

    A token is kept when the mass of the tokens before it is below top_p.
    Only a growing head is sorted (by probability, ties by id).
    """
    m = p.shape[0]
    head = min(_TOP_P_FIRST_HEAD, m)
    while True:
        if head < m:
            idx = np.argpartition(p, m - head)[m - head :]  # (head,) unordered
        else:
            idx = np.arange(m)
        token = idx if ids is None else ids[idx]
        order = np.lexsort((token, -p[idx]))  # descending p, then ascending id
        idx = idx[order]
        cdf = np.cumsum(p[idx])  # (head,)
        if cdf[-1] >= top_p or head == m:
            break
        head = min(head * _TOP_P_GROWTH, m)
    # first position whose cumulative mass reaches top_p, kept inclusive
    n_keep = min(int(np.searchsorted(cdf, top_p, side="left")) + 1, head)
    idx = idx[:n_keep]
    return (idx if ids is None else ids[idx]), p[idx]


def draw(p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from p: (m,) for u in [0, 1); never returns a zero-probability index.

    A full cumsum over a 150k vocab is the slowest step of sampling, so a long
    p is cut in blocks: pick the block from the block sums, then walk inside it.
    """
    m = p.shape[0]
    start, block = 0, p
    if m > 4 * _DRAW_BLOCK:
        full = m - m % _DRAW_BLOCK
        sums = p[:full].reshape(-1, _DRAW_BLOCK).sum(axis=1)  # (m // block,)
        if full < m:
            sums = np.append(sums, p[full:].sum())
        block_cdf = np.cumsum(sums)  # (n_blocks,)
        target = u * block_cdf[-1]
        k = min(int(np.searchsorted(block_cdf, target, side="right")), len(sums) - 1)
        while sums[k] == 0:  # only when rounding pushed target onto a zero-mass tail
            k -= 1
        u = (target - (block_cdf[k - 1] if k else 0.0)) / sums[k]  # position inside block k
        start = k * _DRAW_BLOCK
        block = p[start : start + _DRAW_BLOCK]
    cdf = np.cumsum(block)
    # side="right" skips zero-probability entries; rounding can only push past the end.
    j = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(block) - 1)
    while block[j] == 0 and j > 0:
        j -= 1
    return start + j


def _argmax(x: np.ndarray) -> int:
    i = int(np.argmax(x))  # first maximum: ties -> lowest id
    if np.isnan(x[i]):
        raise ValueError("logits contain NaN; cannot pick a token")
    return i


def _checked_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """ids: sorted (n,). Context ids outside the vocab are a caller bug."""
    if ids.size and (ids[0] < 0 or ids[-1] >= vocab):
        raise ValueError(f"context token ids must be in [0, {vocab}), got {ids[0]}..{ids[-1]}")
    return ids


def make_sampler(params: SamplingParams) -> Sampler:
    """Validate params and build the sampler for one generation."""
    params.validate()
    return Sampler(params)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64. x (rows, vocab)."""
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_of_log_probs(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """KL(p || q) per row from log-probabilities (rows, vocab)."""
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row from logits (rows, vocab), in float64."""
    return kl_of_log_probs(log_softmax(p_logits), log_softmax(q_logits))
