"""`tokenizer.ggml.model = llama` (SentencePiece BPE with byte fallback: Gemma, Phi-3, Llama 2, Mistral v0.1)
and the newer `pre` names, against references in the same run.

Reference for the SentencePiece model: the `sentencepiece` library itself, on a BPE model trained here
with Llama 2's settings (identity normalization, a dummy prefix, split digits, byte fallback), written
into GGUF metadata the way llama.cpp's converter does (_set_vocab_sentencepiece: pieces, scores, types).
llama.cpp's tokenizer implements SentencePiece BPE; ids from llama.cpp itself on these files are still
to be checked in (llama-cpp-python is not installable here without a compiler).
"""

from __future__ import annotations

import pytest

from edge_infer.export.gguf_tokenizer import (
    BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, USER_DEFINED, tokenizer_from_gguf,
)
from test_gguf_tokenizer import TEXTS
from tiny import TEXT

spm = pytest.importorskip("sentencepiece")
CHAT = ["<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n", "x<end_of_turn>y"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text(TEXT * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    return sp, gguf_metadata(sp)


def gguf_metadata(sp) -> dict:
    """What llama.cpp's converter writes for a SentencePiece vocabulary."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                      else USER_DEFINED if tokens[-1].startswith("<") and tokens[-1].endswith("_turn>")
                      else NORMAL)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id()}


@pytest.mark.parametrize("text", TEXTS + ["  leading spaces", "tabs\tand\nnew lines  ", "ÿ ø 🙂 𝔘 ☃"])
def test_sentencepiece_ids_equal_the_sentencepiece_library(trained, text):
    sp, meta = trained
    tok, info = tokenizer_from_gguf(meta)
    assert info.add_bos  # llama.cpp's default for SentencePiece vocabularies
    assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("text", CHAT)
def test_sentencepiece_turn_markers_stay_whole(trained, text):
    """Markers are matched whole; the text between them is encoded on its own, with the space prefix
    llama.cpp puts after every special token (the sentencepiece library puts none there: llama.cpp's
    rule is followed; Gemma files switch the prefix off, where both agree)."""
    import re

    sp, meta = trained
    tok, _ = tokenizer_from_gguf(meta)
    expected = []
    for part in re.split(r"(<start_of_turn>|<end_of_turn>)", text):
        if part in ("<start_of_turn>", "<end_of_turn>"):
            expected.append(sp.piece_to_id(part))
        elif part:
            expected += sp.encode(part)
    assert tok.encode(text, add_special_tokens=False).ids == expected
    no_prefix, _ = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_space_prefix": False})
    ids = no_prefix.encode(text, add_special_tokens=False).ids
    assert [i for i in ids if sp.id_to_piece(i).startswith("<") and sp.id_to_piece(i).endswith("_turn>")] == [
        sp.piece_to_id(m) for m in re.findall(r"<start_of_turn>|<end_of_turn>", text)]
    assert no_prefix.decode(ids) == text


def test_add_bos_and_space_prefix_flags_are_honoured(trained):
    sp, meta = trained
    tok, info = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_bos_token": False,
                                     "tokenizer.ggml.add_space_prefix": False})
    assert not info.add_bos
    ids = tok.encode("hello world").ids
    assert ids[0] != sp.bos_id() and sp.id_to_piece(ids[0])[0] != "\u2581"
    assert tok.decode(ids) == "hello world"


def test_end_of_turn_tokens_end_generation(trained):
    sp, meta = trained
    end = sp.piece_to_id("<end_of_turn>")
    _, info = tokenizer_from_gguf(meta)
    assert info.end_ids == (sp.eos_id(), end)


# ---------------------------------------------------------------- byte-level pre names

ASCII = ["Hello World, it's THE end. camelCaseWords and HTTPServer 12345 x//y", "don't STOP:  ok\n\n  a"]


def pieces(pre: str, text: str) -> list[str]:
    tok, _ = tokenizer_from_gguf(tiny_byte_meta(pre))
    return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def tiny_byte_meta(pre: str) -> dict:
    from test_gguf_tokenizer import tiny_meta

    return tiny_meta(**{"tokenizer.ggml.pre": pre})


@pytest.mark.parametrize("pre, original", [
    ("tekken", r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
               r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ("gpt-4o", r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll"
               r"|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve"
               r"|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
])
def test_llama_cpp_regex_forms_cut_ascii_like_the_originals(pre, original):
    """llama.cpp rewrote the Tekken / GPT-4o regexes without \\p{Lu}; on ASCII text both cut alike."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(original), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in ASCII:
        assert pieces(pre, text) == [p for p, _ in split.pre_tokenize_str(text)], (pre, text)


def test_every_pre_name_builds_and_llama3_names_add_bos():
    for pre in PRE_TOKENIZERS:
        tok, info = tokenizer_from_gguf(tiny_byte_meta(pre))
        assert tok.decode(tok.encode("hello 123 world").ids) == "hello 123 world", pre
        assert info.add_bos == (pre in ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "tekken")), pre
