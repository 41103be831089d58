"""The chat page at `/`, driven in a real headless Chromium (Debian's `chromium`, through Playwright;
no browser download): it streams a conversation from the real server and a real tiny model, stops a
reply and frees the server's slot, and shows model output containing HTML as text.

The model is the tiny random llama export behind the real engine and SSE route. To see a reply
while it is still streaming, and to stop it before it ends, its decode steps are slowed or held
(tests/test_serve_engine.py SlowModel: the real model's forward pass, with a wait before it). To
make the model answer with `<script>`, the page's "extra request fields" setting sends a
response_format whose JSON schema has that string as its only value: the engine's grammar forces
the real model's tokens, which arrive through the same SSE stream as any reply.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
from test_serve_engine import HANG, SlowModel, steps_at_cancel, wait_until

import edge_infer
from edge_infer.runtime.generate import generate
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

KEY = "page-key-0123456789"
QUESTION = "Paris is the capital of France."
MS = int(HANG * 1000)


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def serve(model, slow: SlowModel, api_key: str | None = KEY) -> ServerThread:
    app = build_app(slow, ServerConfig(model_id="tiny", api_key=api_key), EngineConfig(parallel=2))
    return ServerThread(app)


def open_page(browser, server, settings: dict | None = None):
    """A fresh page (its own localStorage) with the key typed into the dialog the 401 brought up."""
    page = browser.new_page()
    page.set_default_timeout(MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_selector("body.ready")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny"]
    page.click("#settings summary")
    for field, value in {"temperature": "0", "max-tokens": "12", **(settings or {})}.items():
        page.fill(f"#{field}", value)
        page.dispatch_event(f"#{field}", "change")
    page.errors = errors
    return page


def test_waits_are_functions_because_the_pages_csp_refuses_eval(model, browser):
    """page.wait_for_function with a bare expression compiles it with eval in the page once it has to poll,
    which the page's Content-Security-Policy (no 'unsafe-eval') refuses: the waits here pass functions
    ("() => ..."), which Playwright calls without eval. Both shown on the real page, the condition true
    only after a few polls."""
    from playwright.sync_api import Error

    with serve(model, SlowModel(model, 0.0)) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.evaluate("() => { setTimeout(() => { document.body.dataset.later = '1'; }, 300); }")
        with pytest.raises(Error, match="unsafe-eval"):
            page.wait_for_function("document.body.dataset.later === '2'", timeout=MS)
        page.evaluate("() => { setTimeout(() => { document.body.dataset.later = '2'; }, 300); }")
        page.wait_for_function("() => document.body.dataset.later === '2'", timeout=MS)
        assert page.evaluate("() => document.body.dataset.later") == "2"
        page.close()


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def stored_reply(page) -> dict:
    conversations = json.loads(page.evaluate("localStorage.getItem('edge-infer.conversations')"))
    return conversations[0]["messages"][-1]


def test_page_is_served_without_a_key_and_scripts_only_from_itself(model):
    with serve(model, SlowModel(model, 0.0)) as s:
        r = httpx.get(s.url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        for src in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert src.startswith("/ui/") or src == "data:,", src  # nothing from another host
            if src.startswith("/ui/"):
                assert httpx.get(s.url + src).status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        for name in ("app.py", "..%2Fapp.py", "index.html%00.js"):  # only the shipped list, never a file path
            assert httpx.get(f"{s.url}/ui/{name}", headers=auth).status_code == 404
        assert httpx.get(s.url + "/v1/models").status_code == 401  # the API still needs the key


def test_a_conversation_streams_and_matches_the_runtime(model, browser):
    slow = SlowModel(model, 0.0, hold_after=4)  # a few tokens out, then held until the test releases it
    with serve(model, slow) as s:
        page = open_page(browser, s)
        ask(page, QUESTION)
        page.wait_for_function("() => document.querySelector('.msg.assistant .md')?.textContent.length > 0")
        wait_until(lambda: slow.steps > 4)
        assert page.is_visible("#stop") and not page.is_visible("#send")  # still streaming: partial text shown
        partial = page.text_content(".msg.assistant .md")
        slow.release.set()
        page.wait_for_selector("#send", state="visible")
        reply = stored_reply(page)
        expected = generate(model, [{"role": "user", "content": QUESTION}], max_tokens=12)
        assert reply["content"] == expected and reply["role"] == "assistant"
        assert len(partial) < len(page.text_content(".msg.assistant .md"))
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s", page.text_content(".msg.assistant .stats"))
        assert page.text_content(".msg.user") == QUESTION
        page.reload()  # the conversation is kept in localStorage
        page.wait_for_selector("body.ready")
        assert page.text_content(".msg.user") == QUESTION and stored_reply(page)["content"] == expected
        assert page.errors == []
        page.close()


def test_stop_cancels_the_request_and_frees_the_slot(model, browser, monkeypatch):
    slow = SlowModel(model, 0.0, hold_after=3)  # the request cannot end by itself
    cancelled_at = steps_at_cancel(monkeypatch, slow)
    with serve(model, slow) as s:
        engine = s.engine
        page = open_page(browser, s, {"max-tokens": "60"})
        ask(page, QUESTION)
        wait_until(lambda: engine.snapshot()["busy"] == 1 and slow.steps > 3)
        page.click("#stop")
        wait_until(lambda: engine.snapshot()["busy"] == 0)
        assert cancelled_at and slow.steps - cancelled_at[0] <= 1, (cancelled_at, slow.steps)
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'edge_infer_generations_total{reason="cancelled"} 1.0' in metrics
        page.wait_for_selector("#send", state="visible")
        assert page.text_content(".msg.assistant .note") == "stopped"
        assert stored_reply(page)["stopped"] is True
        page.close()


HOSTILE = "<script>window.pwned=1</script><img src=x onerror='window.pwned=2'> **bold** `a<b>`"


def test_model_output_with_html_is_shown_as_text(model, browser):
    forced = {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": {"const": HOSTILE}}}}
    with serve(model, SlowModel(model, 0.0)) as s:
        page = open_page(browser, s, {"max-tokens": "90", "extra": json.dumps(forced)})
        ask(page, QUESTION)
        page.wait_for_selector("#send", state="visible")
        assert json.loads(stored_reply(page)["content"]) == HOSTILE  # the model really said it
        md = page.locator(".msg.assistant .md")
        assert "<script>window.pwned=1</script><img src=x onerror='window.pwned=2'>" in md.text_content()
        assert md.locator("script, img").count() == 0
        assert md.locator("strong").text_content() == "bold" and md.locator("code").text_content() == "a<b>"
        assert page.evaluate("window.pwned") is None
        assert page.errors == []
        page.close()


def test_markdown_renderer_builds_only_safe_elements(model, browser):
    with serve(model, SlowModel(model, 0.0), api_key=None) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("body.ready")
        text = ("# Title <i>x</i>\n\n- one\n- [link](javascript:alert(1)) and [ok](https://example.org)\n\n"
                "```python\nprint('<script>alert(1)</script>')\n```\n> quoted <b>\n\n1. first\n2. second\n\n"
                "```\nunclosed <img src=x onerror=alert(1)>")
        tags = page.evaluate("t => [...renderMarkdown(t).querySelectorAll('*')].map(e => e.tagName.toLowerCase())",
                             text)
        assert set(tags) <= {"div", "h3", "ul", "ol", "li", "a", "pre", "code", "button", "blockquote", "p", "em", "strong"}
        assert tags.count("pre") == 2 and tags.count("li") == 4 and tags.count("a") == 1
        hrefs = page.evaluate("t => [...renderMarkdown(t).querySelectorAll('a')].map(a => a.href)", text)
        assert hrefs == ["https://example.org/"]
        code = page.evaluate("t => [...renderMarkdown(t).querySelectorAll('pre code')].map(c => c.textContent)", text)
        assert code == ["print('<script>alert(1)</script>')", "unclosed <img src=x onerror=alert(1)>"]
        page.close()


def test_reasoning_is_shown_folded(model, browser):
    """A reply's reasoning (the server's `reasoning_content` deltas, or `<think>` text left in the content
    by --reasoning-format none) goes in a folded <details> above the answer, rendered as safely."""
    with serve(model, SlowModel(model, 0.0), api_key=None) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_selector("body.ready")
        show = """m => { const n = messageNode(m); const d = n.querySelector('details.reasoning');
                         return d && [d.open, d.querySelector('.md').textContent, n.querySelector(':scope > .md').textContent,
                                      n.querySelectorAll('b, script').length]; }"""
        separate = {"role": "assistant", "content": "Paris.", "reasoning": "France's capital <b>is</b>"}
        assert page.evaluate(show, separate) == [False, "France's capital <b>is</b>", "Paris.", 0]
        inline = {"role": "assistant", "content": "<think>France's capital</think>Paris."}
        assert page.evaluate(show, inline) == [False, "France's capital", "Paris.", 0]
        assert page.evaluate(show, {"role": "assistant", "content": "Paris."}) is None
        page.close()


def test_streamed_reasoning_content_is_folded_while_and_after_it_streams(tiny_exports, browser):
    """A tiny Qwen3 with Qwen3's real template; its reply forced by the server's guided_regex (sent from the
    page's extra request fields) to think, then answer: the server splits it (reasoning_content deltas)."""
    from qwen3_template import QWEN3_CHAT_TEMPLATE

    from edge_infer.runtime.chat_template import ChatTemplate

    qwen3 = edge_infer.load(tiny_exports("qwen3", "fp32"), device="cpu", threads=1)
    tok = qwen3.manifest.tokenizer
    qwen3.chat_template = ChatTemplate(QWEN3_CHAT_TEMPLATE, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    thought, answer = "The user states a fact.", "Yes, Paris."
    reply = f"<think>\n{thought}\n</think>\n\n{answer}"
    slow = SlowModel(qwen3, 0.0, hold_after=12)  # held while it is still thinking
    with serve(qwen3, slow) as s:
        page = open_page(browser, s, {"max-tokens": "80", "extra": json.dumps({"guided_regex": re.escape(reply)})})
        ask(page, QUESTION)
        wait_until(lambda: slow.steps > 12)
        page.wait_for_function("() => document.querySelector('details.reasoning summary')?.textContent === 'Thinking…'")
        assert page.evaluate("document.querySelector('details.reasoning').open") is False
        slow.release.set()
        page.wait_for_selector("#send", state="visible")
        stored = stored_reply(page)
        assert stored["reasoning"] == thought and stored["content"] == answer  # arrived as separate deltas
        assert page.text_content("details.reasoning summary") == "Reasoning"
        assert page.evaluate("document.querySelector('details.reasoning').open") is False
        assert page.text_content("details.reasoning .md") == thought
        assert page.text_content(".msg.assistant > .md") == answer
        assert page.errors == []
        page.close()
