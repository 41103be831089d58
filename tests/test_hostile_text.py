"""Issue 10, text and clients: invalid Unicode is refused everywhere text enters (HTTP 400 naming the
field, CLI exit 2, UserError), a tokenizer panic (a BaseException) is a clean error and never kills the
scheduler, and a request for another model is a 404 `model_not_found`.

Unicode policy: text that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800" sent as a JSON
escape, or an undecodable command-line byte) is refused, never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main
from edge_infer.contract.errors import TokenizerError, UserError
from edge_infer.contract.model_folder import MANIFEST, file_entry
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
BACKTRACK = "a" * 5000 + "b"  # `(a+)+$` on this makes onig give up: tokenizers panics


@pytest.fixture(scope="module")
def folder(tiny_exports):
    return tiny_exports("llama", "fp32")


@pytest.fixture(scope="module")
def panicky(folder, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer whose pre-tokenizer split regex backtracks catastrophically."""
    out = tmp_path_factory.mktemp("panicky") / "model"
    shutil.copytree(folder, out)
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tok["pre_tokenizer"]]}
    (out / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"]["tokenizer.json"] = file_entry(out / "tokenizer.json")
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def model(panicky):
    return edge_infer.load(panicky, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, ServerConfig(model_id="tiny", model_aliases=("tiny-alias",)),
                    EngineConfig(parallel=2, prefill_chunk=8))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def post(server, path: str, raw: str) -> httpx.Response:
    """A body sent as written: JSON escapes such as \\ud800 reach the server untouched."""
    return httpx.post(server.url + path, content=raw.encode(), headers={"Content-Type": "application/json"},
                      timeout=60)


# -- invalid Unicode ------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":2}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages":[{"role":"system","content":"ok"},{"role":"user","content":"x\\udfffy"}]}',
     "messages[1].content"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udc80"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","name":"\\ud800","content":"hi"}]}', "messages[0].name"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"stop":["ok","\\ud800"]}', "stop[1]"),
    ("/v1/completions", '{"prompt":"a\\ud800b","max_tokens":2}', "prompt"),
    ("/v1/completions", '{"prompt":["a\\ud800b"],"max_tokens":2}', "prompt"),
    ("/v1/completions", '{"prompt":"ok","stop":"\\udbff"}', "stop"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_unicode" and "not valid Unicode" in err["message"]


def test_a_json_dumps_body_with_a_lone_surrogate_is_400(server):
    # The openai client itself cannot send one (it encodes UTF-8 strictly); Python's json.dumps, requests
    # and most other clients escape it as \ud800, which any JSON parser turns back into a lone surrogate.
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2})
    assert "\\ud800" in body
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and "U+D800" in r.json()["error"]["message"], r.text


def test_python_api_raises_user_error(model):
    for prompt in ("a\ud800b", [{"role": "user", "content": "a\udcffb"}],
                   [{"role": "system", "content": "\ud800"}, {"role": "user", "content": "hi"}]):
        with pytest.raises(UserError, match="not valid Unicode"):
            edge_infer.generate(model, prompt, max_tokens=2)
    with pytest.raises(UserError, match=r"stop\[0\] is not valid Unicode"):
        edge_infer.generate(model, "hello", max_tokens=2, stop=["\ud800"])


def cli_run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.output


def test_cli_refuses_invalid_text_with_exit_2(panicky):
    code, out = cli_run("run", str(panicky), "a\udcffb", "--no-stats")  # what Python makes of argv b"a\xffb"
    assert code == 2 and "undecodable byte 0xff" in out and "Traceback" not in out, out
    code, out = cli_run("run", str(panicky), "hi", "--system", "\ud800", "--no-stats")
    assert code == 2 and "not valid Unicode" in out, out
    code, out = cli_run("run", str(panicky), "hi", "--stop", "\udcfe", "--no-stats", "--max-tokens", "2")
    assert code == 2 and "--stop is not valid Unicode" in out, out


def test_cli_undecodable_argv_bytes_in_a_real_process(panicky):
    exe = Path(sys.executable).with_name("edge-infer")
    r = subprocess.run([str(exe), "run", os.fsencode(panicky), b"a\xffb", "--no-stats"], capture_output=True,
                       timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "undecodable byte 0xff" in err and "Traceback" not in err, err


def test_chat_skips_an_invalid_line_and_goes_on(panicky):
    r = CliRunner().invoke(main, ["chat", str(panicky), "--max-tokens", "2"], input=b"a\xffb\nhello\n",
                           catch_exceptions=False)
    assert r.exit_code == 0 and "undecodable byte 0xff" in r.output and r.output.count(">>> ") == 3, r.output


# -- BaseException from the tokenizer, and the scheduler's boundary --------------------------

def test_tokenizer_panic_is_a_clean_error_in_the_api_and_cli(model, panicky):
    with pytest.raises(TokenizerError, match="PanicException"):
        edge_infer.generate(model, BACKTRACK, max_tokens=2)
    code, out = cli_run("run", str(panicky), BACKTRACK, "--raw", "--no-stats")
    assert code == 2 and "tokenizer failed" in out and "Traceback" not in out, out


def test_tokenizer_panic_is_500_without_retry_and_the_server_goes_on(server, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny", prompt=BACKTRACK, max_tokens=2)
    assert e.value.code == "tokenizer_failed" and e.value.response.headers["x-should-retry"] == "false"
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


class Boom(BaseException):
    """Stands in for any BaseException a library may raise inside a model step."""


class FailsOnce:
    """The model, whose first prefill raises Boom (the scheduler thread sees a BaseException)."""

    def __init__(self, model):
        self._model, self.armed = model, True

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, *a, **kw):
        if self.armed:
            self.armed = False
            raise Boom("injected")
        return self._model.forward(*a, **kw)


def test_scheduler_survives_a_base_exception_in_one_request(model):
    app = build_app(FailsOnce(model), ServerConfig(model_id="m"), EngineConfig(parallel=2, prefill_chunk=8))
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="m", prompt="The quick brown", max_tokens=4)
        r = c.completions.create(model="m", prompt="The quick brown", max_tokens=4)
        assert r.usage.completion_tokens >= 1
        assert app.state.engine.alive


# -- the model a request names ----------------------------------------------------------------

def test_another_model_is_404_model_not_found(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model" and "'gpt-4'" in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    listed = [m.id for m in client.models.list().data]
    assert listed == ["tiny"]
    for name in ("tiny", "tiny-alias"):
        assert client.chat.completions.create(model=name, messages=HELLO, max_tokens=2).model == "tiny"
    assert client.models.retrieve("tiny-alias").id == "tiny"
    r = post(server, "/v1/chat/completions", '{"model":"\\ud800","messages":[{"role":"user","content":"x"}]}')
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
