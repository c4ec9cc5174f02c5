"""Shared-prefix scoring (infer/scoring.py): rows that start alike run their common prefix once and give the
same log-probs as whole rows, for plain, LoRA and planted models; k-shot mc gives the same scores."""
import copy
import functools
import json

import pytest
import torch

from zhllm.eval.mc import evaluate_mc, read_items
from zhllm.infer import scoring
from zhllm.infer.engine import Engine
from zhllm.infer.scoring import plan_prefixes
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model

from eval_support import planted_engine


def subject(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 440, (n,), generator=g).tolist()


# Two "subjects" whose prompts share a long prefix (the second's own prefix starts with the same 4 tokens as
# the first's, as instruction lines do), ragged suffixes, letters and multi-token continuations, a prompt
# that is exactly the shared prefix plus one token, and rows that share nothing.
HIST, BIO = subject(1, 40), subject(1, 4) + subject(2, 30)
PROMPTS = ([HIST + [7, 8, 9]] * 4 + [HIST + subject(3, 11), HIST + [5], HIST + subject(4, 6)]
           + [BIO + subject(5, 9)] * 2 + [BIO + subject(6, 2), BIO + subject(7, 15)]
           + [subject(8, 12), subject(9, 50), [11, 12]])
CONTS = ([[20], [21], [22], [23], [30, 31, 32], [33, 34], [35], [20], [21, 22, 23, 24], [25], [26, 27],
          [28], [29, 30, 31], [32]])


def full_forward(model, prompts, conts):
    out = []
    for p, c in zip(prompts, conts):
        with torch.no_grad():
            logp = model(torch.tensor([p + c])).float().log_softmax(-1)[0]
        out.append([float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)])
    return out


def tiny(seed: int):
    return new_model(model_config_from("tiny", {"vocab_size": 448, "init_std": 0.3}), seed=seed).eval()


def count_prefills(monkeypatch) -> list[int]:
    lengths = []
    real = scoring.SharedPrefix.__init__

    def spy(self, model, prefix):
        lengths.append(prefix.shape[0])
        real(self, model, prefix)
    monkeypatch.setattr(scoring.SharedPrefix, "__init__", spy)
    return lengths


def test_plan_groups_rows_by_their_longest_useful_common_prefix():
    a, b = [1] * 10, [1] * 3 + [2] * 7
    rows = [a + [5], b + [6], a + [7, 8], [9, 9], b + [4], a + [3]]
    groups, alone = plan_prefixes(rows, [100] * len(rows), 5)
    assert sorted((p, sorted(m)) for p, m in groups) == [(10, [0, 2, 5]), (10, [1, 4])] and alone == [3]
    # one long group beats splitting off rows that would share little
    assert plan_prefixes(rows, [100] * len(rows), 11) == ([], [0, 1, 2, 3, 4, 5])
    # caps bound the prefix (the scored positions must come after it); a row capped below the minimum is left alone
    groups, _ = plan_prefixes(rows, [100, 100, 7, 100, 100, 100], 5)
    assert sorted((p, sorted(m)) for p, m in groups) == [(7, [0, 2, 5]), (10, [1, 4])]
    groups, alone = plan_prefixes(rows, [100, 100, 3, 100, 100, 100], 5)
    assert sorted((p, sorted(m)) for p, m in groups) == [(10, [0, 5]), (10, [1, 4])] and alone == [2, 3]


def test_shared_prefix_scores_equal_whole_rows_and_a_full_forward(monkeypatch):
    model = tiny(1)
    engine = Engine(model)
    prefills = count_prefills(monkeypatch)
    shared = engine.score(PROMPTS, CONTS, batch_size=3, min_shared_prefix=16)  # several suffix batches
    assert sorted(prefills) == [len(BIO), len(HIST)]  # each subject's prefix ran once
    whole = engine.score(PROMPTS, CONTS, batch_size=3, min_shared_prefix=None)
    assert len(prefills) == 2
    want = full_forward(model, PROMPTS, CONTS)
    for s, w, f in zip(shared, whole, want):
        assert s.token_logprobs == pytest.approx(f, abs=1e-5)
        assert s.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-5)
        assert s.logprob == pytest.approx(sum(f), abs=1e-5)


def test_lora_and_planted_models_share_prefixes_through_their_own_forward(monkeypatch, tiny_model_dir):
    from zhllm.train.lora import apply_lora
    lora = apply_lora(copy.deepcopy(tiny(3)), r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    prefills = count_prefills(monkeypatch)
    got = Engine(lora).score(PROMPTS, CONTS, batch_size=4, min_shared_prefix=16)
    assert len(prefills) == 2
    for g, f in zip(got, full_forward(lora, PROMPTS, CONTS)):
        assert g.token_logprobs == pytest.approx(f, abs=1e-5)
    # a model whose head has a bias (not fusable): its own forward scores the suffixes
    engine, logp = planted_engine(tiny_model_dir, "A")
    vocab = engine.vocab_size
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    conts = [[t % vocab for t in c] for c in CONTS]
    got = engine.score(prompts, conts, min_shared_prefix=16)
    assert len(prefills) == 4
    for g, c in zip(got, conts):
        assert g.token_logprobs == pytest.approx([float(logp[t]) for t in c], abs=1e-5)


def test_a_transformers_model_scores_whole_rows(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM
    from zhllm.model.io import save_model
    model = tiny(4)
    hf = AutoModelForCausalLM.from_pretrained(str(save_model(model, tmp_path / "m")), dtype=torch.float32).eval()
    prefills = count_prefills(monkeypatch)
    got = Engine(hf).score(PROMPTS, CONTS, min_shared_prefix=16)
    assert prefills == []
    for g, f in zip(got, full_forward(model, PROMPTS, CONTS)):
        assert g.token_logprobs == pytest.approx(f, abs=1e-4)


def test_k_shot_mc_shares_each_subjects_examples_and_keeps_scores_and_order(tmp_path, tiny_model_dir, monkeypatch):
    def rows(subject, tag, answers):
        return [{"subject": subject, "question": f"{tag}{i}：{q}", "A": "是", "B": "否", "C": "中国", "D": "苹果",
                 "answer": a} for i, (q, a) in enumerate(zip(["今天天气很好吗？", "长江有多长？", "北京是什么？"] * 3,
                                                            answers))]
    test, dev = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    mixed = rows("历史", "题", "ABCDA") + rows("生物", "问", "DCBA") + rows("历史", "又", "BC")  # subjects interleave
    test.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed), encoding="utf-8")
    dev.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                           for r in rows("历史", "例", "ABC") + rows("生物", "样", "DAB")), encoding="utf-8")
    engine = Engine.load(tiny_model_dir, device="cpu", dtype="float32")
    items, dev_items = read_items([test]), read_items([dev])
    prefills = count_prefills(monkeypatch)
    shared = evaluate_mc(engine, items, dev=dev_items, shots=3)
    assert len(prefills) == 2 and min(prefills) > 40  # one header + 3 examples per subject, once
    monkeypatch.setattr(engine, "score", functools.partial(Engine.score, engine, min_shared_prefix=None))
    whole = evaluate_mc(engine, items, dev=dev_items, shots=3)
    assert len(prefills) == 2
    assert [r["where"] for r in shared.rows] == [it.where for it in items]
    assert [r["pick"] for r in shared.rows] == [r["pick"] for r in whole.rows]
    for s, w in zip(shared.rows, whole.rows):
        assert s["scores"] == pytest.approx(w["scores"], abs=1e-5)
