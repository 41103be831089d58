"""The manifest's `embedding` section: how a model folder's hidden states become one vector per text.

An embedding folder's graph outputs `last_hidden_state` (batch, sequence_length, hidden); the
runtime pools it over each text's real tokens, may truncate it (Matryoshka models only) and
L2-normalizes it, as this record says. Export writes it (from the source folder's
sentence-transformers files or the decoder's defaults), runtime/embed.py reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_infer.contract.errors import ModelFileError

TASK_EMBED = "embed"  # the manifest's top-level "task" of an embedding folder (absent: text generation)
POOLINGS = ("mean", "cls", "last_token", "max")


@dataclass(frozen=True)
class EmbeddingRecord:
    pooling: str  # one of POOLINGS, over the tokens whose attention_mask is 1
    normalize: bool  # L2-normalize the pooled vector (after any Matryoshka truncation)
    dimensions: int  # the pooled vector's length (the hidden size)
    matryoshka: bool = False  # the source says a prefix of the vector is itself an embedding
    max_tokens: int = 512  # the longest text (in tokens, specials included) the model takes
    kind: str = "encoder"  # "encoder" (bidirectional) | "decoder" (causal, export --task embed)
    prompts: tuple[tuple[str, str], ...] = ()  # sentence-transformers' named prompts (name, prefix)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ModelFileError(f"embedding.pooling '{self.pooling}' is not one of {', '.join(POOLINGS)}")
        if self.dimensions < 1 or self.max_tokens < 1:
            raise ModelFileError("embedding.dimensions and embedding.max_tokens must be positive")

    def to_manifest(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize, "dimensions": self.dimensions,
                "matryoshka": self.matryoshka, "max_tokens": self.max_tokens, "kind": self.kind,
                "prompts": dict(self.prompts)}

    @classmethod
    def from_manifest(cls, raw: Any) -> EmbeddingRecord:
        if not isinstance(raw, dict):
            raise ModelFileError(f"manifest: embedding is {raw!r:.60}, expected an object; re-export the model")
        try:
            prompts = raw.get("prompts") or {}
            return cls(pooling=str(raw["pooling"]), normalize=bool(raw["normalize"]),
                       dimensions=int(raw["dimensions"]), matryoshka=bool(raw.get("matryoshka", False)),
                       max_tokens=int(raw.get("max_tokens", 512)), kind=str(raw.get("kind", "encoder")),
                       prompts=tuple((str(k), str(v)) for k, v in dict(prompts).items()))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"manifest: embedding section is malformed ({type(e).__name__}: {e}); "
                                 "re-export the model") from None
