"""Build a `tokenizers.Tokenizer` from a GGUF file's own vocabulary.

The GGUF metadata carries the vocabulary (`tokenizer.ggml.tokens`), the BPE
merges, each token's type, and `tokenizer.ggml.pre`, the name llama.cpp uses
to pick a pre-tokenizer (the regexes that cut text into words before BPE). We
rebuild that pre-tokenizer from a small table of the regexes llama.cpp uses
(`llama-vocab.cpp`); an unknown name is an error rather than a guess, since a
wrong pre-tokenizer silently changes token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from edge_infer.runtime.errors import ModelFileError

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 word regex: what `pre_tokenizers.ByteLevel(use_regex=True)` applies.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn, each splitting every piece further,
# matches kept as their own pieces, then byte-level mapping), as llama.cpp does.
# None means the GPT-2 regex built into ByteLevel.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...] | None, bool]] = {
    # name: (regexes, ignore_merges: a word already in the vocabulary is one token)
    "gpt2": (None, False),
    # smollm, starcoder & co: every digit on its own, then the GPT-2 regex.
    "smollm": ((r"\p{N}", GPT2_REGEX), False),
    "starcoder": ((r"\p{N}", GPT2_REGEX), False),
    "llama-bpe": ((LLAMA3_REGEX,), True),
    "qwen2": ((QWEN2_REGEX,), False),
    # llama.cpp's fallback for converters that did not recognize the tokenizer.
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
}


@dataclass(frozen=True)
class TokenizerInfo:
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    eos_token: str | None
    bos_token: str | None


def _fail(problem: str, advice: str = "the GGUF file's tokenizer metadata is damaged: download it again"):
    return ModelFileError(f"GGUF tokenizer: {problem}; {advice}")


def _get(meta: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise _fail(f"metadata key '{key}' is missing")
        return default
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _fail(f"metadata key '{key}' is {type(value).__name__}, expected {kind.__name__}")
    return value


def _token_id(meta: dict[str, Any], key: str, n_vocab: int) -> int | None:
    value = _get(meta, key, int, None)
    if value is not None and not 0 <= value < n_vocab:
        raise _fail(f"'{key}' is {value}, outside the vocabulary of {n_vocab} tokens")
    return value


def _byte_level_pre_tokenizer(pre: str):
    if pre not in PRE_TOKENIZERS:
        raise _fail(f"pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; supported: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))}", "use a model with a supported tokenizer")
    regexes, _ = PRE_TOKENIZERS[pre]
    if regexes is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(metadata: dict[str, Any]) -> tuple[Tokenizer, TokenizerInfo]:
    """Tokenizer and its facts from GGUF metadata (the `tokenizer.*` keys suffice)."""
    kind = _get(metadata, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise _fail(f"tokenizer model '{kind}' is not supported yet (only 'gpt2', byte-level BPE)",
                    "use a model with a byte-level BPE tokenizer")
    tokens = _get(metadata, "tokenizer.ggml.tokens", list)
    merges_text = _get(metadata, "tokenizer.ggml.merges", list)
    types = _get(metadata, "tokenizer.ggml.token_type", list, [NORMAL] * len(tokens))
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise _fail("tokenizer.ggml.tokens must be a non-empty list of strings")
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise _fail(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges = []
    for i, m in enumerate(merges_text):
        pair = m.split(" ") if isinstance(m, str) else []
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise _fail(f"merge {i} ({m!r}) is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))

    pre = _get(metadata, "tokenizer.ggml.pre", str, "default")
    pre_tok = _byte_level_pre_tokenizer(pre)
    # Later duplicates win, as in llama.cpp's token_to_id map.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    try:
        model = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                           ignore_merges=PRE_TOKENIZERS[pre][1])
    except Exception as e:  # tokenizers reports a merge of tokens missing from the vocabulary
        raise _fail(f"the BPE merges do not fit the vocabulary ({e})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens (<|im_start|>) are special: matched whole in text, skippable on decode.
    # USER_DEFINED tokens are matched whole too but decode as ordinary text, as in llama.cpp.
    added = [AddedToken(t, special=ty == CONTROL, normalized=False)
             for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED) and t]
    tok.add_tokens(added)

    n = len(tokens)
    bos_id = _token_id(metadata, "tokenizer.ggml.bos_token_id", n)
    eos_id = _token_id(metadata, "tokenizer.ggml.eos_token_id", n)
    pad_id = _token_id(metadata, "tokenizer.ggml.padding_token_id", n)
    # llama.cpp adds BOS for BPE vocabularies only when asked; SmolLM2 says False.
    add_bos = _get(metadata, "tokenizer.ggml.add_bos_token", bool, False) and bos_id is not None
    add_eos = _get(metadata, "tokenizer.ggml.add_eos_token", bool, False) and eos_id is not None
    bos = [tokens[bos_id]] if add_bos else []
    eos = [tokens[eos_id]] if add_eos else []
    if bos or eos:
        def template(seq: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in bos] + [f"{seq}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

        special = [(t, vocab[t]) for t in dict.fromkeys(bos + eos)]
        tok.post_processor = processors.TemplateProcessing(
            single=template("$A", 0), pair=template("$A", 0) + template("$B", 1), special_tokens=special)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    info = TokenizerInfo(
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
        chat_template=_get(metadata, "tokenizer.chat_template", str, None),
        eos_token=None if eos_id is None else tokens[eos_id],
        bos_token=None if bos_id is None else tokens[bos_id],
    )
    return tok, info
