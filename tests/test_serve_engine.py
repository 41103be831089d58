"""The engine under load: isolation, prefix cache, cancellation, capacity, shutdown.

Tiny random model; a SlowModel wrapper makes decode steps take a known time where a test
needs requests to overlap, and counts them; it can hold its steps until the test lets them
go, so "within a step" is a count of steps, not a time. Timeouts here only catch hangs.
"""

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.runtime.generate import decode_tokens, encode_prompt, generate
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.engine import Engine, QueueFull
from edge_infer.serve.runner import ServerThread
from edge_infer.serve.request import Delta, GenerationRequest

PROMPTS = [
    "The quick brown fox", "Paris is the capital of France. Numbers 0123456789 and code:",
    "Emoji 🙂🚀👍🏽", "def f(x): return x * 2\n\tTabs", "Émile a mangé une crème brûlée. 日本語のテキスト。中文文本。",
    "and", "The quick brown fox jumps over the lazy dog. Paris is", "Numbers 0123456789",
]


HANG = 60.0  # seconds: a wait this long means a hang, never a slow machine


class SlowModel:
    """The model with a fixed delay per decode step, counting its steps.

    hold_after=n: steps after the n-th wait until `release` is set (the test sets it), so a
    request cannot run to its end while the test is still arranging what it checks.
    """

    def __init__(self, model, delay: float, hold_after: int | None = None):
        self._model, self.delay, self.hold_after = model, delay, hold_after
        self.steps = 0
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_rows(self, *args):  # the engine's batched step
        self.steps += 1
        if self.hold_after is not None and self.steps > self.hold_after:
            assert self.release.wait(HANG), "the test never released the held step"
        time.sleep(self.delay)
        return self._model.forward_rows(*args)


def steps_at_cancel(monkeypatch, slow: SlowModel) -> list[int]:
    """slow.steps at each cancel from the HTTP side (the first is the one that counts); releases held steps."""
    from edge_infer.serve.request import Handle

    seen: list[int] = []
    cancel = Handle.cancel

    def spy(self):
        seen.append(slow.steps)
        slow.release.set()
        cancel(self)

    monkeypatch.setattr(Handle, "cancel", spy)
    return seen


@pytest.fixture(scope="module")
def path(tiny_exports):
    return tiny_exports("llama", "fp32")


@pytest.fixture(scope="module")
def model(path):
    return edge_infer.load(path, device="cpu", threads=1)


def wait_until(predicate, timeout=HANG) -> None:
    deadline = time.monotonic() + timeout  # a hang guard only
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def run_engine(engine: Engine, requests):
    """Submit all requests at once; return [(text, finished event)] in order."""
    queues = []
    for r in requests:
        q = queue.Queue()
        engine.submit(r, q.put)
        queues.append(q)
    out = []
    for q in queues:
        parts = []
        while isinstance(event := q.get(timeout=HANG), Delta):
            parts.append(event.text)
        out.append(("".join(parts), event))
    return out


@pytest.mark.parametrize("parallel, chunk", [(1, 512), (2, 4), (3, 7), (8, 16)])
def test_isolation_grid_greedy_equals_solo(model, parallel, chunk):
    """Every response equals the request run alone, whatever runs beside it; twice, so the
    second round reuses cached prefixes."""
    engine = Engine(model, EngineConfig(parallel=parallel, prefill_chunk=chunk))
    engine.start()
    try:
        budgets = [5, 17, 30, 9, 24, 40, 12, 33]
        requests = [GenerationRequest(tuple(encode_prompt(model, p)), n, SamplingParams(), request_id=str(i))
                    for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
        want = [generate(model, p, max_tokens=n) for p, n in zip(PROMPTS, budgets)]
        for _ in range(2):
            got = run_engine(engine, requests)
            assert [text for text, _ in got] == want
        if parallel >= len(PROMPTS):  # the second round finds the first round's prompts in the slots
            assert sum(e.usage.cached_tokens == e.usage.prompt_tokens - 1 for _, e in got) >= len(PROMPTS) // 2
    finally:
        engine.stop()


def test_isolation_over_http_with_chat_and_prefix_sharing(model):
    """Concurrent chat requests sharing a system prompt, through the server, equal their solo runs."""
    system = {"role": "system", "content": "The quick brown fox jumps over the lazy dog."}
    convs = [[system, {"role": "user", "content": p}] for p in PROMPTS[:6]]
    want = [generate(model, c, max_tokens=20) for c in convs]

    async def main(url):
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[c.chat.completions.create(model="m", messages=m, max_tokens=20) for m in convs])
        await c.close()
        return rs

    app = build_app(model, ServerConfig(model_id="m"), EngineConfig(parallel=4, prefill_chunk=8))
    with ServerThread(app) as s:
        for _ in range(2):
            rs = asyncio.run(main(s.url))
            assert [r.choices[0].message.content for r in rs] == want
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in rs) > 0


def test_prefix_cache_places_the_next_turn_in_its_slot_and_evicts_lru(model):
    engine = Engine(model, EngineConfig(parallel=2, prefill_chunk=512))
    engine.start()
    try:
        def ids(text):
            return tuple(model.tokenizer.encode(text, add_special_tokens=False))

        a, b, c = ids("The quick brown fox jumps"), ids("Numbers 0123456789 and code"), ids("Émile a mangé")
        for prompt in (a, b):
            run_engine(engine, [GenerationRequest(prompt, 3, SamplingParams())])
        # The next turn of `a` finds a's slot: everything but the last prompt token is cached.
        (_, e), = run_engine(engine, [GenerationRequest(a + ids(" over the lazy dog"), 3, SamplingParams())])
        assert e.usage.cached_tokens >= len(a)
        # A new prompt evicts the least recently used slot (b's); a's turn is still cached.
        run_engine(engine, [GenerationRequest(c, 3, SamplingParams())])
        (_, e), = run_engine(engine, [GenerationRequest(a, 2, SamplingParams())])
        assert e.usage.cached_tokens == len(a) - 1
        (_, e), = run_engine(engine, [GenerationRequest(b, 2, SamplingParams())])
        assert e.usage.cached_tokens == 0
    finally:
        engine.stop()


def test_turns_record_prefill_chunks_rows_and_what_each_row_chose(model):
    """A turn is data: the prefill's chunk, the rows of the decode pass with their request (at its
    slot's row), their guess limits; what the rows chose is the solo generation, token for token."""
    engine = Engine(model, EngineConfig(parallel=3, prefill_chunk=4))
    turns = []
    engine.observe(lambda turn, emitted: turns.append((turn, [(e.seq.request.request_id, e.tokens) for e in emitted])))
    prompts = [tuple(model.tokenizer.encode(p * 4, add_special_tokens=False))[:10] for p in PROMPTS[:2]]
    assert all(len(p) == 10 for p in prompts)
    engine.start()
    try:
        events = run_engine(engine, [GenerationRequest(p, 5, SamplingParams(), request_id=str(i))
                                     for i, p in enumerate(prompts)])
    finally:
        engine.stop()
    prefills = [(t.prefill.request.request_id, len(t.chunk)) for t, _ in turns if t.prefill is not None]
    assert prefills == [("0", 4), ("0", 4), ("0", 2), ("1", 4), ("1", 4), ("1", 2)]  # oldest first, chunk by chunk
    for turn, _ in turns:
        assert len(turn.limits) == len(turn.rows) and set(turn.limits) <= {0}  # no speculation: no guesses
        for i, q in enumerate(turn.rows):
            assert q is None or q.slot == turn.start + i  # the row a request decodes on is its slot's
    chosen: dict[str, list[int]] = {}
    for _, emitted in turns:
        for rid, tokens in emitted:
            chosen.setdefault(rid, []).extend(tokens)
    for i, p in enumerate(prompts):
        solo = list(decode_tokens(model, list(p), model.new_cache(), make_sampler(SamplingParams()), 5))
        assert chosen[str(i)][:len(solo)] == solo and events[i][1].usage.completion_tokens == len(solo)


def test_long_prompt_prefill_does_not_stall_running_streams_beyond_a_chunk(model):
    """While a long prompt prefills chunk by chunk, a running stream gets a token every turn."""
    engine = Engine(SlowModel(model, 0.005), EngineConfig(parallel=2, prefill_chunk=4))
    turns = []  # for each turn that prefilled the long prompt: the requests that decoded in it

    def spy(turn, emitted):
        if turn.prefill is not None and turn.prefill.request.request_id == "long":
            turns.append([q.request.request_id for q in turn.rows if q is not None])

    engine.observe(spy)
    engine.start()
    try:
        q1, q2 = queue.Queue(), queue.Queue()
        runs_long = next(p for p in PROMPTS if len(model.tokenizer.encode(
            generate(model, p, max_tokens=60), add_special_tokens=False)) >= 40)  # no early eos
        engine.submit(GenerationRequest(tuple(encode_prompt(model, runs_long)), 60, SamplingParams()), q1.put)
        wait_until(lambda: not q1.empty())
        long = tuple(model.tokenizer.encode(PROMPTS[1] * 6, add_special_tokens=False))[:60]
        assert len(long) == 60
        engine.submit(GenerationRequest(long, 2, SamplingParams(), request_id="long"), q2.put)
        while isinstance(q2.get(timeout=HANG), Delta):
            pass
        assert len(turns) == 15  # 60 prompt tokens in chunks of 4
        assert turns[:-1] == [[""]] * 14  # the running stream advanced in every one of them
        assert sorted(turns[-1]) == ["", "long"]  # the last chunk's first token joins the decode pass
    finally:
        engine.stop()


def test_streaming_client_disconnect_frees_the_slot_within_a_step(model, monkeypatch):
    slow = SlowModel(model, 0.005, hold_after=8)  # after 8 steps it waits: the request cannot end by itself
    cancelled_at = steps_at_cancel(monkeypatch, slow)
    app = build_app(slow, ServerConfig(model_id="m"), EngineConfig(parallel=2))
    engine = app.state.engine
    with ServerThread(app) as s:
        body = {"prompt": "The quick brown fox", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=HANG) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"text":"' in line:
                    break
            assert engine.snapshot()["busy"] == 1
        wait_until(lambda: engine.snapshot()["busy"] == 0)
        # The close cancels the request; the step running then is the last one it takes.
        assert cancelled_at and slow.steps - cancelled_at[0] <= 1, (cancelled_at, slow.steps)
        text = httpx.get(s.url + "/metrics").text
        assert 'edge_infer_generations_total{reason="cancelled"} 1.0' in text
        completion = float(re.search(r"^edge_infer_completion_tokens_total (\S+)", text, re.M).group(1))
        assert completion < 100  # cancelled, not run to max_tokens


def test_non_streaming_client_disconnect_frees_the_slot(model, monkeypatch):
    slow = SlowModel(model, 0.0, hold_after=0)  # the first decode step waits for the cancel
    cancelled_at = steps_at_cancel(monkeypatch, slow)
    app = build_app(slow, ServerConfig(model_id="m"), EngineConfig(parallel=1))
    engine = app.state.engine
    with ServerThread(app) as s:
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"prompt": "The quick", "max_tokens": 100}).encode()
        with socket.create_connection((host, int(port)), timeout=HANG) as sock:  # a client that goes away
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                         b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)
            wait_until(lambda: engine.snapshot()["busy"] == 1 and slow.steps >= 1)  # running, no answer yet
        wait_until(lambda: engine.snapshot()["busy"] == 0)
        assert cancelled_at and slow.steps - cancelled_at[0] <= 1, (cancelled_at, slow.steps)
        assert 'edge_infer_generations_total{reason="cancelled"} 1.0' in httpx.get(s.url + "/metrics").text


def test_over_capacity_is_429_and_the_server_recovers(model):
    app = build_app(SlowModel(model, 0.02), ServerConfig(model_id="m"), EngineConfig(parallel=1, max_queue=1))
    engine = app.state.engine
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        streams = [c.completions.create(model="m", prompt="The quick", max_tokens=100, stream=True)]
        wait_until(lambda: engine.snapshot()["busy"] == 1)
        streams.append(c.completions.create(model="m", prompt="The quick", max_tokens=100, stream=True))
        wait_until(lambda: engine.snapshot()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="m", prompt="Paris", max_tokens=5)
        assert "at capacity" in e.value.message and e.value.response.headers["retry-after"] == "1"
        for st in streams:
            st.close()
        wait_until(lambda: engine.snapshot() == {"slots": 1, "busy": 0, "waiting": 0})
        assert c.completions.create(model="m", prompt="Paris", max_tokens=5).usage.completion_tokens >= 1
    e2 = Engine(model, EngineConfig(parallel=1, max_queue=0))  # not started: nothing leaves the queue
    e2.submit(GenerationRequest((1, 2), 3, SamplingParams()), lambda ev: None)  # takes the free slot
    with pytest.raises(QueueFull):  # no room to wait
        e2.submit(GenerationRequest((1, 2), 3, SamplingParams()), lambda ev: None)


def test_cli_refuses_non_loopback_host_without_key(path):
    from edge_infer.cli import main

    r = CliRunner().invoke(main, ["serve", str(path), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "needs an API key" in r.output
    r = CliRunner().invoke(main, ["serve", str(path), "--cors-origin", "*"])
    assert r.exit_code == 2 and "wildcards" in r.output


def test_sigterm_ends_streams_cleanly_and_exits_0(path, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k-123\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer.cli", "serve", str(path), "--port", "0",
                             "--api-key-file", str(key_file), "--parallel", "2", "--shutdown-grace", "1",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"at (http://\S+)/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, "no startup line"
        headers = {"Authorization": "Bearer k-123"}
        wait_until(lambda: _ok(url + "/health"))
        result = {"lines": []}
        streaming = threading.Event()

        def stream():
            body = {"prompt": "The quick", "max_tokens": 100, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=HANG) as r:
                for ln in r.iter_lines():
                    if ln:
                        result["lines"].append(ln)
                        streaming.set()

        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(HANG), "the stream never started"  # SIGTERM lands mid-stream, however loaded the machine
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG) == 0
        t.join(HANG)
        assert result["lines"][-1] == "data: [DONE]"  # finished, or ended with an error event, never cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ok(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_shutdown_ends_a_running_stream_with_an_error_event_after_the_grace(model):
    app = build_app(SlowModel(model, 0.02), ServerConfig(model_id="m"),
                    EngineConfig(parallel=1, shutdown_grace_s=0.2))
    s = ServerThread(app).__enter__()
    try:
        body = {"prompt": "The quick", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=HANG) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            rest = [ln for ln in lines if ln]
        # 100 steps of 20 ms outlast the 0.2 s grace: the stream ends with the shutdown error, not its length.
        assert '"code":"server_shutting_down"' in rest[-2] and rest[-1] == "data: [DONE]"
        s.thread.join(HANG)
        assert not s.thread.is_alive()
    finally:
        s.stop()


class MachineReading:
    """/proc/stat as a test sets it: other processes keep `others` cores of 2 busy, on the real clock."""

    def __init__(self, others: float):
        self.others, self.last, self.busy = others, time.monotonic(), 0.0

    def __call__(self):
        from edge_infer.devices.contention import CpuSample

        now = time.monotonic()
        self.busy += self.others * (now - self.last)
        self.last = now
        return CpuSample(now, self.busy, 0.0, 2)


def test_an_idle_engine_reopens_its_session_when_the_machine_changes(path, monkeypatch):
    """load's spinning choice fits the machine at start-up; an idle server follows the machine after it
    (devices/contention.py Watch, Model.respin), and answers the same before and after."""
    from edge_infer.devices import contention

    monkeypatch.delenv(contention.ENV, raising=False)
    model = edge_infer.load(path, device="cpu", threads=2)  # its own: the engine reopens this model's session
    assert model.respinnable
    first = model.spinning.on
    machine = MachineReading(others=2.0 if first else 0.0)  # the other choice's machine
    watch = contention.Watch(2, first, window_s=0.05, confirm=2, sampler=machine)
    prompt, budget = PROMPTS[1], 12
    want = generate(model, prompt, max_tokens=budget)
    request = GenerationRequest(tuple(encode_prompt(model, prompt)), budget, SamplingParams())
    engine = Engine(model, EngineConfig(parallel=2), watch=watch)
    engine.start()
    try:
        wait_until(lambda: model.spinning.on != first)
        option = model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert option == ("0" if first else "1") and "s idle (the last of 2 windows" in model.spinning.reason
        assert [text for text, _ in run_engine(engine, [request, request])] == [want, want]
        machine.others = 2.0 - machine.others  # the machine goes back
        wait_until(lambda: model.spinning.on == first)
        assert [text for text, _ in run_engine(engine, [request])] == [want]
        assert engine.metrics.session_reopens._value.get() == 2
        assert engine.metrics.spinning._value.get() == int(first)
    finally:
        engine.stop()


def test_a_session_that_fails_to_reopen_comes_back_as_it_was(path, monkeypatch, caplog):
    from edge_infer.devices import contention

    monkeypatch.delenv(contention.ENV, raising=False)
    model = edge_infer.load(path, device="cpu", threads=2)
    first = model.spinning.on
    opened = model._open_session
    calls = []

    def open_once_failing(options):
        calls.append(options)
        if len(calls) == 1:
            raise RuntimeError("no memory for a second session")
        return opened(options)

    monkeypatch.setattr(model, "_open_session", open_once_failing)
    watch = contention.Watch(2, first, window_s=0.05, confirm=2, sampler=MachineReading(2.0 if first else 0.0))
    prompt, budget = PROMPTS[0], 8
    want = generate(model, prompt, max_tokens=budget)
    engine = Engine(model, EngineConfig(parallel=1), watch=watch)
    engine.start()
    try:
        wait_until(lambda: len(calls) == 2)
        wait_until(lambda: engine._watch is None)  # it stops watching
        request = GenerationRequest(tuple(encode_prompt(model, prompt)), budget, SamplingParams())
        assert [text for text, _ in run_engine(engine, [request])] == [want]
        assert model.spinning.on == first and engine.metrics.session_reopens._value.get() == 0
        assert "no memory for a second session" in caplog.text
    finally:
        engine.stop()
