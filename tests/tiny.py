"""Tiny random models for tests, built in-process from transformers config classes."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Numbers 0123456789 and code: def f(x): return x * 2\n\tTabs and  double  spaces. "
    "Émile a mangé une crème brûlée. 日本語のテキスト。中文文本。 Emoji 🙂🚀👍🏽 and more. "
) * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


def make_config(kind: str, vocab: int, **over):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
    common.update(over)

    def make(cls, **family):  # the test's overrides win over the family defaults
        return cls(**{**common, **family, **over})

    if kind == "llama":
        return make(transformers.LlamaConfig, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if kind == "mistral":
        return make(transformers.MistralConfig, sliding_window=7)
    if kind == "qwen2":
        return make(transformers.Qwen2Config)
    if kind == "qwen3":
        return make(transformers.Qwen3Config, head_dim=16)
    if kind == "phi3":
        return make(transformers.Phi3Config)
    if kind == "gemma2":
        return make(transformers.Gemma2Config, head_dim=16, sliding_window=7, query_pre_attn_scalar=16,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if kind == "gemma3_text":
        return make(transformers.Gemma3TextConfig, head_dim=16, sliding_window=7, query_pre_attn_scalar=16,
                    rope_scaling={"rope_type": "linear", "factor": 2.0})
    if kind == "stablelm":  # no direct builder: exported through optimum-onnx
        return make(transformers.StableLmConfig)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=0, eos_token_id=2)
    raise ValueError(kind)


def make_checkpoint(kind: str, folder: Path, seed: int = 0, **over) -> Path:
    """A random tiny `kind` model saved as safetensors with tokenizer files; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    config = make_config(kind, tok.get_vocab_size(), **over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the default init, so logits are peaked and argmax is stable
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return folder


def load_reference(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(ref, ids: list[int], n: int, pad: int = 0) -> list[int]:
    """transformers' greedy continuation of `ids`, exactly n tokens (eos ignored)."""
    import torch

    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=pad)
    return out[0, len(ids):].tolist()


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    """edge-infer's greedy continuation of `ids` through prefill and the cached decode path."""
    import numpy as np

    cache = model.new_cache()
    logits = model.forward(np.array([ids]), cache)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.forward(np.array([[out[-1]]]), cache)[0, -1]
    return out
