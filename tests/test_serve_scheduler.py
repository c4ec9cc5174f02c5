"""The continuous-batching scheduler on its own: requests joining and leaving a running batch (with chunked
prefill) decode exactly what the engine decodes for each alone, greedy and seeded; cancel frees the slot;
the queue limit is all-or-none; stop cancels what is left."""
import threading

import pytest
import torch
from serve_support import lively_model

from zhllm import ZhllmError
from zhllm.infer.engine import Engine
from zhllm.infer.prompts import encode_prompt
from zhllm.infer.sampling import SamplingParams
from zhllm.serve.scheduler import QueueFull, Request, Scheduler


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    return Engine.load(lively_model(tmp_path_factory, tokenizer_dir), device="cpu", dtype="float32")


class Collector:
    def __init__(self):
        self.text, self.done, self.finished = "", None, threading.Event()

    def __call__(self, event):
        if event.kind == "text":
            self.text += event.text
        else:
            self.done = event
            self.finished.set()


def request(engine, prompt, sink, **sampling):
    return Request(encode_prompt(engine.tokenizer, prompt), SamplingParams(**sampling), sink)


def run_all(engine, scheduler, cases) -> list[Collector]:
    """Start `scheduler`, submit one request per (prompt, sampling) case at once, wait for all, stop."""
    scheduler.start()
    try:
        sinks = [Collector() for _ in cases]
        scheduler.submit([request(engine, p, s, **kw) for (p, kw), s in zip(cases, sinks)])
        for s in sinks:
            assert s.finished.wait(30)
    finally:
        scheduler.stop()
    return sinks


def test_joining_and_leaving_rows_decode_what_the_engine_decodes(engine):
    cases = [("今天天气", dict(temperature=0, max_new_tokens=30)),
             ("机器学习是人工智能的一个分支，研究计算机怎样从数据中学习。", dict(temperature=0, max_new_tokens=9)),
             ([{"role": "user", "content": "你好"}], dict(temperature=0, max_new_tokens=25)),
             ("春眠不觉晓", dict(temperature=0.9, top_p=0.9, seed=3, repetition_penalty=1.2, max_new_tokens=20)),
             ("长江是中国最长的河流", dict(temperature=0, top_k=5, max_new_tokens=5))]
    # Two slots for five requests and 4-token prefill chunks: rows join a running batch at different
    # lengths, leave it in the middle, and long prompts are prefilled across iterations.
    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=4)
    sinks = run_all(engine, scheduler, cases)
    for (prompt, kw), s in zip(cases, sinks):
        assert s.text == engine.generate(prompt, **kw), s.done
        assert s.done.finish_reason == "length" and s.done.completion_tokens == kw["max_new_tokens"]
    assert not scheduler.alive


def test_stop_strings_and_stop_tokens_end_a_row(engine):
    want = engine.generate("今天天气", temperature=0, max_new_tokens=30)
    scheduler = Scheduler(engine, max_batch=4)
    scheduler.start()
    try:
        cut, by_token = Collector(), Collector()
        ids = encode_prompt(engine.tokenizer, "今天天气")
        scheduler.submit([Request(ids, SamplingParams(temperature=0, max_new_tokens=30), cut, [want[5:7]])])
        assert cut.finished.wait(30)
        # Make the answer's first token a stop token: the row ends at once, its text empty.
        first = engine.generate_batch([ids], temperature=0, max_new_tokens=1, stop_token_ids=[]).completions[0]
        scheduler.stops = {first.token_ids[0]}
        scheduler.submit([Request(ids, SamplingParams(temperature=0, max_new_tokens=30), by_token)])
        assert by_token.finished.wait(30)
    finally:
        scheduler.stop()
    assert by_token.text == "" and by_token.done.finish_reason == "stop" and by_token.done.completion_tokens == 1
    assert cut.text == want[:want.index(want[5:7])] and cut.done.finish_reason == "stop"


def test_cancel_frees_the_slot_of_a_long_generation(engine):
    scheduler = Scheduler(engine, max_batch=2)
    sink = Collector()
    req = request(engine, "从前有座山，", lambda e: (req.cancel(), sink(e)), temperature=0.8, seed=1,
                  max_new_tokens=400)  # seeded: unseeded, a stop token sampled first ended it as "stop"
    scheduler.start()
    try:
        scheduler.submit([req])
        assert sink.finished.wait(30)
        assert sink.done.finish_reason == "cancelled" and sink.done.completion_tokens < 10
        follow = Collector()
        scheduler.submit([request(engine, "你好", follow, temperature=0, max_new_tokens=3)])
        assert follow.finished.wait(30) and follow.done.finish_reason == "length"
    finally:
        scheduler.stop()
    assert not scheduler._rows and scheduler.metrics.queue_depth == 0


def test_queue_limit_is_all_or_none(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    with pytest.raises(QueueFull):
        scheduler.submit([request(engine, "你好", Collector(), max_new_tokens=2) for _ in range(3)])
    scheduler.submit([request(engine, "你好", Collector(), max_new_tokens=2) for _ in range(2)])
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit([request(engine, "你好", Collector(), max_new_tokens=2)])
    with pytest.raises(ZhllmError, match="context"):
        scheduler.submit([Request([5] * engine.max_seq_len, SamplingParams(), Collector())])


def test_stop_cancels_running_and_waiting_requests(engine):
    scheduler = Scheduler(engine, max_batch=1)
    sinks = [Collector(), Collector()]
    scheduler.start()
    scheduler.submit([request(engine, "你好", s, temperature=0.8, max_new_tokens=400) for s in sinks])
    scheduler.stop()
    assert [s.done.finish_reason for s in sinks] == ["cancelled", "cancelled"]
    assert sinks[0].done.completion_tokens < 400 and sinks[1].done.completion_tokens == 0
    assert scheduler.metrics.queue_depth == 0 and not scheduler.alive
    with pytest.raises(QueueFull, match="shutting down"):
        scheduler.submit([request(engine, "你好", Collector())])


def test_a_short_row_next_to_a_long_one_ignores_what_fresh_slots_held(engine, monkeypatch):
    # Memory reused from earlier work may hold NaN bit patterns; a short row's masked tail must not see them.
    real_empty = torch.empty

    def garbage(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", garbage)
        scheduler = Scheduler(engine, max_batch=2)
    scheduler.start()
    try:
        short, long = Collector(), Collector()
        scheduler.submit([request(engine, "今天", short, temperature=0, max_new_tokens=12),
                          request(engine, "机器学习是人工智能的一个分支", long, temperature=0, max_new_tokens=12)])
        assert short.finished.wait(30) and long.finished.wait(30)
    finally:
        scheduler.stop()
    assert short.text == engine.generate("今天", temperature=0, max_new_tokens=12)
    assert long.text == engine.generate("机器学习是人工智能的一个分支", temperature=0, max_new_tokens=12)


def test_requests_with_the_same_prompt_share_one_prefill(engine):
    """An API request's n choices: the prompt is prefilled once, and each choice still decodes what it decodes
    alone (its own seed)."""
    prompt = "机器学习是人工智能的一个分支，研究计算机怎样从数据中学习。"
    cases = [(prompt, dict(temperature=0.9, seed=1, max_new_tokens=10)),
             (prompt, dict(temperature=0.9, seed=2, max_new_tokens=10)),
             (prompt, dict(temperature=0, max_new_tokens=10)),
             ("今天天气", dict(temperature=0, max_new_tokens=10))]
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=8)
    prefilled = []
    real_chunk = scheduler._prefill_chunk
    scheduler._prefill_chunk = lambda budget: prefilled.append(real_chunk(budget)) or prefilled[-1]
    sinks = run_all(engine, scheduler, cases)
    texts = [s.text for s in sinks]
    assert texts == [engine.generate(p, **kw) for p, kw in cases]
    assert texts[0] != texts[1]  # the seeds differ, so the shared logits were not consumed by the first row
    ids = [encode_prompt(engine.tokenizer, p) for p in (prompt, "今天天气")]
    assert sum(prefilled) == len(ids[0]) + len(ids[1])
    assert [s.done.prompt_tokens for s in sinks] == [len(ids[0])] * 3 + [len(ids[1])]
