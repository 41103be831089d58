"""The architecture-neutral description of a decoder that the graph builder reads.

Each architecture module (`export/arch/<model_type>.py`) turns a Hugging Face
config into a `DecoderSpec` and its checkpoint names into the canonical weight
names below. The builder then never looks at a model_type again.

Canonical weights, all float32 numpy arrays, linear weights as (out, in):
    embed.weight                  (vocab, hidden)
    embed_positions.weight        (max_positions, hidden)       learned positions only
    layers.{i}.input_norm.weight  (hidden,)      (+ .bias for LayerNorm)
    layers.{i}.qkv.weight         ((heads + 2 * kv_heads) * head_dim, hidden)  (+ .bias)
    layers.{i}.q_norm.weight      (head_dim,)    qk-norm only
    layers.{i}.k_norm.weight      (head_dim,)
    layers.{i}.o.weight           (hidden, heads * head_dim)   (+ .bias)
    layers.{i}.post_attn_norm.weight   (hidden,)  sandwich norms only
    layers.{i}.ffn_norm.weight    (hidden,)      (+ .bias)
    layers.{i}.gate_up.weight     (2 * intermediate, hidden)   gated MLP: gate rows first
    layers.{i}.up.weight          (intermediate, hidden)       plain MLP (+ .bias)
    layers.{i}.down.weight        (hidden, intermediate)       (+ .bias)
    layers.{i}.post_ffn_norm.weight    (hidden,)  sandwich norms only
    final_norm.weight             (hidden,)      (+ .bias)
    lm_head.weight                (vocab, hidden)  absent when tied to embed.weight
RMSNorm weights are stored as the multiplier actually applied (Gemma's 1 + w
is folded in by its architecture module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_infer.contract.errors import ModelFileError


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: `theta` base, scaling already resolved to inv_freq rules."""

    theta: float
    rotary_dim: int
    scaling: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs of HF rope_scaling

    def scaling_dict(self) -> dict:
        return dict(self.scaling)


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    activation: str  # "silu" | "gelu_tanh" | "gelu"
    mlp: str  # "gated" | "plain"
    position: str  # "rope" | "learned"
    rope: RopeSpec | None
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "full" | "sliding" per layer; empty: all full
    local_rope: RopeSpec | None = None  # rope of sliding layers where it differs (gemma3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFileError(
                f"config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ModelFileError("config: layer_types must list one entry per layer")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full"

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
