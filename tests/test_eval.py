"""zhllm.eval: the one loss / bits-per-byte implementation, the Task shape and its scoring cores."""
import math
from types import SimpleNamespace

import pytest
import torch

from zhllm.eval.loss import evaluate_loss, token_nll
from zhllm.eval.tasks import Item, Task, pick_choice, run_task
from zhllm.model.config import model_config_from
from zhllm.model.io import load_model, new_model
from zhllm.train.objectives import CausalLM

from train_support import make_shards, run_inprocess, write_recipe


class Windows:
    """Random token windows read in order, with a known UTF-8 bytes per token."""

    def __init__(self, n: int, seq_len: int, vocab: int, bytes_per_token: float):
        self.tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(1))
        self.bytes_per_token = bytes_per_token

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, start: int, count: int) -> torch.Tensor:
        return self.tokens[start:start + count]


def tiny_model(vocab: int = 97):
    cfg = model_config_from("tiny", {"vocab_size": vocab, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64})
    return new_model(cfg, seed=3).eval()


def independent_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(next token) in float64, one window and one position at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None, :-1])[0].double(), dim=-1)
            for t in range(len(w) - 1):
                total -= float(logp[t, w[t + 1]])
                count += 1
    return total, count


def test_loss_and_bits_per_byte_equal_an_independent_computation():
    model, data = tiny_model(), Windows(10, 12, 97, bytes_per_token=2.5)
    m = evaluate_loss(model, CausalLM(), data, batch_size=3, batches=2)
    nll, tokens = independent_nll(model, data.tokens[:6])  # 2 batches of 3: the first 6 windows
    assert m["val_windows"] == 6
    assert m["val_loss"] == pytest.approx(nll / tokens, abs=1e-6)
    assert m["val_bpb"] == pytest.approx(nll / math.log(2) / (tokens * 2.5), abs=1e-6)
    assert m["val_ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)


def test_ranks_share_the_windows_of_one_process_and_reduce_to_its_figure():
    model, data = tiny_model(), Windows(16, 8, 97, bytes_per_token=3.0)
    whole = evaluate_loss(model, CausalLM(), data, batch_size=2, batches=4)
    shares = [token_nll(model, CausalLM(), data, 2, 2, rank=r, world=2) for r in (0, 1)]

    def all_reduce(sums):  # what the trainer's Dist does across processes
        return [sum(s[i] for s in shares) for i in range(2)]

    ranked = evaluate_loss(model, CausalLM(), data, batch_size=2, batches=2, rank=1, world=2, reduce=all_reduce)
    assert ranked["val_windows"] == whole["val_windows"] == 8
    assert ranked["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)
    assert ranked["val_bpb"] == pytest.approx(whole["val_bpb"], abs=1e-6)


def test_training_loop_and_pipeline_eval_agree_on_the_same_checkpoint(tmp_path, tokenizer_dir, corpus):
    from zhllm.eval.demo_tasks import evaluate_pipeline_models, pretrain_eval_windows
    from zhllm.train.metrics import read_metrics
    shards = make_shards(tmp_path / "shards", tokenizer_dir, corpus, val_every=3)
    run = tmp_path / "run"
    summary = run_inprocess(write_recipe(tmp_path / "r.yaml", shards, run, max_steps=2), "eval.every=2",
                            "eval.batches=3", "train.batch_size=2", "checkpoint.every=2")
    trained = [r for r in read_metrics(run) if r.get("kind") == "eval"][-1]
    assert trained["step"] == summary["step"] == 2
    seq_len, batch_size, batches = pretrain_eval_windows(run)
    assert (seq_len, batch_size, batches) == (32, 2, 3)
    cfg = SimpleNamespace(tasks=0, max_new_tokens=2)  # generation is not what this test measures
    table = evaluate_pipeline_models({"pretrain": str(run / "checkpoints" / "step_2")}, str(shards), tmp_path,
                                     cfg, seq_len, 0, batch_size, batches, log=lambda *_: None)
    ev = table["pretrain"]
    assert ev["val_windows"] == trained["val_windows"] == 6
    assert ev["val_loss"] == pytest.approx(trained["val_loss"], abs=1e-5)
    assert ev["val_bpb"] == pytest.approx(trained["val_bpb"], abs=1e-5)


class Arithmetic(Task):
    name, kind = "sums", "generative"

    def items(self):
        return [Item("1+1=", "2"), Item("2+2=", "4"), Item("3+3=", "6")]

    def prompt(self, item, chat):
        return [{"role": "user", "content": item.question}] if chat else item.question

    def score(self, item, output):
        return output.strip() == item.answer


def test_generative_task_rows_go_through_one_generation_call(monkeypatch):
    import zhllm.eval.tasks as tasks
    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stop_strings=()):
        seen.append(list(prompts))
        return [" 2", "5", "6\n"][:len(prompts)] if len(seen) == 1 else ["6\n"]

    monkeypatch.setattr(tasks, "generate_answers", fake_generate)
    rows = run_task(Arithmetic(), tiny_model(), None, chat=False, batch_size=2)
    assert seen == [["1+1=", "2+2="], ["3+3="]]
    assert [r["correct"] for r in rows] == [True, False, True]
    assert rows[1] == {"question": "2+2=", "answer": "4", "output": "5", "correct": False}


def test_demo_task_scores_exact_answers_and_asks_each_model_its_way():
    from zhllm.demo import answer_text
    from zhllm.eval.demo_tasks import DemoTasks
    task = DemoTasks(6, seed=0)
    items = list(task.items())
    assert len(items) == 6 and task.kind == "generative"
    it = items[0]
    demo = it.meta["task"]
    assert task.score(it, answer_text(demo)) and not task.score(it, "答案：" + it.answer + "0")
    assert task.prompt(it, chat=True) == [{"role": "user", "content": it.question}]
    assert task.prompt(it, chat=False) == f"问：{it.question}\n答："
    assert "问：" in task.stop_strings(chat=False) and task.stop_strings(chat=True) == ()


def test_categorical_pick_is_the_argmax_of_each_choices_continuation_log_probability(tiny_model_dir):
    from zhllm.infer.prompts import encode_prompt
    from zhllm.tokenizer.encode import encode_text
    from zhllm.tokenizer.load import load_tokenizer
    model, tok = load_model(tiny_model_dir, dtype=torch.float32), load_tokenizer(tiny_model_dir)

    class Capital(Task):
        name, kind = "capital", "categorical"

        def items(self):
            return [Item("中国的首都是", "北京", choices=("上海", "北京", "长江"))]

        def prompt(self, item, chat):
            return item.question

    item = Capital().items()[0]
    pick, scores = pick_choice(model, tok, Capital(), item, chat=False)
    prompt = encode_prompt(tok, item.question)
    want = []
    for choice in item.choices:  # summed log p(choice | prompt), one unpadded sequence at a time
        cont = encode_text(tok, choice)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + cont]))[0].double(), dim=-1)
        want.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
    assert scores == pytest.approx(want, abs=1e-4)
    assert pick == item.choices[max(range(3), key=want.__getitem__)]
    rows = run_task(Capital(), model, tok, chat=False)
    assert rows[0]["output"] == pick and rows[0]["correct"] == (pick == "北京")
