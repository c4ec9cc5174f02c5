"""`zhllm data self-instruct` against a scripted OpenAI-compatible stub server on 127.0.0.1."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zhllm.corpus.readers import iter_records
from zhllm.data.chat import SFTStats, iter_conversations
from zhllm.data.openai_client import ChatClient, chat_url
from zhllm.data.self_instruct import (ANSWER_SYSTEM, SelfInstructConfig, SelfInstructStopped, clean_instruction,
                                      instruction_prompt, is_refusal, self_instruct)
from zhllm.errors import ZhllmError

COMMON = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要"
          "下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只"
          "作当想看文无开手用主行方又如前所本见经头面公同三已老从动两长知民样现")
SEEDS = [
    {"instruction": "请介绍一下长江的地理特点。", "output": "长江是中国最长的河流。"},
    {"messages": [{"role": "user", "content": "写一首关于春天的五言绝句。"},
                  {"role": "assistant", "content": "春风吹柳绿，细雨润花红。"}]},
    {"prompt": "计算 12 乘以 8 等于多少？", "response": "12 乘以 8 等于 96。"},
    {"conversations": [{"from": "human", "value": "如何提高睡眠质量？"}, {"from": "gpt", "value": "规律作息。"}]},
]


def distinct_instructions(n, seed=0):
    """n Chinese instructions with no 3-gram overlap to speak of (random common characters)."""
    rng = random.Random(seed)
    return ["请说明" + "".join(rng.choice(COMMON) for _ in range(18)) + "。" for _ in range(n)]


class Stub:
    """Instruction prompts get the next scripted instruction; answer prompts get an answer (a refusal when the
    instruction contains 拒绝). `faults` maps a request number (1-based, all requests) to 500 / 429 / timeout /
    garbage / 401; `fail_from` makes every request from that number on a 500. A fault consumes nothing."""

    def __init__(self, instructions, faults=None, fail_from=None, answer_delay=0.0):
        self.instructions = list(instructions)
        self.faults = dict(faults or {})
        self.fail_from = fail_from
        self.answer_delay = answer_delay
        self.lock = threading.Lock()
        self.requests = 0
        self.next = 0
        self.bodies = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = stub.respond(self.path, body, self.headers.get("Authorization"))
                if payload is None:  # a timeout: answer too late
                    time.sleep(1.0)
                    status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": "迟到"}}]}
                data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def respond(self, path, body, auth):
        with self.lock:
            self.requests += 1
            n = self.requests
            self.bodies.append((path, body, auth))
            fault = self.faults.get(n) or ("500" if self.fail_from and n >= self.fail_from else None)
            if fault == "500":
                return 500, {"error": {"message": "overloaded"}}, {}
            if fault == "429":
                return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
            if fault == "401":
                return 401, {"error": {"message": "bad key"}}, {}
            if fault == "garbage":
                return 200, b"<html>proxy error</html>", {}
            if fault == "timeout":
                return 200, None, {}
            messages = body["messages"]
            if messages[0]["content"] == ANSWER_SYSTEM:
                question = messages[-1]["content"]
                text = ("作为一个AI语言模型，我无法回答这个问题。" if "拒绝" in question
                        else f"好的，下面回答：{question[::-1]}")
                delay = self.answer_delay
            else:
                text = self.instructions[min(self.next, len(self.instructions) - 1)]
                self.next += 1
                delay = 0.0
        time.sleep(delay)
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}, {}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def seeds_file(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in SEEDS) + "\n", encoding="utf-8")
    return path


def client_for(stub, **kw):
    kw = {"timeout": 0.5, "max_retries": 3, "retry_wait": 0.01, **kw}
    return ChatClient(stub.url, "big-model", api_key="sk-test", **kw)


def out_instructions(path):
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_helpers_parse_replies_and_urls():
    assert clean_instruction("新任务：请写一首诗。") == "请写一首诗。"
    assert clean_instruction("任务3: “解释量子纠缠。”\n任务4：别的") == "解释量子纠缠。"
    assert clean_instruction("1. 列举三种水果。") == "列举三种水果。"
    assert is_refusal("很抱歉，我 无法回答") and is_refusal("I'm  sorry, but I can't help with that.")
    assert is_refusal("作为一个 AI 语言模型") and not is_refusal("长江全长约6300公里。")
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    with pytest.raises(ZhllmError, match="http"):
        chat_url("h:1")
    # a seed holding a whole article is cut short in the prompt
    prompt = instruction_prompt(["长" * 5000], [], SelfInstructConfig(num=1), random.Random(0))[0]["content"]
    assert "长" * 300 + "……" in prompt and len(prompt) < 800


def test_generates_n_records_dropping_duplicates_refusals_and_retrying_errors(tmp_path, seeds_file, tokenizer_dir):
    good = distinct_instructions(8)
    script = [good[0], good[1],
              "  " + good[0].replace("。", " 。"),           # exact duplicate of a generated one (spacing)
              good[1][:-1] + "？",                           # near duplicate of a generated one
              "请介绍一下长江的地理特点。",                   # exact duplicate of a seed
              "新任务：请介绍一下长江的地理特点！",             # near duplicate of a seed
              "请拒绝" + good[2][3:],                        # answered with a refusal
              "Write a short poem about the sea in English.",  # not Chinese
              "很长" * 600,                                  # too long
              ""] + good[2:]                                 # empty reply
    # request numbers 2, 4, 6, 8 fail once each and are retried
    with Stub(script, faults={2: "500", 4: "429", 6: "timeout", 8: "garbage"}) as stub:
        out = tmp_path / "gen" / "out.jsonl"
        cfg = SelfInstructConfig(num=8, concurrency=3, seed=1)
        report = self_instruct(client_for(stub), [seeds_file], out, cfg, progress=False)
    got = out_instructions(out)
    assert len(got) == 8 and len(set(got)) == 8
    assert report.written == 8 and report.failed == 0 and report.retries == 4
    assert dict(report.dropped) == {"exact_duplicate": 2, "near_duplicate": 2, "refusal": 1, "not_chinese": 1,
                                    "instruction_length": 1, "empty_reply": 1}
    assert ("dropped: empty_reply 1, instruction_length 1, not_chinese 1, refusal 1, exact_duplicate 2, "
            "near_duplicate 2") in report.table()
    # every request carried the key, the model and a Chinese prompt showing seed tasks
    paths = {p for p, _, _ in stub.bodies}
    assert paths == {"/v1/chat/completions"} and {a for _, _, a in stub.bodies} == {"Bearer sk-test"}
    prompts = [b["messages"][0]["content"] for _, b, _ in stub.bodies if b["messages"][0]["role"] == "user"]
    assert all("示例任务" in p for p in prompts) and all(b["model"] == "big-model" for _, b, _ in stub.bodies)
    # the output is zhllm's messages SFT format: the reader takes every line, tokenize-sft encodes them
    stats = SFTStats()
    assert len(list(iter_conversations(iter_records(out), stats=stats))) == 8 and stats.formats == {"messages": 8}
    from zhllm.data.sft_shards import tokenize_sft
    shards = tokenize_sft([out], tokenizer_dir, tmp_path / "shards", max_len=256, workers=1, progress=False)
    assert shards is not None and (tmp_path / "shards" / "meta.json").exists()


def test_failing_endpoint_is_a_clear_error_and_keeps_what_was_written(tmp_path, seeds_file, capsys):
    from zhllm.cli import main
    good = distinct_instructions(10, seed=3)
    out = tmp_path / "out.jsonl"
    with Stub(good, fail_from=5) as stub:  # two instruction+answer pairs, then only 500s
        cfg = SelfInstructConfig(num=10, concurrency=1, max_failures=2)
        with pytest.raises(SelfInstructStopped, match="endpoint failing: 2 requests in a row") as e:
            self_instruct(client_for(stub, max_retries=1), [seeds_file], out, cfg, progress=False)
        assert e.value.report.failed == 2 and "has 2 of 10 records" in str(e.value)
        assert out_instructions(out) == good[:2]
        # the CLI: counts on stdout, then one line on stderr and exit 2
        code = main(["data", "self-instruct", "--endpoint", stub.url, "--model", "m", "--seeds", str(seeds_file),
                     "--out", str(out), "--num", "10", "--concurrency", "1", "--max-retries", "0",
                     "--retry-wait", "0", "--max-failures", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and out_instructions(out) == good[:2]
    assert "failed after retries 1" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zhllm: error: endpoint failing") and "HTTP 500" in err[0]


def test_rejected_key_stops_at_once(tmp_path, seeds_file):
    with Stub(distinct_instructions(3), faults={1: "401"}) as stub:
        with pytest.raises(ZhllmError, match="HTTP 401: bad key .check the API key"):
            self_instruct(client_for(stub), [seeds_file], tmp_path / "o.jsonl",
                          SelfInstructConfig(num=3, concurrency=1), progress=False)
        assert stub.requests == 1  # never retried


def test_malformed_seeds_are_counted_with_file_and_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps(SEEDS[0], ensure_ascii=False) + "\n{broken json\n"
                     + json.dumps({"instruction": "没有回答"}, ensure_ascii=False) + "\n"
                     + json.dumps(SEEDS[2], ensure_ascii=False) + "\n", encoding="utf-8")
    with Stub(distinct_instructions(2)) as stub:
        report = self_instruct(client_for(stub), [seeds], tmp_path / "o.jsonl", SelfInstructConfig(num=2),
                               progress=False)
    assert report.seeds == 2 and report.seed_read.bad == {"invalid_json": 1}
    assert report.seed_sft.skipped == {"missing field": 1}
    table = report.table()
    assert "skipped 2 bad records" in table and f"{seeds}:2" in table and f"{seeds}:3" in table
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n", encoding="utf-8")
    with pytest.raises(ZhllmError, match="no usable seed tasks"):
        self_instruct(ChatClient("http://127.0.0.1:9", "m"), [empty], tmp_path / "o2.jsonl",
                      SelfInstructConfig(num=2), progress=False)


def test_killed_run_continues_without_repeats(tmp_path, seeds_file):
    good = distinct_instructions(12, seed=7)
    out = tmp_path / "out.jsonl"
    with Stub(good, answer_delay=0.15) as stub:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "zhllm", "data", "self-instruct", "--endpoint", stub.url,
                                 "--model", "m", "--seeds", str(seeds_file), "--out", str(out), "--num", "12",
                                 "--concurrency", "2", "--no-progress"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") >= 3:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
    before = out_instructions(out)
    assert 3 <= len(before) < 12
    with open(out, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"messages": [{"role": "user", "content": "\xe8\xaf')
    # a fresh server serving the same instructions from the start: those written already are duplicates now
    with Stub(good) as stub:
        report = self_instruct(client_for(stub), [seeds_file], out, SelfInstructConfig(num=12, concurrency=2),
                               progress=False)
    after = out_instructions(out)
    assert after[:len(before)] == before and len(after) == 12 and sorted(after) == sorted(good)
    assert report.partial_dropped and report.existing == len(before) and report.written == 12 - len(before)
    assert report.dropped == {"exact_duplicate": len(before)}
    # a complete file: another re-run asks nothing
    with Stub(good) as stub:
        report = self_instruct(client_for(stub), [seeds_file], out, SelfInstructConfig(num=12), progress=False)
        assert stub.requests == 0 and report.written == 0 and out_instructions(out) == after


def test_unwritable_or_locked_output_is_refused(tmp_path, seeds_file):
    import fcntl
    with pytest.raises(ZhllmError, match="is a directory"):
        self_instruct(ChatClient("http://127.0.0.1:9", "m"), [seeds_file], tmp_path, SelfInstructConfig(num=1),
                      progress=False)
    out = tmp_path / "out.jsonl"
    with open(out, "ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ZhllmError, match="being written by another"):
            self_instruct(ChatClient("http://127.0.0.1:9", "m"), [seeds_file], out, SelfInstructConfig(num=1),
                          progress=False)
