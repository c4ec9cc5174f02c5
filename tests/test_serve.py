"""`zhllm serve` over HTTP on 127.0.0.1: the official openai client (streaming and not), greedy answers equal
`zhllm generate`, 32 concurrent streams equal single ones, auth, 400/401/404/413/429 OpenAI error bodies,
a disconnecting client frees its slot, memory stays flat over many requests, SIGTERM exits cleanly."""
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_support import ThreadServer, lively_model  # noqa: E402

from zhllm.infer.engine import Engine  # noqa: E402
from zhllm.serve.app import create_app  # noqa: E402
from zhllm.serve.scheduler import Scheduler  # noqa: E402

KEY = "sk-test-key"
MAX_TOKENS = 24
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return lively_model(tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(engine):
    # A batch smaller than the 32 concurrent clients: requests must queue, join and leave the running batch.
    app = create_app(engine, model_name="tiny", api_key=KEY, max_batch=8, max_queue=64, max_tokens=MAX_TOKENS,
                     max_body_bytes=64 * 1024)
    s = ThreadServer(app)
    s.app = app
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(engine, prompt, n):
    return engine.generate(prompt, temperature=0, max_new_tokens=n)


def test_chat_completion_with_the_openai_client_equals_the_engine(client, engine):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    want = greedy(engine, messages, 12)
    assert len(set(want)) > 3  # the lively model does not just repeat a token
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # max_completion_tokens (the newer name) and a stop string that cuts the answer (12 tokens may decode to
    # only a few characters: the tiny tokenizer spells rare characters in bytes, and a stray byte prints nothing)
    stop = want[len(want) // 2]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_completion_tokens=12,
                                       stop=[stop])
    assert r.choices[0].message.content == want[:want.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_with_the_openai_client(client, engine):
    messages = [{"role": "user", "content": "请介绍一下长江。"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=15,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == greedy(engine, messages, 15)
    # "length" after 15 tokens, or "stop" if the model ended its answer sooner (as this tokenizer's may)
    assert (reasons[-1], usage.completion_tokens == 15) in {("length", True), ("stop", False)}
    assert 0 < usage.completion_tokens <= 15
    stream = client.completions.create(model="tiny", prompt="春眠不觉晓，", temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in stream) == greedy(engine, "春眠不觉晓，", 10)


def test_greedy_completion_equals_zhllm_generate(client, model_dir):
    from zhllm.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", str(model_dir), "--prompt", "机器学习是", "--temperature", "0", "--top-p", "1",
                     "--repetition-penalty", "1", "--max-new-tokens", "16", "--dtype", "float32"]) == 0
    r = client.completions.create(model="tiny", prompt="机器学习是", temperature=0, max_tokens=16)
    assert r.choices[0].text + "\n" == out.getvalue()


def test_seeded_samples_n_and_penalties(client, engine):
    kw = dict(model="tiny", prompt="小明有3个苹果，", temperature=0.9, top_p=0.9, max_tokens=12, seed=7, n=2,
              extra_body={"repetition_penalty": 1.3})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed makes the n choices reproducible
    assert a.choices[0].text == engine.generate("小明有3个苹果，", temperature=0.9, top_p=0.9, max_new_tokens=12,
                                                seed=7, repetition_penalty=1.3)
    assert a.choices[0].text != a.choices[1].text and a.usage.completion_tokens == 24
    # OpenAI's presence/frequency penalties change a greedy answer that repeats itself
    plain = client.completions.create(model="tiny", prompt="今天", temperature=0, max_tokens=MAX_TOKENS)
    penalised = client.completions.create(model="tiny", prompt="今天", temperature=0, max_tokens=MAX_TOKENS,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].text != penalised.choices[0].text


def test_32_concurrent_streams_equal_single_client_answers(server, engine):
    prompts = [f"第{i}个问题：{p}"
               for i, p in enumerate(["天气", "长江", "北京", "苹果", "机器学习", "春天", "你好", "公园"])]
    want = {p: greedy(engine, [{"role": "user", "content": p}], 10) for p in prompts}
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(prompt):
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                      temperature=0, max_tokens=10, stream=True)
        text, reason = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                reason = c.finish_reason or reason
        return prompt, text, reason

    async def all_clients():
        try:
            return await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(all_clients())
    assert len(results) == 32
    for prompt, text, reason in results:
        assert text == want[prompt] and reason == "length"
    metrics = httpx.get(server.url + "/metrics").text
    batch_peak = server.app.state.scheduler.metrics.batch_size
    assert "zhllm_completion_tokens_total" in metrics and batch_peak >= 1


def test_auth_and_error_bodies(server):
    url = server.url
    def error(r, status):
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        assert "Traceback" not in r.text
        return body
    chat = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
    assert error(httpx.post(url + "/v1/chat/completions", json=chat), 401)["code"] == "invalid_api_key"
    error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed outside /v1
    def post(**kw):
        return httpx.post(url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, **kw)
    assert error(post(json={**chat, "temperature": 5}), 400)["param"] == "temperature"
    error(post(json={"messages": []}), 400)
    error(post(json={**chat, "messages": [{"role": "robot", "content": "x"}]}), 400)
    error(post(content=b"{not json"), 400)
    error(post(content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400)
    long_prompt = {"messages": [{"role": "user", "content": "今天天气很好，" * 200}]}
    assert error(post(json=long_prompt), 400)["code"] == "context_length_exceeded"
    big = {"messages": [{"role": "user", "content": "长" * 40_000}]}  # over the 64 KiB limit
    assert error(post(json=big), 413)["code"] == "request_too_large"
    error(httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "x", "logprobs": 2}), 400)
    error(httpx.get(url + "/v1/nothing-here", headers=AUTH), 404)


def test_full_queue_answers_429(engine):
    class Stalled(Scheduler):
        """A scheduler whose thread never runs: submitted requests stay queued."""
        def start(self):
            pass
        @property
        def alive(self):
            return True

    app = create_app(engine, scheduler=Stalled(engine, max_batch=1, max_queue=1))
    s = ThreadServer(app)
    try:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
        def wait_in_queue():
            with contextlib.suppress(httpx.TimeoutException):  # it waits for a model that never runs
                httpx.post(s.url + "/v1/chat/completions", json=body, timeout=1.5)
        waiting = threading.Thread(target=wait_in_queue, daemon=True)
        waiting.start()
        deadline = time.monotonic() + 10
        while app.state.metrics.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        waiting.join(10)
    finally:
        s.close()


def test_a_client_that_leaves_frees_its_slot(server):
    scheduler = server.app.state.scheduler
    body = {"prompt": "从前有座山，", "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}
    # (test_serve_scheduler.py checks that a cancel stops a long generation; this checks the HTTP side leaves
    # nothing behind when the client goes mid-stream)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while (scheduler._rows or scheduler._waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not scheduler._rows and not scheduler._waiting and scheduler.metrics.queue_depth == 0


def test_memory_stays_flat_over_sequential_requests(server):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        def ask(i):
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"问题{i}"}],
                                                        "max_tokens": 3, "temperature": 0.5, "stream": i % 2 == 0})
            assert r.status_code == 200
        for i in range(50):  # warm up allocator pools and caches
            ask(i)
        before = proc.memory_info().rss
        for i in range(400):
            ask(i)
        grown = proc.memory_info().rss - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 400 requests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_stream_in_flight_and_exits_cleanly(model_dir):
    port = _free_port()
    env = {**os.environ, "ZHLLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from zhllm.cli import main; sys.exit(main())",
                             "serve", str(model_dir), "--port", str(port),
                             "--max-tokens", "400", "--dtype", "float32"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from ZHLLM_API_KEY
        body = {"prompt": "今天", "max_tokens": 400, "stream": True, "temperature": 0.8}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not lines:
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
