"""StreamDetokenizer: streamed deltas always join to the full decode.

The tokenizers are built in-process: a byte-level BPE (GPT-2 / SmolLM2 style)
and two SentencePiece-style BPEs with byte fallback (a Metaspace decoder, and
the Llama decoder Replace/ByteFallback/Fuse/Strip), so emoji and CJK decode
through <0xNN> byte tokens.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edge_infer.runtime import detokenize
from edge_infer.runtime.detokenize import StreamDetokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
CORPUS = [
    "Hello world! café naïve résumé Ünïcödé 😀🎉👍🏽 日本語のテキスト 中文字符 한국어",
    "   spaces\t\ttabs\n\nnewlines    and   runs  ",
    "the quick brown fox jumps over the lazy dog. The Quick Brown Fox!",
] * 20
SAMPLES = [
    "Hi 😀 日本 café",
    "  leading spaces and trailing  ",
    "👍🏽 family: 👨‍👩‍👧 flags 🇫🇷",
    "mixed 中文 and English, naïve résumé\n\ttabbed",
    "ascii only",
]


@functools.lru_cache(maxsize=None)
def byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.lru_cache(maxsize=None)
def sentencepiece_tokenizer(style: str) -> Tokenizer:
    """BPE with byte fallback; a small alphabet forces rare chars to <0xNN>."""
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "metaspace":
        trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    else:  # llama: the normalizer adds the spaces, no pre-tokenizer
        trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, limit_alphabet=40)
    )
    model = json.loads(trained.to_str())["model"]
    # Re-assemble the vocab as SentencePiece lays it out: specials, 256 bytes, pieces.
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = trained.normalizer
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.add_special_tokens(SPECIALS)
    if style == "metaspace":
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
        )
    else:
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return tok


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "llama"])
def tokenizer(request) -> Tokenizer:
    if request.param == "byte_level":
        return byte_level_tokenizer()
    return sentencepiece_tokenizer(request.param)


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    """All deltas, flush last."""
    detok = StreamDetokenizer(tok, skip_special_tokens=skip)
    return [detok.add(i) for i in ids] + [detok.flush()]


def assert_streams_like_decode(tok: Tokenizer, ids: list[int], skip: bool = True) -> None:
    deltas = stream(tok, ids, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids
    full = tok.decode(ids, skip_special_tokens=skip)
    # No delta ends inside a character: a U+FFFD is only emitted when the full
    # decode has one there too (checked by the join), never as a held partial.
    for d in deltas[:-1]:
        if d.endswith("\ufffd"):
            assert "\ufffd" in full


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """The token ids spelling data one byte at a time (<0xNN> tokens, or byte-level chars)."""
    ids = []
    for b in data:
        i = tok.token_to_id(f"<0x{b:02X}>")
        ids.append(i if i is not None else tok.token_to_id(_byte_level_char(b)))
    return ids


def _byte_level_char(b: int) -> str:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


# -- tests ------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_encoded_text_streams_back_exactly(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert_streams_like_decode(tokenizer, ids)


def test_sentencepiece_tokenizers_really_use_byte_tokens(tokenizer):
    # Characters that are not in CORPUS at all: whichever 40 the trainer keeps (ties are ordered
    # differently from run to run), these can only be spelled with byte tokens.
    ids = tokenizer.encode("ᚠᚢ ᛗ").ids
    tokens = [tokenizer.id_to_token(i) for i in ids]
    if tokenizer.token_to_id("<0x41>") is not None:
        assert any(t.startswith("<0x") for t in tokens), tokens


def test_emoji_is_held_until_complete_then_emitted_whole(tokenizer):
    detok = StreamDetokenizer(tokenizer)
    ids = tokenizer.encode("ok").ids + byte_ids(tokenizer, "😀".encode()) + tokenizer.encode(" x").ids
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert any("😀" in d for d in deltas)


@pytest.mark.parametrize(
    "data",
    [
        "😀".encode(),
        "日本語".encode(),
        "é".encode() + b"\x80",  # valid char, then a stray continuation byte
        b"A\x80",  # ByteFallback turns the whole run into U+FFFD
        b"\xf0\x9f\x98",  # truncated emoji at the end
        b"\xe4\xb8" + b"x",  # truncated CJK, then ascii
        b"\x80" * 5,
        b"\xff\xfe",
        "👍🏽".encode(),
    ],
)
def test_adversarial_byte_runs(tokenizer, data):
    pre = tokenizer.encode("hi").ids
    post = tokenizer.encode(" end").ids
    body = byte_ids(tokenizer, data)
    for ids in (body, pre + body, body + post, pre + body + post):
        assert_streams_like_decode(tokenizer, ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_the_stream(tokenizer, skip):
    specials = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    emoji = byte_ids(tokenizer, "😀".encode())
    ids = [specials[1]] + tokenizer.encode("Hi").ids + emoji[:2] + [specials[2]] + emoji[2:]
    ids += [specials[0]] + tokenizer.encode(" there").ids + [specials[2]]
    assert_streams_like_decode(tokenizer, ids, skip=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences(tokenizer, skip):
    rng = random.Random(1234)
    vocab = tokenizer.get_vocab_size()
    specials = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    pool = byte_ids(tokenizer, bytes(range(256)))
    for _ in range(150):
        n = rng.randint(1, 40)
        mode = rng.random()
        if mode < 0.4:  # anything in the vocab
            ids = [rng.randrange(vocab) for _ in range(n)]
        elif mode < 0.8:  # mostly single bytes, some specials
            ids = [rng.choice(specials) if rng.random() < 0.1 else rng.choice(pool) for _ in range(n)]
        else:  # real text cut at a random point, with random bytes spliced in
            ids = tokenizer.encode(rng.choice(SAMPLES)).ids
            k = rng.randrange(len(ids) + 1)
            ids = ids[:k] + [rng.choice(pool) for _ in range(rng.randint(0, 6))] + ids[k:]
        assert_streams_like_decode(tokenizer, ids, skip=skip)


def test_utf8_sequences_split_into_bytes_always_stream_clean(tokenizer):
    """Valid UTF-8 sent byte by byte: no delta ever carries a U+FFFD."""
    rng = random.Random(7)
    alphabet = "aé中😀👍🏽 \n한"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        ids = byte_ids(tokenizer, text.encode())
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)
        assert all("\ufffd" not in d for d in deltas)


def test_leading_space_kept_after_first_token(tokenizer):
    ids = tokenizer.encode("the lazy dog").ids
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert " " in "".join(deltas[1:])


def test_window_stays_small_on_long_streams(tokenizer, monkeypatch):
    """Each decode sees a few tokens, not the whole history."""
    ids = tokenizer.encode(" ".join(SAMPLES) * 10).ids
    detok = StreamDetokenizer(tokenizer)
    sizes = []
    real = detok._decode

    def spy(start, stop):
        sizes.append(stop - start)
        return real(start, stop)

    monkeypatch.setattr(detok, "_decode", spy)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tokenizer.decode(ids)
    assert len(ids) > 200
    # A byte-fallback run (an emoji spelled in <0xNN> tokens) is decoded whole.
    longest_run = run = 0
    for i in ids:
        run = run + 1 if tokenizer.id_to_token(i).startswith("<0x") else 0
        longest_run = max(longest_run, run)
    assert max(sizes) <= longest_run + 16  # a ZWJ emoji can leave bytes open over ~10 tokens


@pytest.mark.parametrize("style", ["metaspace", "llama"])
def test_long_byte_run_is_held_without_decoding(style, monkeypatch):
    tokenizer = sentencepiece_tokenizer(style)
    detok = StreamDetokenizer(tokenizer)
    calls = []
    real = detok._decode
    monkeypatch.setattr(detok, "_decode", lambda a, b: calls.append((a, b)) or real(a, b))
    ids = byte_ids(tokenizer, "日本語".encode() * 50)
    assert all(detok.add(i) == "" for i in ids)
    assert calls == []
    assert detok.flush() == tokenizer.decode(ids)


def test_garbage_run_is_bounded(monkeypatch):
    """Past MAX_HELD_TOKENS held tokens the text is emitted, keeping decodes small."""
    monkeypatch.setattr(detokenize, "MAX_HELD_TOKENS", 8)
    tokenizer = byte_level_tokenizer()
    detok = StreamDetokenizer(tokenizer)
    sizes = []
    real = detok._decode
    monkeypatch.setattr(detok, "_decode", lambda a, b: sizes.append(b - a) or real(a, b))
    # Lone continuation bytes: every decode ends in U+FFFD, so without the
    # bound the window would grow with each token.
    garbage = byte_ids(tokenizer, b"\x80")[0]
    ids, out = [], ""
    for _ in range(100):
        ids.append(garbage)
        out += detok.add(garbage)
    out += detok.flush()
    assert out == tokenizer.decode(ids)  # exact here: lone continuation bytes never complete
    assert max(sizes) <= 2 * (8 + 1)  # previous run (the prefix window) + the held run


def test_flush_twice_and_empty(tokenizer):
    detok = StreamDetokenizer(tokenizer)
    assert detok.flush() == ""
    ids = tokenizer.encode("Hi 😀").ids
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tokenizer.decode(ids)
    assert detok.flush() == ""
