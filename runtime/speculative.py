"""Speculative decoding: guess several tokens cheaply, check them all in one target pass.

Decode is serial and memory-bound: a pass over k+1 tokens costs little more than
a pass over one, so good guesses multiply decode speed. Each round:

  1. propose   up to k guesses g1..gk after the last token t
               - prompt lookup: the continuation of the longest recent n-gram
                 match in the prompt and the text so far (no second model)
               - draft model: k tokens from a smaller model with the same vocabulary
  2. verify    feed [t, g1..gk] to the target in ONE pass, keep k+1 logit rows
  3. accept    walk the rows: row i decides g(i+1); stop at the first rejection,
               where the target's own choice (the correction) is taken instead;
               if all k pass, row k gives one more token (the bonus)
  4. roll back trim the target cache past the last accepted guess; the accepted
               prefix is never recomputed. The draft's cache is trimmed to the
               common prefix the next time it proposes.

Exactness:
- greedy: a guess is accepted iff it equals the target's argmax, and the
  correction is that argmax, so the ids equal plain decoding's.
- sampling: the accept/resample rule of Leviathan et al. / Chen et al. (2023):
  accept g with probability min(1, p(g)/q(g)), on rejection draw from
  norm(max(p - q, 0)); p and q are the target's and the draft's distributions
  from `Sampler.probs` (same temperature, top-k/top-p/min-p, penalties). A lookup
  guess is a one-hot q. Each emitted token is then distributed exactly as the
  target's sampler would draw it.

The draft length is chosen each round from decayed counts of accepted and
rejected guesses (per n-gram length for lookup): with per-guess acceptance a,
verifying k guesses yields (1 - a^(k+1)) / (1 - a) tokens for a relative cost
of 1 + cost_per_guess * k, and the k with the best ratio is taken (0 means a
plain decode step). The choice depends on tokens only, never on timings, so a
seeded sampled run is reproducible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from edge_infer.runtime.cache import KVCache
from edge_infer.runtime.errors import UserError
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import Sampler

log = logging.getLogger("edge_infer")

MODES = ("off", "lookup", "draft")
DEFAULT_NUM_SPECULATIVE = {"lookup": 10, "draft": 8}
MAX_NUM_SPECULATIVE = 32
NGRAM_MAX = 4  # lookup tries suffixes of this many tokens first, down to NGRAM_MIN
NGRAM_MIN = 1
# Relative cost of one more token in a target pass (a pass over w tokens costs about
# 1 + VERIFY_COST * (w - 1) single-token passes). Measured on the default model,
# 2 threads: int4 (int8-activation MatMulNBits) w=2 1.2-1.45, w=4 1.65-2.2, w=8 2.3-2.9;
# fp32 w=2 1.05, w=4 1.3, w=8 1.6 (benchmarks/speculative/RESULTS.md).
VERIFY_COST = {"quantized": 0.25, "float": 0.08}
# A draft token's cost relative to a target pass, when the config does not say.
# Estimated from the weight bytes of the two models, but never below this floor:
# at 135M parameters the per-node overhead, not the bytes, dominates (int4 draft /
# fp32 target measured 0.31, where the bytes say 0.19).
DRAFT_COST_FLOOR = 0.3
# Greedy drafting stops after a guess the draft itself gives less than this probability.
DRAFT_P_MIN = 0.3
# Acceptance bookkeeping: counts decay by this factor per observed round;
# the prior is PRIOR_ACCEPT accepted and PRIOR_REJECT rejected guesses.
DECAY = 0.8
PRIOR_ACCEPT, PRIOR_REJECT = 1.0, 1.0
# A draft model that the estimate has switched off is tried again (k = 1) after this many rounds.
PROBE_EVERY = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. `mode`: "lookup" (prompt n-grams) or "draft" (with `draft`)."""

    mode: str = "lookup"
    draft: Model | None = field(default=None, repr=False)  # mode "draft": a loaded draft model
    num_speculative: int | None = None  # most guesses per target pass; None = the mode's default
    draft_cost: float | None = None  # draft token / target pass cost; None = estimated

    def __post_init__(self):
        if self.mode not in ("lookup", "draft"):
            raise UserError(f"speculative mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "draft" and self.draft is None:
            raise UserError("speculative mode 'draft' needs a draft model (--draft MODEL)")
        if self.mode == "lookup" and self.draft is not None:
            raise UserError("a draft model was given but the speculative mode is 'lookup'; use mode 'draft'")
        n = self.num_speculative
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NUM_SPECULATIVE):
            raise UserError(f"num_speculative must be an integer from 1 to {MAX_NUM_SPECULATIVE}, got {n!r}")
        c = self.draft_cost
        if c is not None and not (isinstance(c, (int, float)) and 0 <= c <= 10):
            raise UserError(f"draft_cost must be a number from 0 to 10, got {c!r}")

    @property
    def max_guesses(self) -> int:
        return self.num_speculative or DEFAULT_NUM_SPECULATIVE[self.mode]


def speculative_config(mode: str | None, draft: Model | None = None,
                       num_speculative: int | None = None) -> SpeculativeConfig | None:
    """From user options (CLI flags, a request body): None for mode None or "off"."""
    if mode is None or mode == "off":
        if draft is not None:
            raise UserError("a draft model was given but speculation is off; add --speculative draft")
        return None
    return SpeculativeConfig(mode=mode, draft=draft, num_speculative=num_speculative)


def check_draft(target: Model, draft: Model) -> None:
    """Refuse a draft whose token ids do not mean the same as the target's (UserError)."""
    tm, dm = target.manifest, draft.manifest
    tw, dw = tm.geometry.vocab_size, dm.geometry.vocab_size
    if tw != dw:
        raise UserError(f"draft model {dm.folder} has {dw} logits per token but the target {tm.folder} has {tw}; "
                        f"a draft must share the target's tokenizer and vocabulary")
    tf, df = tm.files.get(tm.tokenizer.file, {}), dm.files.get(dm.tokenizer.file, {})
    if tf.get("sha256") and tf.get("sha256") == df.get("sha256"):
        return  # the very same tokenizer file
    tv = target.tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
    dv = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
        shown = ", ".join(f"{t!r}={i}" for t, i in diff)
        raise UserError(f"draft model {dm.folder} has a different vocabulary from the target {tm.folder} "
                        f"({len(dv)} vs {len(tv)} tokens; differing entries include {shown}); "
                        f"a draft must use the same tokenizer")


def load_draft(target: Model, path: str, device: str = "auto", threads: int | None = None) -> Model:
    """Load a draft model for `target` and check its vocabulary (UserError if it does not match)."""
    from edge_infer.runtime.model import load

    draft = load(path, device=device, threads=threads)
    check_draft(target, draft)
    return draft


@dataclass
class SpecStats:
    """Counters one speculative generation fills in (read by stream_generate's Timings)."""

    mode: str = "off"
    proposed: int = 0  # guesses sent to the target for verification
    accepted: int = 0  # guesses the target accepted
    target_passes: int = 0  # target decode passes after the prompt (each verifies 0..k guesses)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


# -- choosing the draft length ------------------------------------------------------


class DraftLength:
    """Decayed accepted/rejected counts per key -> how many guesses are worth verifying."""

    def __init__(self, max_guesses: int, cost_per_guess: float, probe: bool):
        self.max_guesses = max_guesses
        self.cost = cost_per_guess
        self.probe = probe  # no free shadow estimate: try k = 1 now and then when switched off
        self.counts: dict[int, list[float]] = {}  # key -> [accepted, rejected]
        self.idle = 0

    def rate(self, key: int) -> float:
        acc, rej = self.counts.get(key, (0.0, 0.0))
        return (acc + PRIOR_ACCEPT) / (acc + rej + PRIOR_ACCEPT + PRIOR_REJECT)

    def record(self, key: int, proposed: int, accepted: int) -> None:
        c = self.counts.setdefault(key, [0.0, 0.0])
        c[0] = DECAY * c[0] + accepted
        c[1] = DECAY * c[1] + (1.0 if accepted < proposed else 0.0)

    def choose(self, key: int, limit: int) -> int:
        """The k in 0..limit with the most expected tokens per unit of cost."""
        a = min(self.rate(key), 0.999)
        best_k, best = 0, 1.0
        tokens, power = 1.0, 1.0
        for k in range(1, min(limit, self.max_guesses) + 1):
            power *= a
            tokens += power  # 1 + a + ... + a^k
            gain = tokens / (1.0 + self.cost * k)
            if gain > best:
                best_k, best = k, gain
        if best_k == 0 and self.probe and limit >= 1:
            self.idle += 1
            if self.idle >= PROBE_EVERY:
                self.idle = 0
                return 1
        return best_k


# -- proposers -----------------------------------------------------------------------


class PromptLookup:
    """Guesses the continuation of the longest recent n-gram match in the token history."""

    def __init__(self, ngram_min: int = NGRAM_MIN, ngram_max: int = NGRAM_MAX):
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index after its latest occurrence
        self.indexed = 0  # n-grams ending before this index are in last_end

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to k guesses to follow `tokens`, and the match length (0: no match)."""
        # Index every n-gram that has at least one token after it, except the suffix itself.
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:
                if n <= end:
                    self.last_end[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))
        for n in self.sizes:
            if n > len(tokens):
                continue
            start = self.last_end.get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return list(tokens[start:start + k]), n
        return [], 0


class DraftProposer:
    """Guesses from a draft model that keeps its own KV cache in step with the accepted tokens."""

    def __init__(self, draft: Model, cache: KVCache, sampler: Sampler, n_prompt: int):
        self.draft, self.cache, self.sampler, self.n_prompt = draft, cache, sampler, n_prompt
        self.greedy = sampler.params.temperature == 0.0
        self.warned = False

    def room(self, tokens: Sequence[int]) -> int:
        """Guesses that fit the draft cache: it holds tokens + guesses[:-1]."""
        return self.cache.max_length - len(tokens) + 1

    def sync(self, tokens: Sequence[int]) -> np.ndarray:
        """Run the tokens the draft has not seen (reusing its cached prefix); returns logits (vocab,)."""
        from edge_infer.runtime.generate import prefill

        keep = min(self.cache.common_prefix(tokens), len(tokens) - 1)
        self.cache.trim(keep)
        return prefill(self.draft, list(tokens[keep:]), self.cache)

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to k guesses and, when sampling, the draft distributions q (k, vocab) they were drawn from."""
        k = min(k, self.room(tokens))
        if k < 1:
            if not self.warned:
                log.warning("the draft model's context (%d) is full; decoding without it", self.cache.max_length)
                self.warned = True
            return [], None
        logits = self.sync(tokens)  # (vocab,)
        ctx = list(tokens)
        guesses: list[int] = []
        qs: list[np.ndarray] = []
        for i in range(k):
            if self.greedy:
                g = self.sampler(logits, ctx, self.n_prompt)
                z = logits.astype(np.float64) - logits[g]
                sure = 1.0 / np.exp(z).sum()  # the draft's own probability of g
            else:
                q = self.sampler.probs(logits, ctx, self.n_prompt)  # (vocab,)
                g = draw(q, self.sampler.rng)
                qs.append(q)
                sure = float(q[g])
            guesses.append(g)
            ctx.append(g)
            if i + 1 == k or sure < DRAFT_P_MIN:
                break
            logits = self.draft.forward(np.array([[g]], dtype=np.int64), self.cache)[0, -1]  # (vocab,)
        return guesses, (None if self.greedy else qs)


def estimate_draft_cost(target: Model, draft: Model) -> float:
    """A draft token's cost relative to a target pass, from the weight bytes of the two folders."""
    def weight_bytes(m: Model) -> int:
        return sum(int(f.get("size", 0)) for f in m.manifest.files.values())

    ratio = weight_bytes(draft) / max(weight_bytes(target), 1)
    return max(DRAFT_COST_FLOOR, min(ratio, 1.0))


# -- the loop ------------------------------------------------------------------------


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A draw from p: (vocab,) non-negative, summing to about 1; never a zero-probability index."""
    cdf = np.cumsum(p)
    j = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(p) - 1)
    while p[j] == 0 and j > 0:  # only when rounding lands past the last non-zero entry
        j -= 1
    return j


def verify(rows: np.ndarray, guesses: list[int], qs: list[np.ndarray] | None, tokens: list[int],
           n_prompt: int, sampler: Sampler) -> tuple[int, int]:
    """Decide the guesses from the target's rows (k+1, vocab); returns (accepted, next token).

    Row i holds the target's logits after tokens + guesses[:i]. `qs` are the
    draft's distributions (None: each guess is certain, as for lookup or a greedy draft).
    """
    ctx = tokens + guesses
    n = len(tokens)
    greedy = sampler.params.temperature == 0.0
    for i, g in enumerate(guesses):
        if greedy:
            choice = sampler(rows[i], ctx[:n + i], n_prompt)
            if choice != g:
                return i, choice
            continue
        p = sampler.probs(rows[i], ctx[:n + i], n_prompt)  # (vocab,) the target's distribution
        qg = 1.0 if qs is None else float(qs[i][g])
        if sampler.rng.random() * qg < p[g]:  # accept with probability min(1, p(g) / q(g))
            continue
        if qs is None:
            residual = p.copy()
            residual[g] = 0.0
        else:
            residual = np.maximum(p - qs[i], 0.0)  # (vocab,)
        if not residual.sum() > 0:  # p == q up to rounding: nothing left to correct towards
            residual = p
        return i, draw(residual, sampler.rng)
    return len(guesses), sampler(rows[len(guesses)], ctx, n_prompt)  # the bonus token


def speculative_step(model: Model, ids: list[int], cache: KVCache, sampler: Sampler, max_tokens: int,
                     config: SpeculativeConfig, stats: SpecStats | None = None,
                     draft_cache: KVCache | None = None) -> Iterator[int]:
    """Like generate_step: yield up to max_tokens ids, stopping after an eos id, but verify guesses
    in batches. `draft_cache` (mode "draft") lets a caller keep the draft's prefix across turns."""
    from edge_infer.runtime.generate import prefill

    stats = stats if stats is not None else SpecStats()
    stats.mode = config.mode
    eos = model.tokenizer.eos_ids
    n_prompt = len(ids)
    reuse = min(cache.common_prefix(ids), n_prompt - 1)  # at least one token must run to get logits
    cache.trim(reuse)

    lookup: PromptLookup | None = None
    drafter: DraftProposer | None = None
    verify_cost = VERIFY_COST["quantized" if model.manifest.quantization.get("bits") else "float"]
    if config.mode == "lookup":
        lookup = PromptLookup()
        length = DraftLength(config.max_guesses, verify_cost, probe=False)
    else:
        draft = config.draft
        assert draft is not None
        check_draft(model, draft)
        if draft_cache is None:
            draft_cache = draft.new_cache(max_length=min(draft.max_length, cache.max_length))
        drafter = DraftProposer(draft, draft_cache, sampler, n_prompt)
        cost = config.draft_cost if config.draft_cost is not None else estimate_draft_cost(model, draft)
        length = DraftLength(config.max_guesses, verify_cost + cost, probe=True)
        if drafter.room(ids) > 1:
            drafter.sync(ids)  # the draft's prompt pass, before the first token

    logits = prefill(model, ids[reuse:], cache)  # (vocab,)
    tokens = list(ids)
    token = sampler(logits, tokens, n_prompt)
    tokens.append(token)
    yield token
    produced = 1
    while produced < max_tokens and token not in eos:
        assert cache.offset == len(tokens) - 1, "the target cache holds every token but the last"
        limit = max_tokens - produced - 1  # a round yields up to k + 1 tokens
        qs: list[np.ndarray] | None = None
        if lookup is not None:
            guesses, key = lookup.propose(tokens, min(limit, config.max_guesses))
            k = length.choose(key, len(guesses)) if guesses else 0
            shadow = guesses[0] if guesses and k == 0 else None
            guesses = guesses[:k]
        else:
            key, shadow = 0, None
            k = length.choose(key, limit)
            guesses, qs = drafter.propose(tokens, k) if k else ([], None)

        stats.target_passes += 1
        start = cache.offset
        x = np.array([[token] + guesses], dtype=np.int64)  # (1, k + 1)
        rows = model.forward(x, cache, logits_to_keep=len(guesses) + 1)[0]  # (k + 1, vocab)
        accepted, nxt = verify(rows, guesses, qs, tokens, n_prompt, sampler)
        cache.trim(start + 1 + accepted)  # keep `token` and the accepted guesses; drop the rest
        if guesses:
            stats.proposed += len(guesses)
            stats.accepted += accepted
            length.record(key, len(guesses), accepted)
        elif shadow is not None:  # a lookup guess left unverified: was it right? (free estimate)
            length.record(key, 1, int(shadow == nxt))

        for token in guesses[:accepted] + [nxt]:
            tokens.append(token)
            yield token
            produced += 1
            if produced == max_tokens or token in eos:
                return
