"""Errors meant for people.

A `UserError` is a bad input (a missing file, an invalid option, a prompt that
does not fit): the CLI prints its message on one line and exits 2. Anything
else is an internal failure (exit 1).
"""


class UserError(Exception):
    """A bad input: the message names the problem and what to do about it."""


class ModelFileError(UserError):
    """A model folder or source file is missing, corrupt or unsupported."""


class ContextLengthError(UserError):
    """A prompt (plus the tokens asked for) does not fit the context."""

    code = "context_length_exceeded"


class TokenizerError(ModelFileError):
    """The model's own tokenizer failed on a text (a panic in the tokenizers library, a runaway regex)."""

    code = "tokenizer_failed"


def is_interrupt(e: BaseException) -> bool:
    """Exceptions that keep their meaning at every error boundary: they are re-raised, never answered."""
    return isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


def check_text(text: str, what: str) -> str:
    """`text` itself if it is valid Unicode; else a UserError naming `what` and the bad character.

    Policy: text that cannot be encoded as UTF-8 is refused, never replaced. That is a lone
    surrogate, such as "\\ud800" sent as a JSON escape, or an undecodable byte of a command-line
    argument, which Python carries as a surrogate in U+DC80..U+DCFF (surrogateescape).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        cp = ord(text[e.start])
        what_char = (f"the undecodable byte 0x{cp - 0xDC00:02x}" if 0xDC80 <= cp <= 0xDCFF
                     else f"the lone surrogate U+{cp:04X}")
        raise UserError(f"{what} is not valid Unicode: {what_char} at character {e.start}; "
                        "send UTF-8 text") from None
    return text
