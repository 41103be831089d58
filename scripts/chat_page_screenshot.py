"""Take the README's picture of the chat page: a real server on a model folder, the page in Debian's
headless Chromium (Playwright, as tests/test_chat_page.py drives it), one question asked and
answered, then a PNG of the window.

    python scripts/chat_page_screenshot.py MODEL_FOLDER docs/chat-page.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

QUESTION = "Write a Python function that reverses a string, with a short explanation."


def main(folder: str, png: str) -> None:
    from playwright.sync_api import sync_playwright

    import edge_infer
    from edge_infer.serve.app import build_app, model_id_for
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.runner import ServerThread

    model = edge_infer.load(folder)
    app = build_app(model, ServerConfig(model_id=model_id_for(folder)), EngineConfig(parallel=1))
    with ServerThread(app) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.set_default_timeout(300_000)
        page.goto(server.url + "/")
        page.wait_for_selector("body.ready")
        page.click("#settings summary")
        page.fill("#system", "You are a helpful assistant.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "200")
        for field in ("#system", "#temperature", "#max-tokens"):
            page.dispatch_event(field, "change")
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .stats")
        page.wait_for_selector("#send", state="visible")
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=png)
        browser.close()
    print(f"wrote {png}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
