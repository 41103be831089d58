"""`edge-infer chat` at a terminal (a pseudo-terminal, keys sent as a person types them): readline
editing and history (arrow keys edit and recall, never print escape codes), multi-line messages,
/system, /set, /save, /load, /clear, /help; each reply equals the runtime's for the same messages."""

from __future__ import annotations

import json

import pytest
from terminal import Terminal, edge_infer_argv

import edge_infer
from edge_infer.runtime.generate import generate
from edge_infer.runtime.sampling import SamplingParams

LEFT, UP, BACKSPACE, ENTER = "\x1b[D", "\x1b[A", "\x7f", "\r"
PROMPT = r">>> $"


@pytest.fixture(scope="module")
def folder(tiny_exports):
    return tiny_exports("llama", "fp32")


@pytest.fixture
def term(folder, tmp_path):
    t = Terminal(edge_infer_argv("chat", folder, "--max-tokens", "5", "--device", "cpu", "--threads", "1"),
                 env={"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")})
    t.expect(PROMPT)
    yield t
    t.close()


def say(term: Terminal, keys: str, until: str = PROMPT) -> str:
    term.send(keys)
    return term.expect(until).string


def saved(term: Terminal, path) -> dict:
    say(term, f"/save {path}{ENTER}", r"\[saved \d+ messages")
    term.expect(PROMPT)
    return json.loads(path.read_text())


def test_editing_history_and_multiline_reach_the_model(term, folder, tmp_path):
    say(term, f"helo{LEFT}l{ENTER}")  # an arrow key moves the cursor: "hello", no escape codes sent
    say(term, f"{UP}{BACKSPACE}{BACKSPACE}p!{ENTER}")  # recalls "hello", edits it to "help!"
    say(term, f'"""{ENTER}line one{ENTER}line two{ENTER}"""{ENTER}')
    say(term, f"a \\{ENTER}b{ENTER}")  # a trailing backslash continues the message
    doc = saved(term, tmp_path / "c.json")
    users = [m["content"] for m in doc["messages"] if m["role"] == "user"]
    assert users == ["hello", "help!", "line one\nline two", "a \nb"]
    model = edge_infer.load(folder, device="cpu", threads=1)
    history: list[dict] = []
    for m in doc["messages"]:  # every reply is the runtime's own for the conversation so far
        if m["role"] == "assistant":
            assert m["content"] == generate(model, history, max_tokens=5), history
        history.append(m)
    assert "\x1b[D" not in term.text() and "^[[" not in term.text()
    term.send("/exit" + ENTER)
    assert term.wait() == 0
    recalled = (tmp_path / "state" / "edge-infer" / "chat_history").read_text()
    assert "hello" in recalled and "help!" in recalled  # history kept for the next session


def test_commands(term, folder, tmp_path):
    screen = say(term, f"/help{ENTER}")
    for command in ("/system", "/set", "/save", "/load", "/clear", "/exit"):
        assert command in screen
    say(term, f"/system Answer in French.{ENTER}")
    say(term, f"/set temperature 0.7{ENTER}")
    say(term, f"/set seed 3{ENTER}")
    assert "not a number" in say(term, f"/set temperature warm{ENTER}")
    assert "temperature must be" in say(term, f"/set temperature -1{ENTER}")  # SamplingParams' own check
    say(term, f"Paris is{ENTER}")
    doc = saved(term, tmp_path / "a.json")
    assert doc["system"] == "Answer in French." and doc["settings"]["temperature"] == 0.7
    assert doc["settings"]["seed"] == 3 and doc["messages"][0] == {"role": "user", "content": "Paris is"}
    model = edge_infer.load(folder, device="cpu", threads=1)
    messages = [{"role": "system", "content": "Answer in French."}, doc["messages"][0]]
    expected = generate(model, messages, max_tokens=5, sampling=SamplingParams(temperature=0.7, seed=3))
    assert doc["messages"][1]["content"] == expected

    say(term, f"/clear{ENTER}")
    assert saved(term, tmp_path / "b.json")["messages"] == []
    say(term, f"/load {tmp_path / 'a.json'}{ENTER}")
    assert saved(term, tmp_path / "c.json") == doc
    assert "not a conversation saved with /save" in say(term, f"/load {folder / 'manifest.json'}{ENTER}")
    assert "unknown command /frobnicate" in say(term, f"/frobnicate{ENTER}")
    term.send("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_a_reply_after_a_pause_follows_the_machine(folder, monkeypatch, capsys):
    """The pause before a message decides the reply's spinning (devices/contention.py Watch, one window),
    and the reply is the same text either way."""
    from edge_infer.devices import contention
    from edge_infer.runtime.chat import ChatSession
    from edge_infer.runtime.repl import Repl

    monkeypatch.delenv(contention.ENV, raising=False)
    model = edge_infer.load(folder, device="cpu", threads=2)
    first = model.spinning.on
    readings = iter([(0.0, 0.0), (1.0, 2.0 if first else 0.0)] + [(t, 0.0) for t in range(2, 9)])

    def machine():  # a pause of 1 s in which other processes used all or none of 2 CPUs, then quiet
        wall, busy = next(readings)
        return contention.CpuSample(wall, busy, 0.0, 2)

    repl = Repl(ChatSession(model, max_tokens=5), watch=contention.Watch(2, first, window_s=0.0, confirm=1,
                                                                          sampler=machine))
    repl.watch.idle()
    repl.reply("hello")
    err = capsys.readouterr().err
    assert model.spinning.on != first and f"threads now spinning {'off' if first else 'on'}" in err
    assert repl.session.history[-1]["content"] == generate(model, [{"role": "user", "content": "hello"}],
                                                           max_tokens=5)


def test_a_session_that_fails_to_reopen_leaves_the_chat_as_it_was(folder, monkeypatch, capsys):
    from edge_infer.devices import contention
    from edge_infer.runtime.chat import ChatSession
    from edge_infer.runtime.repl import Repl

    monkeypatch.delenv(contention.ENV, raising=False)
    model = edge_infer.load(folder, device="cpu", threads=2)
    first, opened, calls = model.spinning.on, model._open_session, []

    def open_once_failing(options):
        calls.append(options)
        if len(calls) == 1:
            raise RuntimeError("no memory for a second session")
        return opened(options)

    monkeypatch.setattr(model, "_open_session", open_once_failing)
    readings = iter([(0.0, 0.0), (1.0, 2.0 if first else 0.0)])
    watch = contention.Watch(2, first, window_s=0.0, confirm=1,
                             sampler=lambda: contention.CpuSample(*next(readings), 0.0, 2))
    repl = Repl(ChatSession(model, max_tokens=5), watch=watch)
    repl.reply("hello")
    assert "could not reopen the session" in capsys.readouterr().err and repl.watch is None
    assert len(calls) == 2 and model.spinning.on == first
    assert repl.session.history[-1]["content"] == generate(model, [{"role": "user", "content": "hello"}],
                                                           max_tokens=5)
