"""A multi-turn conversation over one KV cache: each turn reuses the cached prefix."""

from __future__ import annotations

from typing import Iterator, Sequence

from edge_infer.contract.errors import ContextLengthError
from edge_infer.runtime.chat_template import check_template_kwargs
from edge_infer.runtime.generate import DEFAULT_MAX_TOKENS, Chunk, encode_prompt, stream_generate
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import SamplingParams
from edge_infer.runtime.speculative import SpeculativeConfig


class ChatSession:
    def __init__(self, model: Model, system: str | None = None, max_tokens: int | None = None,
                 sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                 speculative: SpeculativeConfig | None = None, template_kwargs: dict | None = None):
        self.model = model
        self.template_kwargs = check_template_kwargs(template_kwargs)  # e.g. {"enable_thinking": False}
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingParams()
        self.stop = tuple(stop)
        self.cache = model.new_cache()
        self.speculative = speculative
        draft = speculative.draft if speculative is not None else None
        # The draft keeps its own prefix across turns, as the model does.
        self.draft_cache = draft.new_cache(max_length=min(draft.max_length, self.cache.max_length)) if draft else None
        self.history: list[dict] = []
        self.dropped = 0

    def reset(self) -> None:
        self.history.clear()
        self.cache.reset()

    def interrupted(self, partial: str) -> None:
        """A reply stopped part way (Ctrl-C in the REPL): what was shown stays as the assistant's turn."""
        if self.history and self.history[-1]["role"] == "user":
            self.history.append({"role": "assistant", "content": partial})

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def send(self, text: str) -> Iterator[Chunk]:
        """Stream the reply to `text`; drops the oldest turns when the conversation outgrows the context."""
        self.history.append({"role": "user", "content": text})
        self.dropped = 0
        room = self.max_tokens or DEFAULT_MAX_TOKENS
        while len(encode_prompt(self.model, self._messages(), self.template_kwargs)) + room > self.cache.max_length:
            if len(self.history) <= 1:
                self.history.pop()
                raise ContextLengthError("this message alone does not fit the context; send a shorter one")
            del self.history[:2 if len(self.history) > 2 else 1]  # a user turn and its reply
            self.dropped += 2
        reply = []
        for chunk in stream_generate(self.model, self._messages(), max_tokens=self.max_tokens,
                                     sampling=self.sampling, stop=self.stop, cache=self.cache,
                                     speculative=self.speculative, draft_cache=self.draft_cache,
                                     template_kwargs=self.template_kwargs):
            reply.append(chunk.text)
            yield chunk
        self.history.append({"role": "assistant", "content": "".join(reply)})
