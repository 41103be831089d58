"""Tiny random encoder checkpoints (BERT, XLM-RoBERTa, ModernBERT) with sentence-transformers pooling
files, and the reference embeddings: transformers' last_hidden_state pooled as the folder says."""

from __future__ import annotations

import json
from pathlib import Path

from tiny import TEXT

ENCODERS = ("bert", "xlm-roberta", "modernbert")
OPTIMUM_ENCODERS = ("mpnet", "distilbert")  # no builder of ours: optimum-onnx's feature-extraction export
# (pooling mode key in 1_Pooling/config.json, Normalize module or not), per family in these tests
POOLING = {"bert": ("pooling_mode_mean_tokens", True), "xlm-roberta": ("pooling_mode_cls_token", False),
           "modernbert": ("pooling_mode_mean_tokens", True), "qwen3": ("pooling_mode_lasttoken", True),
           "mpnet": ("pooling_mode_mean_tokens", True), "distilbert": ("pooling_mode_cls_token", True)}
SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # id 1 = padding_idx, as in XLM-R
            "modernbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "mpnet": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # id 1 = padding_idx, as in MPNet
            "distilbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


def make_encoder_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = SPECIALS[kind]
    roberta_like = kind in ("xlm-roberta", "mpnet")
    unk = specials[3] if roberta_like else "[UNK]"
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    cls, sep = (specials[0], specials[2]) if roberta_like else ("[CLS]", "[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def make_encoder_config(kind: str, vocab: int, **over):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if kind == "bert":
        return transformers.BertConfig(**{**common, "pad_token_id": 0, **over})
    if kind == "xlm-roberta":
        return transformers.XLMRobertaConfig(**{**common, "max_position_embeddings": 130, "pad_token_id": 1,
                                                "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1, **over})
    if kind == "modernbert":  # 3 layers: global, sliding (window 8), sliding; local rope differs
        return transformers.ModernBertConfig(**{**common, "num_hidden_layers": 3, "local_attention": 8,
                                                "global_attn_every_n_layers": 3, "local_rope_theta": 1000.0,
                                                "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
                                                "cls_token_id": 2, "sep_token_id": 3, **over})
    if kind == "mpnet":
        return transformers.MPNetConfig(**{**common, "max_position_embeddings": 130, "pad_token_id": 1,
                                           "bos_token_id": 0, "eos_token_id": 2, **over})
    if kind == "distilbert":
        return transformers.DistilBertConfig(vocab_size=vocab, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                             max_position_embeddings=128, pad_token_id=0, **over)
    raise ValueError(kind)


def write_pooling(folder: Path, mode: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, mode: True}))


def make_encoder_checkpoint(kind: str, folder: Path, seed: int = 0, **over) -> Path:
    import torch
    from transformers import AutoModel

    tok = make_encoder_tokenizer(kind)
    config = make_encoder_config(kind, tok.get_vocab_size(), **over)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the default init, so the layers matter
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5) if "norm" in name.lower() else p.normal_(0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    write_pooling(folder, *POOLING[kind])
    return folder


def reference_embeddings(folder: Path, ids: list[list[int]], pooling: str, normalize: bool, causal: bool = False):
    """transformers' last_hidden_state of each text alone, pooled and normalized: (texts, hidden) float64."""
    import numpy as np
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for row in ids:
            h = model(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long))
            h = h.last_hidden_state[0].double().numpy()  # (seq, hidden)
            v = {"mean": h.mean(0), "cls": h[0], "last_token": h[-1], "max": h.max(0)}[pooling]
            out.append(v / np.linalg.norm(v) if normalize else v)
    return np.stack(out)


# ---- NomicBERT: transformers has no config class or model for it (its checkpoints ship modeling code run
# with trust_remote_code), so the tiny checkpoint is written by hand and the reference is the forward pass
# below, in torch, as nomic-ai's NomicBertModel computes it: word + token-type-0 embeddings, emb_ln, then
# per layer x = norm1(x + out_proj(attn(Wqkv x))) with rotate-half rotary on q and k, and
# x = norm2(x + fc2(fc11(x) * silu(fc12(x)))).
NOMIC_CONFIG = dict(model_type="nomic_bert", n_embd=64, n_head=4, n_inner=96, n_layer=2, n_positions=128,
                    layer_norm_epsilon=1e-12, rotary_emb_base=1000.0, rotary_emb_fraction=1.0,
                    rotary_emb_interleaved=False, qkv_proj_bias=False, mlp_fc1_bias=False, mlp_fc2_bias=False,
                    activation_function="swiglu", prenorm=False, type_vocab_size=2, pad_token_id=0)


def make_nomic_checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    tok = make_encoder_tokenizer("bert")
    cfg = {**NOMIC_CONFIG, "vocab_size": tok.get_vocab_size(), "architectures": ["NomicBertModel"]}
    g = torch.Generator().manual_seed(seed)
    h, inner = cfg["n_embd"], cfg["n_inner"]

    def rand(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    w = {"embeddings.word_embeddings.weight": rand(cfg["vocab_size"], h),
         "embeddings.token_type_embeddings.weight": rand(2, h),
         "emb_ln.weight": 1 + rand(h, scale=0.1), "emb_ln.bias": rand(h, scale=0.1)}
    for i in range(cfg["n_layer"]):
        p = f"encoder.layers.{i}."
        w.update({p + "attn.Wqkv.weight": rand(3 * h, h), p + "attn.out_proj.weight": rand(h, h),
                  p + "mlp.fc11.weight": rand(inner, h), p + "mlp.fc12.weight": rand(inner, h),
                  p + "mlp.fc2.weight": rand(h, inner)})
        for n in ("norm1", "norm2"):
            w.update({p + n + ".weight": 1 + rand(h, scale=0.1), p + n + ".bias": rand(h, scale=0.1)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save(str(folder / "tokenizer.json"))
    write_pooling(folder, "pooling_mode_mean_tokens", True)
    return folder


def nomic_reference(folder: Path, ids: list[list[int]]):
    """NomicBERT's mean-pooled, normalized embeddings of each text alone: (texts, hidden) float64."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    h, heads = cfg["n_embd"], cfg["n_head"]
    d = h // heads
    inv = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def ln(x, name):
        return F.layer_norm(x, (h,), w[name + ".weight"], w[name + ".bias"], cfg["layer_norm_epsilon"])

    def rotate(x, cos, sin):  # (heads, seq, d)
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
        return x * cos + half * sin

    out = []
    for row in ids:
        t = torch.tensor(row)
        x = ln(w["embeddings.word_embeddings.weight"][t] + w["embeddings.token_type_embeddings.weight"][0], "emb_ln")
        angles = torch.outer(torch.arange(len(row), dtype=torch.float64), inv)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        for i in range(cfg["n_layer"]):
            p = f"encoder.layers.{i}."
            q, k, v = (x @ w[p + "attn.Wqkv.weight"].T).view(len(row), 3, heads, d).permute(1, 2, 0, 3)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v  # (heads, seq, d)
            x = ln(x + a.transpose(0, 1).reshape(len(row), h) @ w[p + "attn.out_proj.weight"].T, p + "norm1")
            m = (x @ w[p + "mlp.fc11.weight"].T) * F.silu(x @ w[p + "mlp.fc12.weight"].T)
            x = ln(x + m @ w[p + "mlp.fc2.weight"].T, p + "norm2")
        v = x.mean(0).numpy()
        out.append(v / np.linalg.norm(v))
    return np.stack(out)
