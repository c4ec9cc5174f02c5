"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright): a Chinese message
streams an answer, the stop button stops it and frees the server's slot, an IME composition's Enter does not
send, Shift+Enter is a newline, the next turn carries the history and system prompt. Saves a screenshot."""
import json
import shutil
import time

import pytest

pytest.importorskip("fastapi")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)

from serve_support import ThreadServer, lively_model  # noqa: E402

from zhllm.infer.engine import Engine  # noqa: E402
from zhllm.serve.app import create_app  # noqa: E402
from zhllm.serve.scheduler import Scheduler  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class SlowScheduler(Scheduler):
    """Decode steps slowed to a human pace, and no end token, so the answer is still streaming when the test
    presses stop (the random model samples an end token now and then: a race the test lost at random)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stops = set()

    def _decode_step(self):
        time.sleep(0.02)
        super()._decode_step()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    engine = Engine.load(lively_model(tmp_path_factory, tokenizer_dir), device="cpu", dtype="float32")
    app = create_app(engine, max_tokens=400, scheduler=SlowScheduler(engine, max_batch=4))
    s = ThreadServer(app)
    s.scheduler = app.state.scheduler
    yield s
    s.close()


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        pytest.skip("no chromium executable (apt-get install -y chromium)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        except Exception as e:  # a browser that cannot start here (missing libraries, no /dev/shm)
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_chat_page_streams_stops_and_keeps_history(server, page, tmp_path):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(server.url + "/")
    assert page.title() == "zhllm chat"
    page.fill("#system", "你是一个乐于助人的助手。")
    page.fill("#max-tokens", "400")
    box = page.locator("#input")
    box.click()
    page.keyboard.type("你好，请介绍一下长江")
    # An IME composing a candidate sends Enter with isComposing: it must not send the message.
    page.evaluate("""document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',
                     {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))""")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("。")
    page.wait_for_timeout(200)
    assert page.locator(".msg.user").count() == 0 and box.input_value() == "你好，请介绍一下长江\n。"
    page.keyboard.press("Enter")
    answer = page.locator(".msg.assistant").first
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 3", timeout=20_000)
    assert answer.get_attribute("data-state") == "streaming"
    page.click("#stop")
    page.wait_for_function("document.querySelector('.msg.assistant').dataset.state === 'stopped'", timeout=10_000)
    shown = answer.text_content()
    assert shown.endswith("(已停止)") and len(shown) > len("(已停止)")
    deadline = time.monotonic() + 10
    while server.scheduler._rows and time.monotonic() < deadline:  # the stopped stream's slot is freed
        time.sleep(0.05)
    assert not server.scheduler._rows
    assert page.locator(".msg.user").first.text_content() == "你好，请介绍一下长江\n。"
    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the chat page: {shot}")
    assert shot.stat().st_size > 1000
    # The second turn carries the system prompt and the first exchange, as far as it was shown.
    box.fill("谢谢")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1]?.dataset.state === 'streaming'")
    page.click("#stop")
    roles = [m["role"] for m in sent[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"] and sent[-1]["stream"] is True
    assert sent[-1]["messages"][1]["content"] == "你好，请介绍一下长江\n。"
