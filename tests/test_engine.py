"""The inference engine: greedy equals transformers, scores equal a full forward, sampled log-probs equal a
re-scoring, LoRA / FSDP / transformers models decode what they compute, nothing lands on the model, seeds."""
import copy
import io
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from zhllm import ZhllmError
from zhllm.infer.engine import Engine
from zhllm.infer.textstream import TextStream
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model
from zhllm.tokenizer.load import load_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 40, 41], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tokenizer_dir):
    """A tiny model with large random weights: greedy output varies from token to token."""
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = model_config_from("tiny", {"vocab_size": vocab, "init_std": 0.3})
    return save_model(new_model(cfg, seed=1), tmp_path_factory.mktemp("lively") / "m", tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def engine(lively_dir):
    return Engine.load(lively_dir, device="cpu", dtype="float32")


def greedy_ids(engine, prompts, n):
    return [c.token_ids for c in engine.generate_batch(prompts, max_new_tokens=n, stop_token_ids=[]).completions]


def test_greedy_equals_transformers_generate(lively_dir, engine):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # min_new_tokens would ban eos ids instead, changing the choice
    ours = greedy_ids(engine, PROMPTS, 20)
    assert len(set(ours[0])) > 3  # not a trivial repetition
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == out[0, len(prompt):].tolist()


def test_score_equals_log_softmax_of_a_full_forward(engine):
    prompts = [[5, 6, 7], [10], [12, 13, 14, 15, 16, 17], [30, 31]]
    conts = [[8, 9, 40, 41, 42], [11, 12], [18], [32, 33, 34]]
    got = engine.score(prompts, conts, batch_size=3)  # two batches, each right-padded
    for p, c, r in zip(prompts, conts, got):
        with torch.no_grad():
            logp = engine.model(torch.tensor([p + c])).float().log_softmax(-1)[0]
        want = [float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)]
        assert r.token_logprobs == pytest.approx(want, abs=1e-5)
        assert r.logprob == pytest.approx(sum(want), abs=1e-5)
    assert engine.score([[5, 6]], [[]])[0].logprob == 0.0


def test_sampled_logprobs_equal_a_rescoring(engine):
    out = engine.generate_batch(PROMPTS[:2], n=3, max_new_tokens=10, temperature=1.0, seed=4, stop_token_ids=[])
    assert [c.prompt_index for c in out.completions] == [0, 0, 0, 1, 1, 1]
    assert out.token_ids.shape == out.logprobs.shape == out.response_mask.shape == (6, 10)
    assert len({tuple(c.token_ids) for c in out.completions}) > 1  # n samples, not n copies
    rescored = engine.score([PROMPTS[c.prompt_index] for c in out.completions],
                            [c.token_ids for c in out.completions])
    for c, r in zip(out.completions, rescored):
        assert c.logprobs == pytest.approx(r.token_logprobs, abs=1e-4)


def test_rows_stop_on_their_own_and_keep_the_stop_token(engine):
    free = greedy_ids(engine, PROMPTS, 12)
    stop = free[0][4]
    out = engine.generate_batch(PROMPTS, max_new_tokens=12, stop_token_ids=[stop])
    for c, full in zip(out.completions, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert c.token_ids == full[:cut]
        assert c.finish_reason == ("stop_token" if stop in full else "length")
    assert out.response_mask.sum(1).tolist() == [len(c.token_ids) for c in out.completions]
    assert (out.logprobs[~out.response_mask] == 0).all()


def test_same_seed_same_samples_and_the_global_rng_is_untouched(engine):
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=12, temperature=1.2, stop_token_ids=[])
    a = engine.generate_batch(PROMPTS, n=2, seed=11, **kw).token_ids
    assert torch.equal(a, engine.generate_batch(PROMPTS, n=2, seed=11, **kw).token_ids)
    assert not torch.equal(a, engine.generate_batch(PROMPTS, n=2, seed=12, **kw).token_ids)
    assert engine.generate("今天", seed=3, **kw) == engine.generate("今天", seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)


def test_nothing_is_stored_on_the_model(lively_dir, tokenizer_dir):
    model = new_model(model_config_from("tiny", {"vocab_size": 448, "init_std": 0.3}), seed=2).eval()
    before = dict(vars(model))
    eng = Engine(model, load_tokenizer(tokenizer_dir))
    eng.generate("今天天气", max_new_tokens=6)
    list(eng.stream("你好", max_new_tokens=4))
    eng.generate_batch(PROMPTS, n=2, max_new_tokens=4, temperature=1.0)
    eng.score(PROMPTS, [[3, 4]] * 3)
    after = dict(vars(model))
    assert after.keys() == before.keys()
    # _rope_cache is the model's own cos/sin table, filled by its forward; everything else is untouched.
    assert all(after[k] is before[k] for k in before if k != "_rope_cache")


def lora_pair():
    """(LoRA-injected model with non-zero B, the same adapter merged into a plain model, the base model)."""
    from zhllm.train.lora import apply_lora, merge_adapter
    base = new_model(model_config_from("tiny", {"vocab_size": 448, "init_std": 0.3}), seed=3).eval()
    lora = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    merged = merge_adapter(copy.deepcopy(lora))
    return lora, merged, base


def test_lora_model_decodes_with_its_adapter_not_the_base():
    from peft import PeftModel
    from zhllm.train.lora import lora_config
    lora, merged, base = lora_pair()
    want = greedy_ids(Engine(merged), PROMPTS, 12)
    assert greedy_ids(Engine(lora), PROMPTS, 12) == want
    assert greedy_ids(Engine(base), PROMPTS, 12) != want
    lp = Engine(lora).score(PROMPTS, [[3, 4, 5]] * 3)
    assert [r.logprob for r in lp] == pytest.approx([r.logprob for r in Engine(merged).score(PROMPTS, [[3, 4, 5]] * 3)],
                                                    abs=1e-4)
    wrapped = PeftModel(copy.deepcopy(base), lora_config(r=4, alpha=8))  # peft's own wrapper, same adapter
    adapter = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_" in n:
                p.copy_(adapter[n.removeprefix("base_model.model.")])
    assert greedy_ids(Engine(wrapped), PROMPTS, 12) == want
    with pytest.raises(ZhllmError, match="merge the adapter"):
        Engine(lora, quantize="int8")


def test_a_transformers_model_decodes_without_a_cache(lively_dir, engine):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32).eval()
    assert greedy_ids(Engine(hf), PROMPTS, 10) == greedy_ids(engine, PROMPTS, 10)
    got = Engine(hf).score(PROMPTS, [[3, 4]] * 3)
    assert [r.logprob for r in got] == pytest.approx([r.logprob for r in engine.score(PROMPTS, [[3, 4]] * 3)],
                                                     abs=1e-4)


@pytest.mark.parametrize("kind", ["fused", "lora", "transformers"])
def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(lively_dir, engine, kind):
    """Finished rows are dropped from the running batch (each session's `keep`): every row still decodes what
    it decodes alone, cut at its stop token, on the fused, the cached (LoRA) and the uncached path."""
    if kind == "lora":
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        engine = Engine(lora_pair()[0])
    elif kind == "transformers":
        from transformers import AutoModelForCausalLM
        engine = Engine(AutoModelForCausalLM.from_pretrained(str(lively_dir), dtype=torch.float32).eval())
    alone = greedy_ids(engine, PROMPTS, 12)
    stop = alone[1][2]
    got = [c.token_ids for c in engine.generate_batch(PROMPTS * 2, max_new_tokens=12,
                                                      stop_token_ids=[stop]).completions]
    assert got == [a[:a.index(stop) + 1] if stop in a else a for a in alone * 2]
    assert min(map(len, got)) <= 3 and max(map(len, got)) == 12  # two of six rows left by step 3, others went on
    # sampled: each row draws what it draws when no row stops (its uniforms do not depend on the others)
    free = [c.token_ids for c in engine.generate_batch(PROMPTS * 2, max_new_tokens=12, stop_token_ids=[],
                                                       temperature=1.0, seed=3).completions]
    stop = free[1][2]
    got = [c.token_ids for c in engine.generate_batch(PROMPTS * 2, max_new_tokens=12, stop_token_ids=[stop],
                                                      temperature=1.0, seed=3).completions]
    assert got == [a[:a.index(stop) + 1] if stop in a else a for a in free]
    assert min(map(len, got)) <= 3 and max(map(len, got)) == 12


FSDP_SCRIPT = """
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from zhllm.infer.engine import Engine
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:{port}")
cfg = model_config_from("tiny", {{"vocab_size": 128, "init_std": 0.3}})
plain, sharded = new_model(cfg, seed=1).eval(), new_model(cfg, seed=1).eval()
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)
prompts = [[5, 6, 7, 8], [9, 10]]
run = lambda m: [c.token_ids for c in Engine(m).generate_batch(prompts, max_new_tokens=8).completions]
assert run(plain) == run(sharded), (run(plain), run(sharded))
a, b = (Engine(m).score(prompts, [[3, 4]] * 2) for m in (plain, sharded))
assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b))
# bf16 compute over fp32 shards: the KV cache takes the dtype the forward computes in
from torch.distributed.fsdp import MixedPrecisionPolicy
mixed = new_model(cfg, seed=1).eval()
fully_shard(mixed, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
def full_forward_greedy(m, p, n):  # no cache: what the cached decode must reproduce
    ids = list(p)
    for _ in range(n):
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(p):]
for p in prompts:  # (the forward hands the model a copy of the cache: its length count must still advance)
    got = Engine(mixed).generate_batch([p], max_new_tokens=8).completions[0].token_ids
    assert got == full_forward_greedy(mixed, p, 8), (got, full_forward_greedy(mixed, p, 8))
# a shared prefix (infer/scoring.py) through FSDP's forward, whose mixed precision passes a copy of the cache
long = [list(range(3, 40)) + [5, 6], list(range(3, 40)) + [7]]
for m, tol in ((sharded, 1e-5), (mixed, 1e-2)):
    x, y = (Engine(m).score(long, [[3, 4]] * 2, min_shared_prefix=s) for s in (16, None))
    assert all(abs(u.logprob - v.logprob) < tol for u, v in zip(x, y)), (x, y)
dist.destroy_process_group()
print("ok")
"""


def test_fsdp_sharded_model_decodes_like_the_plain_one():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FSDP_SCRIPT.format(port=port))],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "not supported" in proc.stderr.lower():
        pytest.skip("FSDP2 is not supported by gloo in this torch build")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_streams_from_two_threads_interleave_safely(engine):
    want = {p: engine.generate(p, max_new_tokens=16, stop_token_ids=[]) for p in ("今天天气", "机器学习")}
    got = {}

    def run(p):
        got[p] = "".join(engine.stream(p, max_new_tokens=16, stop_token_ids=[]))
    threads = [threading.Thread(target=run, args=(p,)) for p in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    outer = engine.stream("今天天气", max_new_tokens=16, stop_token_ids=[])
    first = next(outer)
    assert engine.generate("机器学习", max_new_tokens=16, stop_token_ids=[]) == want["机器学习"]  # no deadlock
    assert first + "".join(outer) == want["今天天气"]


def test_bad_calls_are_one_line_errors(engine):
    with pytest.raises(ZhllmError, match="n must be"):
        engine.generate_batch(["你好"], n=0)
    with pytest.raises(ZhllmError, match="continuations"):
        engine.score([[5]], [])
    with pytest.raises(ZhllmError, match="at least one token"):
        engine.score([[]], [[5]])
    with pytest.raises(ZhllmError, match="tokenizer"):
        Engine(engine.model).generate("你好")


# ---- issue 13: incomplete UTF-8 and piped chat ----
def byte_tokens(tok, char):
    ids = tok.encode(char, add_special_tokens=False)
    assert len(ids) > 1, "the test needs a character the tiny tokenizer splits into bytes"
    return ids


def test_incomplete_utf8_is_held_back_and_never_shown(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    partial = byte_tokens(tok, "鬱")[:-1]  # the model emitted the start of a character, never its end
    ok = tok.encode("好的", add_special_tokens=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in partial + ok + partial] + [stream.finish()]
    assert "".join(pieces) == "好的"
    assert not any("\ufffd" in p for p in pieces)
    whole = TextStream(tok)  # a complete character still arrives, once its last byte does
    assert "".join([whole.push(i) for i in byte_tokens(tok, "鬱")] + [whole.finish()]) == "鬱"


def test_piped_chat_separates_answers(lively_dir, monkeypatch):
    from zhllm.infer import chat
    answers = iter(["第一行\n第二行", "再见\n"])
    monkeypatch.setattr(chat.ChatSession, "reply", lambda self, text: iter([next(answers)]))
    out = io.StringIO()
    assert chat.chat(str(lively_dir), device="cpu", dtype="float32", stdin=io.StringIO("你好\n/reset\n再见\n"),
                     stdout=out) == 0
    assert out.getvalue() == "第一行\n第二行\n\n再见\n"
