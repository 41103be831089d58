"""The targets `sidebyside.py` reports against, and their tables: issue 3's (135M, against both peers)
and issue 12's at 1B (against llama.cpp)."""

from __future__ import annotations

# Issue 3's targets: edge-infer / peer, higher is better except RSS (edge / genai <= 1).
TARGETS = {("decode_tok_s", "genai"): 1.2, ("decode_tok_s", "llamacpp"): 1.2,
           ("prefill_tok_s", "genai"): 1.5, ("prefill_tok_s", "llamacpp"): 2.0}
# Issue 12 part 5 at 1B, 2 threads (against llama.cpp; RSS: edge <= llama.cpp + edge's preallocated KV cache).
TARGETS_1B = {"decode_tok_s": 1.0, "prefill_tok_s": 1.2, "speculative": 1.3}


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def issue3_ratios(med: dict, lengths: list[int]) -> list[str]:
    lines = ["", "## Ratios against issue 3's targets (edge-infer / peer, ratio of medians)", "",
             "| prompt | metric | vs onnxruntime-genai | target | vs llama.cpp | target |",
             "|---:|---|---:|---:|---:|---:|"]
    for n in lengths:
        for f, name in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")):
            cells = []
            for peer in ("genai", "llamacpp"):
                ratio = med[("edge", n)][f] / med[(peer, n)][f]
                target = TARGETS[(f, peer)]
                cells += [f"{ratio:.2f}x", f"≥ {target}x {'met' if ratio >= target else '**missed**'}"]
            lines.append(f"| {n} | {name} | {' | '.join(cells)} |")
        rss = med[("edge", n)]["peak_rss_mib"] / med[("genai", n)]["peak_rss_mib"]
        rss_llama = med[("edge", n)]["peak_rss_mib"] / med[("llamacpp", n)]["peak_rss_mib"]
        lines.append(f"| {n} | peak RSS | {rss:.2f}x | ≤ 1x {'met' if rss <= 1 else '**missed**'} | "
                     f"{rss_llama:.2f}x | (none) |")
    return lines


def targets_1b(meta: dict, med: dict, lengths: list[int], grounded: dict | None) -> list[str]:
    """grounded: the grounded-set totals (sidebyside.grounded_totals), when that set was measured."""
    lines = ["", "## Issue 12's targets at 1B (edge-infer / llama.cpp, ratio of medians)", "",
             "| target | prompt | edge-infer | llama.cpp | ratio | target | |", "|---|---:|---:|---:|---:|---:|---|"]
    for f, name in (("decode_tok_s", "plain decode tok/s"), ("prefill_tok_s", "prefill tok/s")):
        for n in lengths:
            e, l = med[("edge", n)][f], med[("llamacpp", n)][f]
            lines.append(f"| {name} | {n} | {e:.1f} | {l:.1f} | {e / l:.2f}x | ≥ {TARGETS_1B[f]}x | "
                         f"{met(e / l >= TARGETS_1B[f])} |")
    if grounded:
        e, l = grounded["edge-spec"]["median"], grounded["llamacpp"]["median"]
        lines.append(f"| `--speculative auto` decode vs llama.cpp plain, grounded set | chat | {e:.1f} | {l:.1f} | "
                     f"{e / l:.2f}x | ≥ {TARGETS_1B['speculative']}x | {met(e / l >= TARGETS_1B['speculative'])} |")
    for n in lengths:
        e, l, kv = med[("edge", n)]["peak_rss_mib"], med[("llamacpp", n)]["peak_rss_mib"], meta["kv_mib"][n]
        lines.append(f"| peak RSS MiB ≤ llama.cpp's + edge-infer's KV cache ({kv:.0f} MiB) | {n} | {e:.0f} | {l:.0f} | "
                     f"{e / (l + kv):.2f}x of {l + kv:.0f} | ≤ 1x | {met(e <= l + kv)} |")
    return lines
