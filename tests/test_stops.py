"""StopMatcher: the same output for every split of the text, and no leaks."""

from __future__ import annotations

import random

import pytest

from edge_infer.contract.errors import UserError
from edge_infer.runtime.stops import MAX_STOP_CHARS, MAX_STOPS, StopMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Batch semantics: cut before the leftmost occurrence of any stop."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    """Feed deltas until a hit, flush otherwise; returns (text, hit, emitted pieces)."""
    m = StopMatcher(stops)
    pieces = []
    for d in deltas:
        out, hit = m.feed(d)
        pieces.append(out)
        if hit:
            return "".join(pieces), True, pieces
    pieces.append(m.flush())
    return "".join(pieces), m.stopped, pieces


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text), 12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_no_stops_is_passthrough():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.feed("") == ("", False)
    assert m.flush() == ""
    assert StopMatcher(None).feed("x") == ("x", False)


def test_stop_in_one_delta():
    m = StopMatcher(["</s>"])
    assert m.feed("hello</s>world") == ("hello", True)
    assert m.stopped


def test_stop_split_across_many_deltas_never_leaks():
    m = StopMatcher(["<|im_end|>"])
    emitted = []
    for ch in "Sure!<|im_end|>ignored":
        out, hit = m.feed(ch)
        emitted.append(out)
        assert "<" not in "".join(emitted)
        if hit:
            break
    assert hit and "".join(emitted) == "Sure!"


def test_false_start_is_released():
    m = StopMatcher(["<|im_end|>"])
    assert m.feed("a <|im") == ("a ", False)
    assert m.feed("_start|>") == ("<|im_start|>", False)
    assert m.feed("<") == ("", False)
    assert m.flush() == "<"
    assert not m.stopped


def test_held_tail_is_the_longest_possible_stop_start():
    m = StopMatcher(["abab"])
    assert m.feed("xaba") == ("x", False)  # "aba" could still become "abab"
    assert m.feed("b") == ("", True)


def test_earliest_match_wins():
    assert run(["world", "hello"], ["say hello world"])[:2] == ("say ", True)
    assert run(["b", "abc"], ["xabc"])[:2] == ("x", True)


@pytest.mark.parametrize("deltas", [["abc"], ["a", "b", "c"], ["ab", "c"], ["a", "bc"]])
def test_overlapping_stops_longer_earlier_one_wins(deltas):
    # "b" is complete after "ab", but "abc" starts earlier: wait for it.
    assert run(["b", "abc"], deltas)[:2] == ("", True)


def test_shorter_match_used_when_longer_one_fails():
    m = StopMatcher(["b", "abc"])
    assert m.feed("ab") == ("", False)  # waiting: "abc" may still match at 0
    assert m.feed("x") == ("a", True)


def test_flush_settles_a_waiting_match():
    m = StopMatcher(["b", "abc"])
    assert m.feed("zab") == ("z", False)
    assert m.flush() == "a"
    assert m.stopped


def test_feed_after_hit_is_an_error():
    m = StopMatcher(["x"])
    assert m.feed("x") == ("", True)
    with pytest.raises(RuntimeError):
        m.feed("more")


def test_a_bare_string_is_one_stop():
    assert run("###", ["a#", "##b"])[:2] == ("a", True)


def test_unicode_stops():
    assert run(["😀 fin"], ["ok 😀", " fi", "n tail"])[:2] == ("ok ", True)


STOP_SETS = [
    ["</s>"],
    ["\n\n", "User:"],
    ["aa", "aab", "b"],
    ["abcabd", "cab", "bd"],
    ["x"],
    ["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
    ["aaaa", "aaab"],
]


@pytest.mark.parametrize("stops", STOP_SETS)
def test_property_any_split_gives_the_batch_result(stops):
    rng = random.Random(hash(tuple(stops)) & 0xFFFF)
    alphabet = "".join(sorted(set("".join(stops)))) + " z"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = reference(text, stops)
        for _ in range(4):
            deltas = random_split(text, rng)
            got_text, hit, pieces = run(stops, deltas)
            assert (got_text, hit) == expected, (stops, deltas)
            # nothing emitted is ever past the cut
            assert expected[0].startswith("".join(pieces[:-1]))


def test_property_char_by_char_realistic():
    rng = random.Random(3)
    stops = ["<|im_end|>", "\nUser:"]
    words = ["hello", " ", "<|im", "_end|>", "\n", "User", ":", "<", "|", "end", "im"]
    for _ in range(500):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 15)))
        assert run(stops, list(text))[:2] == reference(text, stops)
        assert run(stops, random_split(text, rng))[:2] == reference(text, stops)


@pytest.mark.parametrize(
    "stops, match",
    [
        ([""], r"stop\[0\] is an empty string"),
        (["ok", ""], r"stop\[1\] is an empty string"),
        (["x"] * (MAX_STOPS + 1), rf"at most {MAX_STOPS}"),
        (["y" * (MAX_STOP_CHARS + 1)], rf"stop\[0\] is {MAX_STOP_CHARS + 1} characters long; at most {MAX_STOP_CHARS}"),
        ([3], r"stop\[0\] must be a string, got int"),
        (42, "stop must be a string or a list of strings"),
        ("", r"stop\[0\] is an empty string"),
    ],
)
def test_validation(stops, match):
    with pytest.raises(UserError, match=match):
        StopMatcher(stops)


def test_limits_are_inclusive():
    StopMatcher([str(i) for i in range(MAX_STOPS)])
    StopMatcher(["z" * MAX_STOP_CHARS])
