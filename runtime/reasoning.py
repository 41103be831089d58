"""Reasoning text: the `<think>…</think>` part of a reply, told apart from the answer while it streams.

Reasoning models (Qwen3, QwQ, DeepSeek-R1 distills) write their thinking
between `<think>` and `</think>` at the start of the reply, then the answer.
Their chat templates say so (the template text holds `<think>`), and some open
the block in the prompt itself (the generation prompt ends with `<think>`),
so the reply starts inside it. `ReasoningSplitter` takes text deltas as they
are detokenized and returns ("reasoning" | "content", text) pieces, holding
back only what may still turn out to be part of a tag (so a tag split over
two deltas is never shown); the newlines around the tags are dropped, as the
templates put them back when the reply is rendered again. Used by the server
(`reasoning_content`, Anthropic `thinking` blocks) and by `run`/`chat`
(thinking dimmed, or hidden with --hide-thinking). The split is on text only:
a model that never writes the tags gets everything as content.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"
FORMATS = ("none", "separate")  # --reasoning-format

Piece = tuple[str, str]  # (REASONING | CONTENT, text)


def emits_thinking(template) -> bool:
    """Whether a chat template is a reasoning model's (it writes or strips `<think>` blocks)."""
    return template is not None and OPEN in template.source


def opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves the reply inside a `<think>` block (the template opened it)."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


def _partial(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag` (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Streamed reply text -> reasoning and content pieces.

    States: `start` (nothing but whitespace yet: is a `<think>` coming?), `thinking`, `after`
    (just closed: newlines before the answer are dropped), `content` (everything passes).
    """

    def __init__(self, inside: bool = False):
        self.state = "thinking" if inside else "start"
        self.held = ""
        self.fresh = True  # at the start of the reasoning: leading newlines are dropped
        self.thought = inside  # a reasoning block was opened (it may be empty)

    def feed(self, text: str) -> list[Piece]:
        self.held += text
        out: list[Piece] = []
        while True:
            before = (self.state, len(self.held))
            self._step(out)
            if (self.state, len(self.held)) == before:
                return [p for p in out if p[1]]

    def _step(self, out: list[Piece]) -> None:
        held = self.held
        if self.state == "start":
            stripped = held.lstrip()
            if stripped.startswith(OPEN):
                self.state, self.held, self.thought = "thinking", stripped[len(OPEN):], True
            elif stripped and not OPEN.startswith(stripped):
                self.state = "content"
        elif self.state == "thinking":
            if self.fresh:
                self.held = held = held.lstrip("\n")
                self.fresh = not held
            end = held.find(CLOSE)
            if end >= 0:
                out.append((REASONING, held[:end].rstrip("\n")))
                self.state, self.held = "after", held[end + len(CLOSE):]
                return
            # Hold what may be the start of "</think>", and the newlines before it (dropped if it is).
            body = held[:len(held) - _partial(held, CLOSE)].rstrip("\n")
            out.append((REASONING, body))
            self.held = held[len(body):]
        elif self.state == "after":
            stripped = held.lstrip()
            self.held = stripped
            if stripped:
                self.state = "content"
        else:  # content
            out.append((CONTENT, held))
            self.held = ""

    def finish(self) -> list[Piece]:
        """What is still held when the reply ends (cut by max_tokens inside the thinking, say)."""
        held, self.held = self.held, ""
        if self.state == "thinking":
            return [(REASONING, held.rstrip("\n"))] if held.strip("\n") else []
        if self.state == "after":
            return []
        return [(CONTENT, held)] if held else []


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when there was none, content) of a whole reply."""
    splitter = ReasoningSplitter(inside)
    pieces = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in pieces if kind == REASONING)
    return (reasoning if splitter.thought else None), "".join(t for kind, t in pieces if kind == CONTENT)
