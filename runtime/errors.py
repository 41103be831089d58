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
