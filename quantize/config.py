"""How to quantize a graph: one frozen record, checked once (`validate`), from the CLI through the rewrite
to the manifest (its fields are contract.quantization.QuantSettings, which the runtime reads back)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_infer.contract.errors import UserError
from edge_infer.contract.quantization import QuantSettings

from .search import SEARCH_MAX_BLOCK

EMBED_GATHER = "/model/embed_tokens/Gather"
LM_HEAD_MATMUL = "/lm_head/MatMul"
LM_HEAD_TRANSPOSE = "/lm_head/Transpose"
CHOICES = {"int8": 8, "int4": 4, "fp": None}
# lm_head only: "rescore" (a 4-bit scan, its best candidates recomputed from the 8-bit table:
# quantize/rescore.py), "auto" (rescore for large vocabularies, int8 otherwise).
LM_HEAD_CHOICES = {**CHOICES, "rescore": 8}


@dataclass(frozen=True)
class QuantConfig(QuantSettings):
    """How to quantize a graph: the settings the manifest records (contract/quantization.py), checked.

    bits/block_size/symmetric/accuracy_level apply to every linear MatMul; `embeddings` and
    `lm_head` pick the embedding table's and lm_head's own width (same block size and mapping).
    `exclude` holds node-name substrings kept in float; a match on "/lm_head/MatMul" or
    "/model/embed_tokens/Gather" counts as choosing "fp" for that tensor. `method`: "search"
    (least-squares scale per block, blocks <= 32) or "rtn" (round to nearest).
    """

    accuracy_level: int = 4  # narrowed from QuantSettings: a config to quantize with always names one
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, quant: str, block_size: int = 32, symmetric: bool = False, accuracy_level: int = 4,
                     embeddings: str = "int8", lm_head: str = "auto", rounding: str = "search") -> QuantConfig:
        """What `--quant int4|int8` and the quantization options of `export` and `quantize` ask for."""
        if quant not in ("int8", "int4"):
            raise UserError(f"quantization to '{quant}' is not supported: use int8 or int4")
        return cls(bits=8 if quant == "int8" else 4, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
                   embeddings=embeddings, lm_head=lm_head, method=rounding)

    def validate(self) -> QuantConfig:
        if self.bits not in (4, 8):
            raise UserError(f"quantization bits={self.bits!r} is not supported: use 4 or 8")
        bs = self.block_size
        if not (isinstance(bs, int) and 16 <= bs <= 256 and bs & (bs - 1) == 0):
            raise UserError(
                f"quantization block_size={bs!r} is not supported: use a power of two from 16 to 256 (32 is the usual)"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(
                f"accuracy_level={self.accuracy_level!r} is not valid: use 0 (float activations) "
                "to 4 (int8 activations, fastest on CPU)"
            )
        if self.method not in ("search", "rtn"):
            raise UserError(f"method={self.method!r} is not valid: use 'search' (least-squares scales) or 'rtn'")
        for field, choices in (("embeddings", CHOICES), ("lm_head", [*LM_HEAD_CHOICES, "auto"])):
            value = getattr(self, field)
            if value not in choices:
                raise UserError(f"{field}={value!r} is not valid: use one of {', '.join(choices)}")
        if (self.exclude is None or isinstance(self.exclude, str)
                or not all(isinstance(s, str) and s for s in self.exclude)):
            raise UserError(f"exclude={self.exclude!r} must be a tuple of non-empty node-name substrings")
        return self

    @property
    def rounding(self) -> str:
        """How float weights are rounded to 4 bits: "search" up to blocks of SEARCH_MAX_BLOCK; at larger
        blocks the search's lower weight error came from clipping outliers and measured worse
        perplexity on the default model (benchmarks/QUALITY.md), so those round to nearest."""
        return "search" if self.method == "search" and self.block_size <= SEARCH_MAX_BLOCK else "rtn"

    def lm_head_choice(self) -> str:
        return "fp" if self._excluded(LM_HEAD_MATMUL) else self.lm_head

    def for_vocab(self, vocab: int, tied: bool) -> QuantConfig:
        """This config with `lm_head="auto"` decided for a vocabulary of `vocab` tokens (quantize/rescore.py):
        a tied lm_head shares the embeddings' table, so it follows `embeddings` unless that is int8."""
        from .rescore import auto_choice

        if self.lm_head != "auto":
            return self
        if tied and self.embeddings_choice() != "int8":
            return replace(self, lm_head=self.embeddings_choice())
        return replace(self, lm_head=auto_choice(vocab))

    def embeddings_choice(self) -> str:
        return "fp" if self._excluded(EMBED_GATHER) else self.embeddings

    def _excluded(self, node_name: str) -> bool:
        return any(s in node_name for s in self.exclude or ())
