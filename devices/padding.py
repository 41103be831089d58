"""Which padding makes a model's passes batch-invariant on this machine, and why.

Two mechanisms give every pass at least two rows where a kernel needs them:
  * "attention": the graph runs the attention of a one-token pass on a zero second row
    (export/graph.py _one_token_padding; manifest graph.attention_padding "in-graph"); the matmuls
    keep one row. Enough when every matmul gives a row the same bits alone as in a pass of M rows.
  * "rows": Model.forward_rows gives a one-id row a padding id, so the whole pass (matmuls
    included) runs two rows. Needed where a matmul differs between 1 and M rows but agrees from 2
    rows on (a 4-bit MatMulNBits on an AVX-512 AMD EPYC, FACTS.md).
  * "off", only when asked for: neither (the graph's `pad_attention` input at 0). Plain decoding is
    5-14% faster (RESULTS.md), and nothing is batch-invariant: greedy speculation may then differ from
    plain decoding at a near-tie (1 of 8 grounded tasks at 0.5B did).
devices/invariance.py lists the graph's kernel configurations and devices/probe_graphs.py measures
each; `choose` is a pure function of those verdicts: it picks the cheapest mode that makes the passes
agree ("auto"), or checks a forced one, and says why. `invariant` is what
the probe verified under the chosen mode, never a hope: where no mode is enough it is False and the
reason names the kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edge_infer.contract.errors import UserError
from edge_infer.devices.invariance import FROM_TWO, NOT_INVARIANT, ROW_INVARIANT, UNKNOWN, ProbeResult

MODES = ("auto", "attention", "rows", "off")
ENV = "EDGE_INFER_PADDING"  # the padding for tools that cannot pass load(padding=...)


@dataclass(frozen=True)
class Padding:
    """The padding a model runs with, whether the probe verified it batch-invariant, and why."""

    mode: str  # "attention" | "rows" | "off" (asked for) | "none" (a graph that cannot pad: concatenated or static cache)
    invariant: bool  # a position's logits are the same bits however its pass was grouped (probed here)
    reason: str  # one line for people
    forced: bool = False  # chosen by padding= / EDGE_INFER_PADDING rather than by the probe
    probes: tuple[ProbeResult, ...] = ()

    def describe(self) -> str:
        state = "batch-invariant" if self.invariant else "NOT batch-invariant"
        return f"{self.mode}{' (forced)' if self.forced else ''}, {state}: {self.reason}"


def requested(padding: str | None) -> str:
    """The padding asked for: `padding`, else $EDGE_INFER_PADDING, else "auto"; checked."""
    value, source = (padding, "padding") if padding is not None else (os.environ.get(ENV) or "auto", ENV)
    if value not in MODES:
        raise UserError(f"{source}={value!r} is not a padding mode: use {', '.join(MODES)}")
    return value


OFF_REASON = ("turned off by request: one-token passes run GroupQueryAttention's one-row path (and one-row "
              "matmuls), faster, but speculation, prefill chunks and server rows may round differently from them")


def turned_off() -> Padding:
    """padding="off": no padding anywhere, so nothing is claimed invariant (no probe is run)."""
    return Padding("off", False, OFF_REASON, forced=True)


def unpadded(reason: str, asked: str) -> Padding:
    """A graph that cannot pad at all: it keeps its behaviour, and a forced mode is refused."""
    if asked not in ("auto", "off"):
        raise UserError(f"padding={asked!r} cannot be met: {reason}; leave padding at auto")
    return Padding("none", False, reason)


def _why(r: ProbeResult, where: str) -> str:
    detail = f" ({r.detail})" if r.detail else ""
    if r.verdict == FROM_TWO:
        return f"{r.config.describe()} differs between 1 and 2 rows on {where}{detail}"
    if r.verdict == NOT_INVARIANT:
        return f"{r.config.describe()} differs between passes of 2 or more rows on {where}{detail}"
    return f"{r.config.describe()} could not be probed{detail}"


def _and_more(items: list[ProbeResult]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def choose(results: list[ProbeResult], asked: str, where: str = "this CPU") -> Padding:
    """The padding for a shared-cache graph (it pads one-token attention itself) with these probe
    results; where: the machine the verdicts were measured on, for the reason ("this CPU")."""
    probes = tuple(results)
    broken = [r for r in results if r.verdict in (NOT_INVARIANT, UNKNOWN)]
    # GroupQueryAttention runs two rows in both modes; only the matmuls tell the modes apart
    one_row = [r for r in results if r.verdict == FROM_TWO and r.config.op != "GroupQueryAttention"]
    assert all(r.verdict in (ROW_INVARIANT, FROM_TWO, NOT_INVARIANT, UNKNOWN) for r in results)
    if broken:
        mode = asked if asked != "auto" else "attention"
        head = "not verified" if broken[0].verdict == UNKNOWN else "no padding makes passes agree"
        return Padding(mode, False, f"{head}: {_why(broken[0], where)}{_and_more(broken)}", asked != "auto", probes)
    if one_row:
        why = _why(one_row[0], where) + _and_more(one_row)
        if asked == "attention":
            return Padding("attention", False, f"{why}; padding='rows' would make it invariant", True, probes)
        return Padding("rows", True, why, asked == "rows", probes)
    why = (f"every matmul gives a row the same bits alone and in a pass of M rows on {where}; "
           "attention runs 2 rows in the graph")
    if asked == "rows":
        return Padding("rows", True, why + " (attention alone would do)", True, probes)
    return Padding("attention", True, why, asked == "attention", probes)
