"""`edge-infer chat`: the interactive loop over a ChatSession.

Line editing and history come from the standard library's `readline` (GNU readline on Linux,
libedit on macOS; nothing to install, so it works on an air-gapped machine): arrow keys move and
recall, Ctrl-R searches, and the history is kept across sessions in
$XDG_STATE_HOME/edge-infer/chat_history (~/.local/state/...). Where readline is missing (Windows)
input is plain lines. A message of several lines goes between two lines of `\"\"\"`, or each line
but the last ends with a backslash. Commands start with `/` (`/help` lists them).

A chat runs for as long as its user types, and the machine changes meanwhile: before a reply, the
pause since the last one (2 s at least) says whether the threads should spin (devices/contention.py),
and the model's session is reopened when that changed (Model.respin), with a line that says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable

import click

from edge_infer.contract.errors import UserError, check_text
from edge_infer.devices import contention

HELP = """commands:
  /help                      this list
  /system [TEXT]             set the system message (no TEXT: show it; /system - removes it)
  /set [NAME VALUE]          set a sampling option: temperature, top_p, top_k, min_p, repetition_penalty,
                             presence_penalty, frequency_penalty, seed, max_tokens (no NAME: show them)
  /clear                     forget the conversation (the system message stays)
  /save FILE                 write the conversation and settings to FILE (JSON)
  /load FILE                 continue a conversation saved with /save
  /exit, /quit, Ctrl-D       leave
a message of several lines: between two lines of \"\"\", or end each line but the last with \\
Ctrl-C stops a reply; arrow keys edit and recall earlier lines."""

FENCE = '"""'
HISTORY_LINES = 1000


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edge-infer" / "chat_history"


def _line_editing() -> Callable[[], None] | None:
    """Turn on readline for input() when stdin is a terminal; returns the function that saves the history."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input
        return None
    path = history_file()
    try:
        readline.read_history_file(str(path))
    except OSError:  # none yet, or unreadable: start empty
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(path))
        except OSError as e:
            click.echo(f"[history not saved: {e}]", err=True)

    return save


class Repl:
    def __init__(self, session, stats: Callable | None = None, hide_thinking: bool = False,
                 watch: contention.Watch | None = None):
        self.hide_thinking = hide_thinking
        self.session, self.stats = session, stats
        # Between replies the machine may change: the idle time before a message decides whether the
        # threads spin for its reply (devices/contention.py; one window, the whole pause, of 2 s at least).
        self.watch = (watch or session.model.spinning_watch(confirm=1)) if session.model.respinnable else None
        if self.watch is not None:
            self.watch.idle()
        self.commands = {"/help": self.help, "/system": self.system, "/set": self.set, "/clear": self.clear,
                         "/reset": self.clear, "/save": self.save, "/load": self.load}

    def run(self) -> None:
        save_history = _line_editing()
        click.echo("Type a message (/help for commands; /exit or Ctrl-D quits).", err=True)
        if hasattr(sys.stdin, "reconfigure"):  # a bad byte becomes a surrogate that check_text names
            sys.stdin.reconfigure(errors="surrogateescape")
        try:
            while True:
                text = self.read_message()
                if text is None:
                    return
                if text.strip() in ("/exit", "/quit"):
                    return
                self.handle(text)
        finally:
            if save_history is not None:
                save_history()

    def read_message(self) -> str | None:
        """The next message or command; None at end of input."""
        while True:
            try:
                line = input(">>> ")
                if line.strip() == FENCE:
                    return self._read_until_fence()
                lines = [line]
                while lines[-1].endswith("\\"):
                    lines[-1] = lines[-1][:-1]
                    lines.append(input("... "))
                return "\n".join(lines)
            except UnicodeDecodeError:
                click.echo("error: that line is not valid UTF-8; type it again", err=True)
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /exit quits)", err=True)
            except EOFError:
                click.echo()
                return None

    def _read_until_fence(self) -> str:
        lines: list[str] = []
        while True:
            line = input("... ")
            if line.strip() == FENCE:
                return "\n".join(lines)
            lines.append(line)

    def handle(self, text: str) -> None:
        if not text.strip():
            return
        name, _, rest = text.strip().partition(" ")
        try:
            if name.startswith("/") and "\n" not in name:
                if name not in self.commands:
                    raise UserError(f"unknown command {name}; /help lists them")
                self.commands[name](rest.strip())
            else:
                check_text(text, "that message")
                self.reply(text)
        except UserError as e:  # one bad line does not end the chat
            click.echo(f"error: {e}", err=True)

    def follow_the_machine(self) -> None:
        """Before a reply: reopen the model's session with the spinning the pause before it calls for."""
        if self.watch is None:
            return
        change = self.watch.poll()
        self.watch.busy()
        if change is None:
            return
        state = "on" if change.on else "off"
        try:
            seconds = self.session.model.respin(change)
        except Exception as e:  # noqa: BLE001 - the chat goes on with the spinning it had
            click.echo(f"[could not reopen the session with threads spinning {state} ({e}); they stay as they "
                       "were]", err=True)
            self.watch = None
            return
        self.watch.now_on(change.on)
        click.echo(f"[threads now spinning {state} ({change.reason}); session reopened in {seconds:.1f} s]", err=True)

    def reply(self, text: str) -> None:
        self.follow_the_machine()
        try:
            self._reply(text)
        finally:
            if self.watch is not None:
                self.watch.idle()

    def _reply(self, text: str) -> None:
        from edge_infer.runtime.cli_options import ReplyPrinter

        last, parts = None, []
        printer = ReplyPrinter(self.session.model, self.hide_thinking, self.session.template_kwargs)
        try:
            for chunk in self.session.send(text):
                printer.feed(chunk.text)
                parts.append(chunk.text)
                last = chunk
            printer.finish()
        except KeyboardInterrupt:
            self.session.interrupted("".join(parts))
            click.echo("\n[stopped]", err=True)
            return
        click.echo()
        if self.session.dropped:
            click.echo(f"[{self.session.dropped} oldest messages dropped to fit the context]", err=True)
        if self.stats is not None and last is not None and last.timings:
            self.stats(last)

    # -- commands ----------------------------------------------------------------------------------

    def help(self, rest: str) -> None:
        click.echo(HELP)

    def system(self, rest: str) -> None:
        if not rest:
            click.echo(f"system: {self.session.system!r}" if self.session.system else "no system message")
            return
        check_text(rest, "the system message")
        self.session.system = None if rest == "-" else rest
        click.echo("[system message removed]" if rest == "-" else "[system message set]", err=True)

    def settings(self) -> dict:
        return {**dataclasses.asdict(self.session.sampling), "max_tokens": self.session.max_tokens}

    def set(self, rest: str) -> None:
        if not rest:
            click.echo(" ".join(f"{k}={v}" for k, v in self.settings().items()))
            return
        name, _, value = rest.partition(" ")
        self.apply_settings({name: _number(name, value.strip())})
        click.echo(f"[{name} = {value.strip()}]", err=True)

    def apply_settings(self, values: dict) -> None:
        from edge_infer.runtime.sampling import SamplingParams

        values = dict(values)
        if "max_tokens" in values:
            n = values.pop("max_tokens")
            if n is not None and (not isinstance(n, int) or n < 1):
                raise UserError(f"max_tokens must be a positive integer, got {n!r}")
            self.session.max_tokens = n
        self.session.sampling = SamplingParams.from_dict({**dataclasses.asdict(self.session.sampling), **values})

    def clear(self, rest: str) -> None:
        self.session.reset()
        click.echo("[conversation cleared]", err=True)

    def save(self, rest: str) -> None:
        if not rest:
            raise UserError("/save needs a file name: /save chat.json")
        doc = {"system": self.session.system, "messages": self.session.history, "settings": self.settings()}
        try:
            Path(rest).expanduser().write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {rest}: {e.strerror}") from None
        click.echo(f"[saved {len(self.session.history)} messages to {rest}]", err=True)

    def load(self, rest: str) -> None:
        if not rest:
            raise UserError("/load needs a file name: /load chat.json")
        doc = _read_conversation(Path(rest).expanduser())
        self.apply_settings(doc.get("settings") or {})
        self.session.reset()
        self.session.system = doc.get("system")
        self.session.history.extend(doc["messages"])
        click.echo(f"[loaded {len(doc['messages'])} messages from {rest}]", err=True)


def _number(name: str, value: str) -> int | float | None:
    if not value:
        raise UserError(f"/set {name} needs a value, e.g. /set temperature 0.7")
    if value.lower() in ("none", "off") and name in ("seed", "max_tokens"):
        return None
    try:
        return int(value) if name in ("top_k", "seed", "max_tokens") else float(value)
    except ValueError:
        raise UserError(f"/set {name}: {value!r} is not a number") from None


def _read_conversation(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a conversation saved with /save (not JSON)") from None
    messages = doc.get("messages") if isinstance(doc, dict) else None
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in messages)
    if not ok or not isinstance(doc.get("system"), (str, type(None))):
        raise UserError(f"{path} is not a conversation saved with /save (it needs 'messages': a list of "
                        "{'role': 'user' | 'assistant', 'content': text})")
    return doc
