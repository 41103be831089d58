"""Build a `tokenizers.Tokenizer` from a GGUF file's own vocabulary.

The GGUF metadata carries the vocabulary (`tokenizer.ggml.tokens`), the BPE
merges, each token's type, and `tokenizer.ggml.pre`, the name llama.cpp uses
to pick a pre-tokenizer (the regexes that cut text into words before BPE). We
rebuild that pre-tokenizer from a small table of the regexes llama.cpp uses
(`llama-vocab.cpp`); an unknown name is an error rather than a guess, since a
wrong pre-tokenizer silently changes token ids.

Two tokenizer models, as llama.cpp has them (`tokenizer.ggml.model`):
    gpt2   byte-level BPE over the pieces the `pre` regexes cut (Llama 3, Qwen, SmolLM, Phi-4, Mistral Nemo)
    llama  SentencePiece-style BPE (Gemma, Phi-3, Llama 2, Mistral v0.1): spaces become U+2581, a
           space is put in front of the text and after every special token (unless
           tokenizer.ggml.add_space_prefix says no), adjacent pieces merge while the merged piece is
           in the vocabulary, highest score first, and characters outside it fall back to <0xXX> bytes
llama.cpp's defaults when the file does not say: BOS is added for `llama` vocabularies and for the
llama3 / tekken pre-tokenizers, not otherwise. Generation also ends at the file's eot/eom tokens and
at the end-of-turn markers llama.cpp recognizes by text (END_OF_TURN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edge_infer.contract.errors import ModelFileError

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 word regex: what `pre_tokenizers.ByteLevel(use_regex=True)` applies.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's own forms of the Tekken and GPT-4o regexes (its engine has no \p{Lu}: an upper-case
# run is "letters other than a-z", a lower-case run "letters other than A-Z").
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
TEKKEN_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}?"
               rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}?|\p{{N}}{{1,3}}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ((r"\p{N}", GPT2_REGEX), False, False)
_LLAMA3 = ((LLAMA3_REGEX,), True, True)
_QWEN2 = ((QWEN2_REGEX,), False, False)
_GPT2 = (None, False, False)

# tokenizer.ggml.pre -> (regexes applied in turn, each splitting every piece further, matches kept
# as their own pieces, then byte-level mapping; ignore_merges: a piece already in the vocabulary is
# one token; add_bos: llama.cpp's default when tokenizer.ggml.add_bos_token is absent), as
# llama.cpp's llama-vocab.cpp has them. None means the GPT-2 regex built into ByteLevel.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...] | None, bool, bool]] = {
    "gpt2": _GPT2, "gpt-2": _GPT2, "phi-2": _GPT2, "olmo": _GPT2, "mpt": _GPT2,
    # smollm, starcoder & co: every digit on its own, then the GPT-2 regex.
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "dbrx": ((LLAMA3_REGEX,), False, False), "smaug-bpe": ((LLAMA3_REGEX,), False, False),
    "qwen2": _QWEN2, "stablelm2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "tekken": ((TEKKEN_REGEX,), True, True),
    "gpt-4o": ((GPT4O_REGEX,), False, False), "llama4": ((GPT4O_REGEX,), False, False),
    # llama.cpp's fallback for converters that did not recognize the tokenizer.
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
}
# Tokens llama.cpp ends generation at when the file names them only by text.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")
SPACE = "\u2581"  # SentencePiece's visible space


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
    end_ids: tuple[int, ...] = ()  # every id that ends generation: eos, eot, eom, END_OF_TURN texts


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
    regexes = PRE_TOKENIZERS[pre][0]
    if regexes is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(metadata: dict[str, Any]) -> tuple[Tokenizer, TokenizerInfo]:
    """Tokenizer and its facts from GGUF metadata (the `tokenizer.*` keys suffice)."""
    kind = _get(metadata, "tokenizer.ggml.model", str)
    if kind not in ("gpt2", "llama"):
        raise _fail(f"tokenizer model '{kind}' is not supported (supported: 'gpt2' byte-level BPE, "
                    "'llama' SentencePiece BPE)", "use a model with a supported tokenizer")
    tokens = _get(metadata, "tokenizer.ggml.tokens", list)
    types = _get(metadata, "tokenizer.ggml.token_type", list, [NORMAL] * len(tokens))
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise _fail("tokenizer.ggml.tokens must be a non-empty list of strings")
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise _fail(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    # Later duplicates win, as in llama.cpp's token_to_id map.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        tok, default_bos, prefix = _byte_level(metadata, vocab), False, False
    else:
        prefix = _get(metadata, "tokenizer.ggml.add_space_prefix", bool, True)
        tok, default_bos = _sentencepiece(metadata, tokens, types, vocab, prefix), True
    # CONTROL tokens (<|im_start|>) are special: matched whole in text, skippable on decode.
    # USER_DEFINED tokens are matched whole too but decode as ordinary text, as in llama.cpp.
    added = [AddedToken(t, special=ty == CONTROL, normalized=False)
             for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED) and t]
    tok.add_tokens(added)

    n = len(tokens)
    bos_id = _token_id(metadata, "tokenizer.ggml.bos_token_id", n)
    eos_id = _token_id(metadata, "tokenizer.ggml.eos_token_id", n)
    pad_id = _token_id(metadata, "tokenizer.ggml.padding_token_id", n)
    if kind == "gpt2":
        default_bos = PRE_TOKENIZERS[_get(metadata, "tokenizer.ggml.pre", str, "default")][2]
    add_bos = _get(metadata, "tokenizer.ggml.add_bos_token", bool, default_bos) and bos_id is not None
    add_eos = _get(metadata, "tokenizer.ggml.add_eos_token", bool, False) and eos_id is not None
    bos = [tokens[bos_id]] if add_bos else []
    eos = [tokens[eos_id]] if add_eos else []
    if bos or eos:
        def template(seq: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in bos] + [f"{seq}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

        special = [(t, vocab[t]) for t in dict.fromkeys(bos + eos)]
        tok.post_processor = processors.TemplateProcessing(
            single=template("$A", 0), pair=template("$A", 0) + template("$B", 1), special_tokens=special)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    ends = [i for i in (eos_id, _token_id(metadata, "tokenizer.ggml.eot_token_id", n),
                        _token_id(metadata, "tokenizer.ggml.eom_token_id", n)) if i is not None]
    ends += [vocab[t] for t in END_OF_TURN if t in vocab and types[vocab[t]] in (CONTROL, USER_DEFINED)]
    info = TokenizerInfo(
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
        chat_template=_get(metadata, "tokenizer.chat_template", str, None),
        eos_token=None if eos_id is None else tokens[eos_id],
        bos_token=None if bos_id is None else tokens[bos_id],
        end_ids=tuple(dict.fromkeys(ends)),
    )
    return tok, info


def _byte_level(metadata: dict[str, Any], vocab: dict[str, int]) -> Tokenizer:
    merges_text = _get(metadata, "tokenizer.ggml.merges", list)
    merges = []
    for i, m in enumerate(merges_text):
        pair = m.split(" ") if isinstance(m, str) else []
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise _fail(f"merge {i} ({m!r}) is not two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    pre = _get(metadata, "tokenizer.ggml.pre", str, "default")
    pre_tok = _byte_level_pre_tokenizer(pre)
    try:
        model = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                           ignore_merges=PRE_TOKENIZERS[pre][1])
    except Exception as e:  # tokenizers reports a merge of tokens missing from the vocabulary
        raise _fail(f"the BPE merges do not fit the vocabulary ({e})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(metadata: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int],
                   prefix: bool) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a BPE: merging two pieces has the rank of the merged piece's
    score (highest first), so the BPE makes the merges llama.cpp's score queue makes."""
    scores = _get(metadata, "tokenizer.ggml.scores", list, [0.0] * len(tokens))
    if len(scores) != len(tokens) or not all(isinstance(x, (int, float)) for x in scores):
        raise _fail(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        if types[i] == BYTE or vocab.get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    model = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True,
                       byte_fallback=any(ty == BYTE for ty in types))
    tok = Tokenizer(model)
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
