"""Which GGUF tensors reached the exported graph exactly and which were dequantized once.

For the manifest (`quantization.gguf_tensors`) and the export output: every canonical weight
with its source ggml type(s) and its path:
    exact              the file's blocks went into MatMulNBits / the quantized gather as they are
    residuals folded   Q4_1 / Q4_K blocks as they are, their minimums folded into extra columns
    8-bit blocks widened  8-bit blocks (Q6_K, Q5_0) rounded again in 8-bit blocks of 64 (--gguf-import folded)
    dequantized once   decoded to float once; the graph keeps float (fp32 / fp16 exports, norms,
                       weights kept float by option) or quantizes it once to the export's scheme
"""

from __future__ import annotations

from collections.abc import Set

from edge_infer.export.arch._common import Take
from edge_infer.export.graph import initializer_name

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def import_report(recipe: dict[str, Take], weights, kept: Set[str], quant: str,
                  float_kept: Set[str] = frozenset(), folded: Set[str] = frozenset(),
                  widened: Set[str] = frozenset()) -> dict:
    """{"by_type": {type: {path: count}}, "tensors": {canonical: "TYPE: path"}}; `kept` holds the graph
    initializer names whose source blocks were used as they are, `float_kept` the canonical names an
    option keeps float (--embeddings fp, --lm-head fp), `folded` the graph names whose block residuals
    were folded into the weight (quantize/block_offsets.py: rounded, at most max(d) / 450), `widened` those
    whose 8-bit blocks were rounded again in wider 8-bit blocks (export/quantize_step.py)."""
    tensors: dict[str, str] = {}
    by_type: dict[str, dict[str, int]] = {}
    for canonical, take in recipe.items():
        types = "+".join(sorted({weights.source_type(s) for s in take.sources}))
        graph_name = initializer_name(canonical)
        if graph_name in folded:
            path = "residuals folded"
        elif graph_name in widened:
            path = "8-bit blocks widened"
        elif graph_name in kept:
            path = "exact"
        elif (quant in ("fp32", "fp16") or not canonical.endswith(".weight") or "norm" in canonical
              or canonical in float_kept):
            path = "dequantized once (float in the graph)"
        elif all(t in FLOAT_TYPES for t in types.split("+")):
            path = "float source, quantized once"
        else:
            path = "dequantized once, quantized once"
        tensors[canonical] = f"{types}: {path}"
        counts = by_type.setdefault(types, {})
        counts[path] = counts.get(path, 0) + 1
    return {"by_type": by_type, "tensors": tensors}


def summary_lines(report: dict) -> list[str]:
    return [f"{types}: " + ", ".join(f"{n} {path}" for path, n in sorted(paths.items()))
            for types, paths in sorted(report["by_type"].items())]
