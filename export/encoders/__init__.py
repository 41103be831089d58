"""Encoder (embedding) architectures: one module per Hugging Face `model_type`, found by name.

Each module exposes `spec(config) -> EncoderSpec` and `recipe(spec, names) -> dict[canonical
name, Take]` (`names`: the checkpoint's tensor names, whose prefix differs between a bare model
and one saved from a task head). export/encoder_graph.py builds every family from the spec.

Canonical weights, float32, linear weights as (out, in):
    embed.weight              (vocab, hidden)
    embed_positions.weight    (max_positions, hidden)     learned positions only
    embed_type.weight         (hidden,)                   token type 0's row, added to every token
    embed_norm.weight / .bias (hidden,)
    layers.{i}.qkv.weight     (3 * hidden, hidden)  (+ .bias)
    layers.{i}.o.weight       (hidden, hidden)      (+ .bias)
    layers.{i}.attn_norm.*    post-norm: after attention + residual; pre-norm: before attention
                              (absent on a pre-norm layer without one: ModernBERT's layer 0)
    layers.{i}.up.weight      (intermediate, hidden)       plain MLP (+ .bias)
    layers.{i}.gate_up.weight (2 * intermediate, hidden)   gated MLP: activated rows first
    layers.{i}.down.weight    (hidden, intermediate)       (+ .bias)
    layers.{i}.ffn_norm.*     post-norm: after MLP + residual; pre-norm: before the MLP
    final_norm.weight / .bias pre-norm families only
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from edge_infer.contract.errors import ModelFileError

SUPPORTED = ("bert", "xlm_roberta", "modernbert", "nomic_bert")
ALIASES = {"xlm-roberta": "xlm_roberta", "roberta": "xlm_roberta", "camembert": "xlm_roberta"}


@dataclass(frozen=True)
class EncoderSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    norm_eps: float
    activation: str  # "gelu" | "gelu_tanh" | "silu"
    mlp: str  # "plain" | "gated"
    norm_place: str  # "post" (BERT: norm(x + f(x))) | "pre" (ModernBERT: x + f(norm(x)), final norm)
    position: str  # "learned" | "rope"
    position_offset: int = 0  # learned positions start here (XLM-RoBERTa: padding_idx + 1)
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # rope only: the leading dims of each head that rotate
    local_rope_theta: float | None = None  # rope of sliding-window layers where it differs
    local_window: int | None = None  # sliding-window layers attend to |i - j| <= local_window // 2
    global_every: int = 1  # layer i is global when i % global_every == 0, else sliding-window
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_local(self, i: int) -> bool:
        return self.local_window is not None and i % self.global_every != 0


def resolve_encoder_type(model_type: str | None) -> str | None:
    """The module name for `model_type`, or None when it is not an encoder we build."""
    name = ALIASES.get(model_type or "", model_type or "")
    return name if name in SUPPORTED else None


def load_encoder(model_type: str | None) -> ModuleType:
    name = resolve_encoder_type(model_type)
    if name is None:
        raise ModelFileError(f"encoder architecture '{model_type}' is not supported; supported: "
                             f"{', '.join(SUPPORTED)} (aliases: {', '.join(sorted(ALIASES))})")
    return importlib.import_module(f"edge_infer.export.encoders.{name}")


def prefix_of(names: set[str], probe: str, prefixes: tuple[str, ...]) -> str:
    """The prefix before `probe` in this checkpoint's names ("" for a bare model, "bert." from a task head)."""
    for p in ("",) + prefixes:
        if p + probe in names:
            return p
    raise ModelFileError(f"checkpoint has no '{probe}' (nor under {', '.join(prefixes)}): not this architecture's "
                         "weights")


def activation_of(name: str) -> str:
    table = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "silu": "silu", "swish": "silu", "swiglu": "silu", "geglu": "gelu"}
    if name not in table:
        raise ModelFileError(f"config.json: activation '{name}' is not supported (supported: {', '.join(table)})")
    return table[name]
