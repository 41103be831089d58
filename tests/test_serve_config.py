"""Server settings and request parsing, without a model."""

import pytest

from edge_infer.contract.errors import UserError
from edge_infer.serve.config import EngineConfig, ServerConfig, is_loopback
from edge_infer.serve.protocol import APIError, ChunkWriter, parse_chat, parse_completion


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
                                        ("localhost", True), ("0.0.0.0", False), ("::", False),
                                        ("192.168.1.5", False), ("example.com", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_non_loopback_bind_needs_a_key():
    with pytest.raises(UserError, match="needs an API key"):
        ServerConfig(model_id="m", host="0.0.0.0").validate()
    ServerConfig(model_id="m", host="0.0.0.0", api_key="k").validate()
    ServerConfig(model_id="m").validate()


@pytest.mark.parametrize("origins", [("*",), ("http://*.example.com",), ("localhost:3000",), ("http://a.b/",)])
def test_cors_origins_must_be_exact(origins):
    with pytest.raises(UserError):
        ServerConfig(model_id="m", cors_origins=origins).validate()


def test_host_allow_list():
    c = ServerConfig(model_id="m", allowed_hosts=("box.lan",))
    for ok in ("localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "box.lan", "BOX.lan:80", "localhost."):
        assert c.host_allowed(ok), ok
    for bad in (None, "", "evil.com", "localhost.evil.com", "127.0.0.1.nip.io", "192.168.1.5"):
        assert not c.host_allowed(bad), bad
    bound = ServerConfig(model_id="m", host="192.168.1.5", api_key="k")
    assert bound.host_allowed("192.168.1.5:8000") and not bound.host_allowed("192.168.1.6")
    assert not ServerConfig(model_id="m", host="0.0.0.0", api_key="k").host_allowed("0.0.0.0")


def test_engine_config_bounds():
    EngineConfig().validate()
    for bad in (EngineConfig(parallel=0), EngineConfig(max_length=1), EngineConfig(prefill_chunk=0),
                EngineConfig(max_queue=-1)):
        with pytest.raises(UserError):
            bad.validate()


def test_parse_chat_maps_roles_parts_and_seed():
    p = parse_chat({"model": "x", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "u"}],
        "max_completion_tokens": 7, "max_tokens": 99, "seed": -1, "temperature": 0.5, "top_k": 5, "min_p": 0.1,
        "stop": "x", "user": "someone", "logprobs": False, "response_format": {"type": "text"}}, 4, 100)
    assert p.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert p.max_tokens == 7 and p.stop == ("x",) and not p.stream
    assert p.sampling.seed == 2**64 - 1 and p.sampling.top_k == 5 and p.sampling.temperature == 0.5


def test_parse_completion_prompt_forms():
    assert parse_completion({"prompt": ["hi"]}, 4, 100).prompt == "hi"
    assert parse_completion({"prompt": [[1, 2]]}, 4, 100).prompt == [1, 2]
    for bad, param in ((["a", "b"], "prompt"), ([1, 200], "prompt"), ("", "prompt"), (None, "prompt")):
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": bad}, 4, 100)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(APIError, match="echo"):
        parse_completion({"prompt": "x", "echo": True}, 4, 100)


def test_stream_chunks_carry_null_usage_until_the_last():
    w = ChunkWriter("chat", "chatcmpl-1", "m", include_usage=True)
    assert b'"usage":null' in w.start() and b'"usage":null' in w.delta("hi")
    assert b'"finish_reason":"stop"' in w.delta("", "stop")


def test_server_imports_no_heavy_modules_and_the_cli_no_server_modules():
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "import edge_infer.cli\n"
        "cli = sorted(k for k in sys.modules if k.split('.')[0] in ('fastapi', 'uvicorn', 'prometheus_client'))\n"
        "import edge_infer.serve.app, edge_infer.serve.runner\n"
        "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(json.dumps({'cli': cli, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cli": [], "heavy": []}
