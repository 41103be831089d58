"""Stop strings over a stream of text deltas.

`StopMatcher.feed(delta)` returns the text that is safe to show now. It holds
back the longest tail that could still grow into a stop string, so a stop split
across any number of deltas never leaks. The result is the same for every way
of splitting the text into deltas: the text before the earliest (leftmost)
occurrence of any stop string, or all of it when none occurs.

One subtlety keeps that true with overlapping stops: with stops ["abc", "b"]
and text "ab", "b" has matched but "abc" could still match earlier. The
matcher then waits for the next delta; if generation ends first, flush()
settles on the complete match.

Cost per feed: O(len(held + delta) * number of stops), where held is shorter
than the longest stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_infer.contract.errors import UserError, check_text

MAX_STOPS = 16
MAX_STOP_CHARS = 256


class StopMatcher:
    """Cuts a streamed text at the first stop string; see the module docstring."""

    def __init__(self, stop: Sequence[str] | str | None):
        self.stops = _validate(stop)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._first_chars = frozenset(s[0] for s in self.stops)
        self._held = ""
        self.stopped = False  # a stop string was hit (by feed or by flush)
        self.matched: str | None = None  # which one (the Anthropic API reports it)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit, whether a stop string was hit).

        After a hit the returned text is everything before the stop string and
        the matcher must not be fed again.
        """
        if self.stopped:
            raise RuntimeError("StopMatcher.feed called after a stop string was hit")
        if not self.stops:
            return delta, False
        text = self._held + delta
        match = self._earliest_match(text)
        pending = self._earliest_partial(text, before=len(text) if match is None else match)
        if match is not None and pending is None:
            self._held = ""
            self.stopped, self.matched = True, self._stop_at(text, match)
            return text[:match], True
        keep_from = len(text) if pending is None else pending
        self._held = text[keep_from:]
        return text[:keep_from], False

    def flush(self) -> str:
        """Generation ended for another reason: return the held-back text.

        If the held text already contains a complete stop string (one that was
        waiting on a possibly earlier, longer stop), the text is cut there.
        """
        text, self._held = self._held, ""
        match = self._earliest_match(text) if text else None
        if match is not None:
            self.stopped, self.matched = True, self._stop_at(text, match)
            return text[:match]
        return text

    def _stop_at(self, text: str, i: int) -> str:
        return next(s for s in self.stops if text.startswith(s, i))

    def _earliest_match(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found, default=None)

    def _earliest_partial(self, text: str, before: int) -> int | None:
        """Earliest i < before where text[i:] is a proper prefix of a stop string."""
        # Only the last (longest - 1) characters can start an unfinished stop.
        for i in range(max(0, len(text) - self._longest + 1), min(before, len(text))):
            if text[i] not in self._first_chars:
                continue
            tail = text[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return i
        return None


def _validate(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """The stop strings as a tuple, de-duplicated in order; UserError when unusable."""
    if stop is None:
        return ()
    if isinstance(stop, str):  # a single stop string, as the OpenAI API allows
        stop = [stop]
    if not isinstance(stop, Sequence):
        raise UserError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOPS:
        raise UserError(f"stop has {len(stop)} strings; at most {MAX_STOPS} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise UserError(f"stop[{i}] must be a string, got {type(s).__name__}")
        check_text(s, f"stop[{i}]")
        if not s:
            raise UserError(f"stop[{i}] is an empty string; remove it or give at least one character")
        if len(s) > MAX_STOP_CHARS:
            raise UserError(
                f"stop[{i}] is {len(s)} characters long; at most {MAX_STOP_CHARS} are allowed"
            )
    return tuple(dict.fromkeys(stop))
