"""A program on a pseudo-terminal (stdlib pty), driven as a person at a keyboard would: send keys,
wait for text on the screen. For the tests of what a terminal shows (bars, the chat REPL)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

HANG = 120.0  # seconds: a wait this long means a hang, never a slow machine
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def edge_infer_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_infer.cli", *map(str, args)]


class Terminal:
    def __init__(self, argv: list[str], cols: int = 120, rows: int = 40, env: dict | None = None):
        env = {**os.environ, "TERM": "xterm", "COLUMNS": str(cols), **(env or {})}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its stdin, stdout and stderr
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.raw = ""  # everything the program wrote
        self.seen = 0  # how far `expect` has read, in text()

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the program ended: EIO on Linux
            data = b""
        if not data:
            raise EOFError
        self.raw += data.decode("utf-8", "replace")
        return True

    def expect(self, pattern: str, timeout: float = HANG) -> re.Match:
        """Wait for `pattern` (a regex) in the output after the last match, escape codes removed."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()[self.seen:]
            m = re.search(pattern, text)
            if m:
                self.seen += m.end()
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r}; the screen ends with {text[-2000:]!r}"
            try:
                self._read(min(left, 0.5))
            except EOFError:
                raise AssertionError(f"the program ended before {pattern!r}; it wrote {text[-2000:]!r}") from None

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = HANG) -> int:
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._read(0.2)
            except EOFError:
                break
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._drain()
                return os.waitstatus_to_exitcode(status)
        _, status = os.waitpid(self.pid, 0) if time.monotonic() < deadline else self._kill()
        return os.waitstatus_to_exitcode(status)

    def _drain(self) -> None:
        try:
            while self._read(0.05):
                pass
        except EOFError:
            pass

    def _kill(self):
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the program did not end; it wrote {ANSI.sub('', self.raw)[-2000:]!r}")

    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
