"""The manifest's `quantization` record, typed: written once at export or quantize, read back by the runtime.

    {"scheme": "int4", "bits": 4, "block_size": 32, "symmetric": false, "accuracy_level": 4,
     "embeddings": "int8", "lm_head": "int8", "exclude": [], "method": "search",
     "summary": {...}, ...}                                 <- QuantRecord.to_manifest()

`QuantSettings` is how the weights were quantized (quantize/config.py's QuantConfig extends it
with the checks and choices the rewrite needs); `QuantRecord` is the whole section: the scheme,
the settings (None for float weights) and `details`, the report of what was done (summary,
GGUF import counts, ...), kept for people and tools but never read by the runtime. The JSON is
flat, as in every folder exported before this type existed, so old folders read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

FLOAT_SCHEMES = ("fp32", "fp16")


@dataclass(frozen=True)
class QuantSettings:
    """How the weights were quantized (MatMulNBits or, in the npu profile, DequantizeLinear blocks)."""

    bits: int
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int | None = 4  # MatMulNBits compute: 4 = int8 activations, 0 = float; None: not MatMulNBits
    embeddings: str = "int8"  # "int8" | "int4" | "fp" (the npu profile writes its own words)
    lm_head: str = "int8"
    exclude: tuple[str, ...] | None = ()  # node-name substrings kept in float; None: not recorded (npu)
    method: str | None = "search"  # 4-bit rounding of float weights: "search" | "rtn"

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(QuantSettings):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if f.name == "exclude" else value
        return out

    @classmethod
    def from_manifest(cls, raw: Mapping[str, Any]) -> QuantSettings:
        """From a record whose `bits` is set. `accuracy_level`, `method` and `exclude` stay None when absent
        (the npu profile writes none of them), so a record reads back as it was written."""
        accuracy, method, exclude = raw.get("accuracy_level"), raw.get("method"), raw.get("exclude")
        return cls(bits=int(raw["bits"]), block_size=int(raw.get("block_size", 32)),
                   symmetric=bool(raw.get("symmetric", False)),
                   accuracy_level=None if accuracy is None else int(accuracy),
                   embeddings=str(raw.get("embeddings", "int8")), lm_head=str(raw.get("lm_head", "int8")),
                   exclude=None if exclude is None else tuple(str(s) for s in exclude),
                   method=None if method is None else str(method))


SETTING_KEYS = tuple(f.name for f in fields(QuantSettings))


@dataclass(frozen=True)
class QuantRecord:
    """The manifest's `quantization` section."""

    scheme: str  # "fp32" | "fp16" | "int8" | "int4"
    settings: QuantSettings | None = None  # None: float weights
    details: Mapping[str, Any] = field(default_factory=dict)  # what was done, for people; not read back

    @property
    def bits(self) -> int | None:
        return self.settings.bits if self.settings is not None else None

    @property
    def int8_activations(self) -> bool:
        """Quantized weights whose activations may be int8 (accuracy_level other than 0; an unknown level
        counts as int8, the cautious reading): their rounding can depend on how a pass is batched."""
        return self.settings is not None and self.settings.accuracy_level != 0

    def describe(self, accuracy: bool = False) -> str:
        """"int4 (block 32, asym, embeddings int8, lm_head int8)" for `inspect`; with `accuracy`, the
        accuracy level instead of the embedding policy (`bench`)."""
        s = self.settings
        if s is None:
            return self.scheme
        mapping = "sym" if s.symmetric else "asym"
        tail = f"accuracy_level {s.accuracy_level}" if accuracy else f"embeddings {s.embeddings}, lm_head {s.lm_head}"
        return f"{self.scheme} (block {s.block_size}, {mapping}, {tail})"

    def to_manifest(self) -> dict[str, Any]:
        body = {"scheme": self.scheme, **(self.settings.to_manifest() if self.settings is not None else {})}
        clash = set(body) & set(self.details)
        assert not clash, f"quantization details may not overwrite {sorted(clash)}"
        return {**body, **self.details}

    @classmethod
    def from_manifest(cls, raw: Mapping[str, Any], dtype: str) -> QuantRecord:
        """The section as written by any edge-infer (an absent section or scheme: float weights of `dtype`)."""
        scheme = str(raw.get("scheme") or dtype)
        settings = QuantSettings.from_manifest(raw) if raw.get("bits") else None
        details = {k: v for k, v in raw.items() if k != "scheme" and k not in SETTING_KEYS}
        return cls(scheme, settings, details)
