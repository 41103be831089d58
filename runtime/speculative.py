"""Speculative decoding: guess several tokens cheaply, check them all in one target pass.

Decode is serial and memory-bound: a pass over k+1 tokens costs little more than
a pass over one, so good guesses multiply decode speed. Each round:

  1. propose   up to k guesses g1..gk after the last token t
               - prompt lookup: the continuation of the longest recent n-gram
                 match in the prompt and the text so far (no second model)
               - draft model: k tokens from a smaller model with the same vocabulary;
                 in this mode lookup guesses are taken instead in rounds where
                 they promise more (they cost no draft passes)
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

The source and the draft length are chosen each round from decayed counts of
accepted and rejected guesses (per n-gram length for lookup): with per-guess
acceptance a, verifying k guesses yields (1 - a^(k+1)) / (1 - a) tokens for a
relative cost of 1 + cost_per_guess * k, and the k with the best ratio is taken
(0 means a plain decode step, so guesses that keep failing switch speculation
off). The costs are measured as decoding runs only where timing cannot change
the output: greedy decoding on a graph whose logits do not depend on how many
tokens a pass holds. Model.forward_rows makes that so on every shared-buffer
export (a one-id pass is padded to two ids, see there), int4 and int8 included;
sampled runs keep the static estimates, so the same seed gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_infer.contract.errors import UserError
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import Sampler, draw

MODES = ("off", "lookup", "draft", "auto")
DEFAULT_NUM_SPECULATIVE = {"lookup": 10, "draft": 8}
MAX_NUM_SPECULATIVE = 32



@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate. `mode`: "lookup" (prompt n-grams) or "draft" (with `draft`)."""

    mode: str = "lookup"
    draft: Model | None = field(default=None, repr=False)  # mode "draft": a loaded draft model
    num_speculative: int | None = None  # most guesses per target pass; None = the mode's default
    draft_cost: float | None = None  # a draft guess / a target pass; None = estimated (measured if greedy)
    use_lookup: bool = True  # mode "draft": take free prompt-lookup guesses when they promise more

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
    """From user options (CLI flags, a request body): None for mode None or "off".

    "auto" (the default) is the draft model when one is given, else prompt lookup; either way
    each round verifies as many guesses as pay for themselves, none when they keep failing.
    """
    if mode is None or mode == "off":
        if draft is not None:
            raise UserError("a draft model was given but speculation is off; add --speculative draft")
        return None
    if mode == "auto":
        mode = "draft" if draft is not None else "lookup"
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
    """Load a draft model for `target` and check its vocabulary (UserError if it does not match).

    A target loaded with shared_threads=True shares its thread pool with the draft (fastest);
    otherwise the draft's threads do not spin, so they leave the cores to the target's.
    """
    from edge_infer.runtime.model import load

    shared = getattr(target, "shared_threads", False)
    draft = load(path, device=device, threads=threads, allow_spinning=shared, shared_threads=shared)
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



def verify(rows: np.ndarray, guesses: list[int], qs: list[np.ndarray] | None, tokens: list[int],
           n_prompt: int, sampler: Sampler) -> tuple[int, int]:
    """Decide the guesses from the target's rows (k+1, vocab); returns (accepted, next token).

    Row i holds the target's logits after tokens + guesses[:i]. `qs` are the
    draft's distributions (None: each guess is certain, as for lookup or a greedy draft).
    """
    if not guesses:  # a plain step (any sampler callable will do)
        return 0, sampler(rows[0], tokens, n_prompt)
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
        return i, draw(residual, sampler.rng.random())
    return len(guesses), sampler(rows[len(guesses)], ctx, n_prompt)  # the bonus token
