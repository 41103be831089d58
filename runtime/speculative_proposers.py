"""Where speculative guesses come from, and how many are worth verifying.

Two sources (see runtime/speculative.py for the loop that verifies them):
- PromptLookup: the continuation of the longest recent n-gram match in the
  prompt and the text so far; free apart from verifying the guesses.
- DraftProposer: a smaller model with the same vocabulary, with its own KV cache
  kept in step with the accepted tokens (trimmed to the common prefix each round).

`AdaptiveProposer` picks, each round, the source and the number of guesses k with the most
expected tokens per unit of cost (`AcceptanceEstimator`), from decayed acceptance counts
and from what passes cost (`PassCosts`: static estimates, or measured seconds
where timing cannot change the output).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from edge_infer.runtime.cache import KVCache
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import Sampler, draw

log = logging.getLogger("edge_infer")

NGRAM_MAX = 4  # lookup tries suffixes of this many tokens first, down to NGRAM_MIN
NGRAM_MIN = 1
# Relative cost of one more token in a target pass (a pass over w tokens costs about
# 1 + VERIFY_COST * (w - 1) one-token passes). Measured on the default model, 2 threads
# (benchmarks/speculative/RESULTS.md): int4 (int8 activations) w=4 1.55, w=8 2.1-2.3,
# w=12 2.8-3.0; fp32 w=4 1.2-1.3, w=8 1.5, w=12 1.6.
VERIFY_COST = {"quantized": 0.2, "float": 0.08}
# A draft guess's cost relative to a target pass, when the config does not say.
# Estimated from the weight bytes of the two models, but never below this floor:
# at 135M parameters the per-node overhead, not the bytes, dominates (int4 draft /
# fp32 target: 10.2 / 22.1 ms = 0.46 on a quiet machine, where the bytes say 0.19).
DRAFT_COST_FLOOR = 0.45
# Greedy drafting stops after a guess the draft itself gives less than this probability.
DRAFT_P_MIN = 0.3
# Acceptance bookkeeping: counts decay by this factor per observed round; the priors are
# (accepted, rejected) pseudo-counts: an n-gram match starts at even odds, a draft model,
# chosen to agree with its target, at 4 in 5.
DECAY = 0.8
LOOKUP_PRIOR = (1.0, 1.0)
DRAFT_PRIOR = (4.0, 1.0)
# Speculate only when the model promises at least this much over a plain step: the
# costs it leaves out (verifying in Python, timing noise) are a few percent.
MIN_GAIN = 1.05
# A draft model that the estimate has switched off is tried again (k = 1) after this many
# rounds, then after twice as many each time it stays off, up to PROBE_MAX: a probe costs a
# catch-up pass of the draft over the tokens it missed.
PROBE_EVERY = 8
PROBE_MAX = 64
PROBE_IF_RATE = 0.95  # no probe when guesses this good would not pay for their cost
# Measured pass costs (where allowed, see PassCosts): the weight of a new sample in the running means, and
# how many samples each mean needs before it replaces the static estimate.
COST_SMOOTHING = 0.1
COST_SAMPLES = 3
CALIBRATE_EVERY = 4  # while one-token target passes are too few, every 4th round is one


# -- choosing the draft length ------------------------------------------------------


class AcceptanceEstimator:
    """Decayed accepted/rejected counts per key -> how many guesses are worth verifying."""

    def __init__(self, max_guesses: int, probe: bool, prior: tuple[float, float] = LOOKUP_PRIOR):
        self.max_guesses = max_guesses
        self.probe = probe  # no free shadow estimate: try k = 1 now and then when switched off
        self.prior = prior  # (accepted, rejected) pseudo-counts
        self.counts: dict[int, list[float]] = {}  # key -> [accepted, rejected]
        self.idle, self.interval = 0, PROBE_EVERY

    def rate(self, key: int) -> float:
        acc, rej = self.counts.get(key, (0.0, 0.0))
        return (acc + self.prior[0]) / (acc + rej + self.prior[0] + self.prior[1])

    def record(self, key: int, proposed: int, accepted: int) -> None:
        c = self.counts.setdefault(key, [0.0, 0.0])
        c[0] = DECAY * c[0] + accepted
        c[1] = DECAY * c[1] + (1.0 if accepted < proposed else 0.0)

    def choose(self, key: int, limit: int, cost: float) -> tuple[int, float]:
        """The k in 0..limit with the most expected tokens per unit of cost (a round of k guesses
        costs 1 + cost * k plain steps), and that ratio (1.0 for k = 0, a plain step)."""
        best_k, best = self._best(min(self.rate(key), 0.999), min(limit, self.max_guesses), cost)
        if best_k:
            self.interval = PROBE_EVERY
        elif self.probe and limit >= 1 and self._best(PROBE_IF_RATE, self.max_guesses, cost)[0]:
            # Off for its acceptance, not its cost: try one guess now and then; each probe that
            # does not switch it back on waits twice as long.
            self.idle += 1
            if self.idle >= self.interval:
                self.idle, self.interval = 0, min(2 * self.interval, PROBE_MAX)
                return 1, 1.0
        return best_k, best

    @staticmethod
    def _best(a: float, most: int, cost: float) -> tuple[int, float]:
        best_k, best = 0, 1.0
        tokens, power = 1.0, 1.0
        for k in range(1, most + 1):
            power *= a
            tokens += power  # 1 + a + ... + a^k
            gain = tokens / (1.0 + cost * k)
            if gain > best and gain >= MIN_GAIN:
                best_k, best = k, gain
        return best_k, best


class PassCosts:
    """What a verified token and a draft pass cost, relative to a one-token target pass.

    Starts from the static estimates. When `learn` is on (runtime/speculative.py says
    where timing may steer the choice) the measured seconds replace them: running
    means of one-token target passes, of the extra seconds per token of wider passes,
    and of draft passes. A load change on a shared machine then moves the choice too.
    """

    def __init__(self, per_token: float, draft: float, learn: bool, learn_draft: bool):
        self.prior_token, self.prior_draft = per_token, draft
        self.learn, self.learn_draft = learn, learn and learn_draft
        self.one: list[float] = [0.0, 0.0]  # [running mean seconds, samples] of one-token target passes
        self.extra: list[float] = [0.0, 0.0]  # the same for seconds per extra token of a wider pass
        self.drafts: list[float] = [0.0, 0.0]  # the same for the draft's passes (one guess each)

    @staticmethod
    def _add(acc: list[float], seconds: float) -> None:
        acc[1] += 1
        acc[0] += (seconds - acc[0]) / min(acc[1], 1 / COST_SMOOTHING)

    def target_pass(self, width: int, seconds: float) -> None:
        if width == 1:
            self._add(self.one, seconds)
        elif self.one[1]:
            self._add(self.extra, max(seconds - self.one[0], 0.0) / (width - 1))

    def draft_pass(self, seconds: float) -> None:
        self._add(self.drafts, seconds)

    def calibrating(self) -> bool:
        """Too few one-token target passes to scale the others by: make this round a plain step."""
        return self.learn and self.one[1] < COST_SAMPLES

    def _relative(self, acc: list[float], prior: float, learn: bool) -> float:
        if not learn or self.one[1] < COST_SAMPLES or acc[1] < COST_SAMPLES:
            return prior
        return min(acc[0] / self.one[0], 4.0)

    @property
    def per_token(self) -> float:
        return self._relative(self.extra, self.prior_token, self.learn)

    @property
    def draft(self) -> float:
        return self._relative(self.drafts, self.prior_draft, self.learn_draft)


def pass_width(odds: Sequence[tuple[int, float]], rows: int, per_token: float, padded: bool) -> int:
    """The width of a batched pass (ids per row) that promises the most tokens per unit of its cost.

    A pass is as wide as its widest row for every row (runtime/cache.py `KVCache.plan`), so one row's
    guesses widen all `rows` rows: a pass of width w costs about 1 + per_token * (rows * w - 1)
    one-token passes, where a lone row's own choice (AcceptanceEstimator.choose) counted only its
    own ids. odds: per row, (guesses it proposes, the chance each is accepted); a row with guesses
    expects 1 + a + ... + a^(w-1) tokens from width w. padded: one-id rows feed a padding id anyway
    (the "rows" padding mode), so width 2 costs what width 1 does. Widening must promise MIN_GAIN
    over width 1, as a lone row's guesses must over a plain step."""
    def ratio(w: int) -> float:
        tokens = sum(sum(a ** j for j in range(min(n, w - 1) + 1)) for n, a in odds)
        return tokens / (1.0 + per_token * (rows * max(w, 2 if padded else 1) - 1))

    base = ratio(1)
    best_w, best = 1, base
    for w in range(2, max((n for n, _ in odds), default=0) + 2):
        r = ratio(w)
        if r > best and r >= MIN_GAIN * base:
            best_w, best = w, r
    return best_w


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

    def __init__(self, draft: Model, cache: KVCache, sampler: Sampler, n_prompt: int, costs: PassCosts):
        self.draft, self.cache, self.sampler, self.n_prompt = draft, cache, sampler, n_prompt
        self.costs = costs
        self.greedy = sampler.params.temperature == 0.0
        self.warned = False

    def room(self, tokens: Sequence[int]) -> int:
        """Guesses that fit the draft cache: it holds tokens + guesses[:-1]."""
        return self.cache.max_length - len(tokens) + 1

    def sync(self, tokens: Sequence[int]) -> np.ndarray:
        """Run the tokens the draft has not seen (reusing its cached prefix); returns logits (vocab,)."""
        from edge_infer.runtime.decode import prefill

        keep = self.cache.reuse(tokens)
        return prefill(self.draft, list(tokens[keep:]), self.cache)

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to k guesses and, when sampling, the draft distributions q (k, vocab) they were drawn from."""
        k = min(k, self.room(tokens))
        if k < 1:
            if not self.warned:
                log.warning("the draft model's context (%d) is full; decoding without it", self.cache.max_length)
                self.warned = True
            return [], None
        clock = time.perf_counter()
        behind = len(tokens) - self.cache.common_prefix(tokens)
        logits = self.sync(tokens)  # (vocab,)
        if behind <= 2:  # a catch-up over many tokens (after plain or lookup rounds) is not a draft step
            self.costs.draft_pass(time.perf_counter() - clock)
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
                g = draw(q, self.sampler.rng.random())
                qs.append(q)
                sure = float(q[g])
            guesses.append(g)
            ctx.append(g)
            if i + 1 == k or sure < DRAFT_P_MIN:
                break
            clock = time.perf_counter()
            logits = self.draft.forward(np.array([[g]], dtype=np.int64), self.cache)[0, -1]  # (vocab,)
            self.costs.draft_pass(time.perf_counter() - clock)
        return guesses, (None if self.greedy else qs)


def estimate_draft_cost(target: Model, draft: Model) -> float:
    """A draft token's cost relative to a target pass, from the weight bytes of the two folders."""
    def weight_bytes(m: Model) -> int:
        return sum(int(f.get("size", 0)) for f in m.manifest.files.values())

    ratio = weight_bytes(draft) / max(weight_bytes(target), 1)
    return max(DRAFT_COST_FLOOR, min(ratio, 1.0))


class AdaptiveProposer:
    """The guess sources of one generation, each with its own acceptance estimate.

    Each round takes the source that promises the most tokens per unit of cost:
    lookup guesses cost only their verification, draft guesses also the draft's
    passes. A lookup proposal that was not used is still scored against the tokens
    that came out (a free estimate), so lookup is picked up again when it turns good.
    """

    def __init__(self, model: Model, sampler: Sampler, ids: list[int], max_guesses: int, use_lookup: bool,
                 draft: Model | None = None, draft_cache: KVCache | None = None, draft_cost: float | None = None):
        """`draft` (checked by the caller) adds the draft source, with its cache `draft_cache`;
        `draft_cost` None means estimated from the weights, then measured where allowed."""
        q = model.manifest.quantization
        int8_activations = q.int8_activations
        prior_draft = draft_cost
        if draft is not None and prior_draft is None:
            prior_draft = estimate_draft_cost(model, draft)
        self.costs = PassCosts(VERIFY_COST["quantized" if q.bits else "float"], prior_draft or 0.0,
                               learn=sampler.params.temperature == 0.0
                               and (not int8_activations or getattr(model, "batch_invariant", False)),
                               learn_draft=draft_cost is None)
        self.max_guesses = max_guesses
        self.lookup = PromptLookup() if use_lookup else None
        self.lookup_acceptance = AcceptanceEstimator(max_guesses, probe=False)
        self.drafter: DraftProposer | None = None
        if draft is not None:
            assert draft_cache is not None, "a draft needs its cache"
            self.drafter = DraftProposer(draft, draft_cache, sampler, len(ids), self.costs)
            self.draft_acceptance = AcceptanceEstimator(max_guesses, probe=True, prior=DRAFT_PRIOR)
            if self.drafter.room(ids) > 1:
                self.drafter.sync(ids)  # the draft's prompt pass, before the first token
        self.rounds = 0
        self.source = ""  # "lookup" | "draft" | "" (a plain step) for the current round
        self.key = 0
        self.unused: list[int] = []  # a lookup proposal this round did not verify

    def propose(self, tokens: list[int], limit: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to `limit` guesses after tokens, and the draft distributions when sampling from a draft."""
        self.rounds += 1
        self.source, self.unused = "", []
        found: list[int] = []
        k_lookup, gain_lookup = 0, 1.0
        if self.lookup is not None:
            found, self.key = self.lookup.propose(tokens, min(limit, self.max_guesses))
            if found:
                k_lookup, gain_lookup = self.lookup_acceptance.choose(self.key, len(found), self.costs.per_token)
        if self.costs.calibrating() and self.rounds % CALIBRATE_EVERY == 1:
            k_lookup = 0  # a plain step now and then until one-token passes are timed
        elif self.drafter is not None:
            cost = self.costs.per_token + self.costs.draft
            k_draft, gain_draft = self.draft_acceptance.choose(0, limit, cost)
            if k_draft and (gain_draft > gain_lookup or not k_lookup):  # (a probe reports gain 1.0)
                guesses, qs = self.drafter.propose(tokens, k_draft)
                if guesses:
                    self.source, self.unused = "draft", found
                    return guesses, qs
        if k_lookup:
            self.source = "lookup"
            return found[:k_lookup], None
        self.unused = found
        return [], None

    def odds(self) -> float:
        """The estimated chance that each of this round's guesses is accepted (0.0 for a plain step)."""
        if self.source == "draft":
            return self.draft_acceptance.rate(0)
        return self.lookup_acceptance.rate(self.key) if self.source == "lookup" else 0.0

    def record(self, guesses: list[int], accepted: int, emitted: list[int]) -> None:
        """Update the estimates after a round that produced `emitted` (accepted guesses + one token)."""
        if self.source == "draft":
            self.draft_acceptance.record(0, len(guesses), accepted)
        elif self.source == "lookup":
            self.lookup_acceptance.record(self.key, len(guesses), accepted)
        if self.unused:  # how many of the unused lookup guesses match what came out
            n = min(len(self.unused), len(emitted))
            agree = next((i for i in range(n) if self.unused[i] != emitted[i]), n)
            self.lookup_acceptance.record(self.key, n, agree)

