"""`zhllm rm`: a reward model learns a planted preference (held-out pair accuracy ~100%), saves as transformers'
sequence-classification model with equal scores, resumes bitwise (as a LoRA too, whose adapter peft loads), scores
files, and rewards GRPO."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_dpo_train import planted_pairs
from train_support import set_args
from zhllm.cli import main
from zhllm.train.rm import bradley_terry_loss, run_rm


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in planted_pairs(64)))
    return path


def sets(model_dir, data, out, *extra):
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=6",
            "train.batch_size=4", "train.seq_len=64", "train.warmup_steps=1", "train.lr=3e-3",
            "train.precision=fp32", "train.threads=1", "eval.every=3", "eval.batches=2", "checkpoint.every=3",
            "data.val_fraction=0.25", "log.every=1", "log.progress=false", "log.tensorboard=false",
            "log.plots=false", *extra]


def records(run_dir, kind="train"):
    from zhllm.train.metrics import read_metrics
    return [r for r in read_metrics(run_dir) if r.get("kind", "train") == kind]


def test_bradley_terry_loss_is_the_formula():
    c, r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    expected = torch.log1p(torch.exp(-(c - r - 0.3))) + 0.1 * (c + r) ** 2
    assert torch.allclose(bradley_terry_loss(c, r, margin=0.3, center_coef=0.1), expected, atol=1e-6)
    assert torch.allclose(bradley_terry_loss(c, r), -torch.nn.functional.logsigmoid(c - r))


def test_per_pair_margin_field_reaches_the_loss(tokenizer_dir):
    from zhllm.data.preference import PreferenceDataset, encode_preference_records
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.rm import BradleyTerry
    rows = planted_pairs(5)
    for row, m in zip(rows, (2.0, None, 0.5, "big", float("inf"))):
        if m is not None:
            row["margin"] = m
    pairs = encode_preference_records(load_tokenizer(tokenizer_dir), rows)
    assert [p.margin for p in pairs] == [2.0, None, 0.5]  # "big" and inf are bad records, skipped
    batch = PreferenceDataset(pairs).collate([0, 1, 2])
    assert torch.equal(torch.isnan(batch["margin"]), torch.tensor([False, True, False]))
    scores = torch.tensor([1.0, 0.2, -1.0, 0.0, 0.5, -2.0])  # chosen rows, then rejected rows
    out = BradleyTerry(margin=0.3).loss(lambda ids, attention_mask: scores, batch)
    expected = bradley_terry_loss(scores[:3], scores[3:], torch.tensor([2.0, 0.3, 0.5])).sum()
    assert torch.allclose(out.loss_sum, expected) and not torch.allclose(out.loss_sum, bradley_terry_loss(
        scores[:3], scores[3:], 0.3).sum())
    assert "margin" not in PreferenceDataset(pairs[1:2]).collate([0])  # no margins: DPO's batches are unchanged


def test_planted_preference_is_learnt_and_transformers_scores_the_same(tmp_path, tiny_model_dir, pairs_file):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_rm("tiny", sets(tiny_model_dir, pairs_file, out, "train.max_steps=16", "eval.every=8", "eval.batches=4",
                        "log.plots=true"))
    evals = records(out, "eval")
    assert evals[-1]["val_rewards/accuracy"] == pytest.approx(1.0)
    assert evals[-1]["val_rewards/margins"] > evals[0]["val_rewards/margins"] > 0
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000
    ckpt = out / "checkpoints" / "latest"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] is not None

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from zhllm.align.reward_scores import RewardScorer
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    scorer = RewardScorer(ckpt)
    convs = [[{"role": "user", "content": "北京是哪里？"}, {"role": "assistant", "content": reply}]
             for reply in ("北京是中国的首都。", "Hello, world.", "长江是中国最长的河流。今天天气很好")]
    ours = scorer.score(convs)
    enc = tok.apply_chat_template(convs, tokenize=True, return_dict=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.squeeze(-1)
    assert ours == pytest.approx(theirs.tolist(), abs=1e-4)
    assert ours[0] > ours[1] and ours[2] > ours[1]  # the planted preference: Chinese over English


def test_kill_and_resume_is_bitwise_equal(tmp_path, tiny_model_dir, pairs_file):
    torch.set_num_threads(1)
    run_rm("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "ref"))
    args = [sys.executable, "-m", "zhllm", "rm", "--config", "tiny"]
    for s in sets(tiny_model_dir, pairs_file, tmp_path / "cut"):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "4"},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    run_rm("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "cut"), resume="auto")
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "rewards/margins", "rewards/accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_6" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / "model.safetensors"))
    assert set(wa) == set(wb) and "score.weight" in wa and "lm_head.weight" not in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_reward_model_resumes_bitwise_and_loads_in_peft(tmp_path, tiny_model_dir, pairs_file):
    torch.set_num_threads(1)
    extra = ["lora.enabled=true", "lora.r=4", "lora.dropout=0"]
    run_rm("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "ref", *extra))
    args = [sys.executable, "-m", "zhllm", "rm", "--config", "tiny"]
    for s in sets(tiny_model_dir, pairs_file, tmp_path / "cut", *extra):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "4"},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    run_rm("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "cut", *extra), resume="auto")
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    from safetensors.torch import load_file
    ckpt = tmp_path / "ref" / "checkpoints" / "step_6"
    for rel in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(str(ckpt / rel)), load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / rel))
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    from zhllm.model.reward import load_reward_model
    new_head = load_reward_model(tiny_model_dir, seed=0).score.weight  # the head the run started from (seed 0)
    assert not torch.equal(wa["base_model.model.score.weight"], new_head)  # it trains whole, kept with the adapter
    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]

    # peft over transformers' sequence-classification model of the base scores as the merged checkpoint does
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from zhllm.align.reward_scores import RewardScorer
    tok = AutoTokenizer.from_pretrained(ckpt)
    pad = json.loads((ckpt / "config.json").read_text())["pad_token_id"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=pad,
                                                              dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    convs = [[{"role": "user", "content": "北京是哪里？"}, {"role": "assistant", "content": reply}]
             for reply in ("北京是中国的首都。", "Hello, world.")]
    enc = tok.apply_chat_template(convs, tokenize=True, return_dict=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.squeeze(-1)
    assert RewardScorer(ckpt).score(convs) == pytest.approx(theirs.tolist(), abs=1e-4)

    # `zhllm lora merge` of the same adapter onto the causal-LM base gives the reward model back, head included
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "zhllm", "lora", "merge", "--base", str(tiny_model_dir),
                           "--adapter", str(ckpt / "adapter"), "--out", str(merged)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((merged / "config.json").read_text())["pad_token_id"] == pad
    assert RewardScorer(merged).score(convs) == pytest.approx(theirs.tolist(), abs=1e-4)
    head_only = tmp_path / "no_head"  # an adapter that names its head but lost its weights: an error, not a new head
    head_only.mkdir()
    (head_only / "adapter_config.json").write_text((ckpt / "adapter" / "adapter_config.json").read_text())
    from safetensors.torch import save_file
    save_file({k: v for k, v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()
               if "score" not in k}, str(head_only / "adapter_model.safetensors"))
    lost = subprocess.run([sys.executable, "-m", "zhllm", "lora", "merge", "--base", str(tiny_model_dir),
                           "--adapter", str(head_only), "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert lost.returncode != 0 and "holds no weights for them" in lost.stderr and "Traceback" not in lost.stderr


def test_bf16_weights_checkpoint_is_the_reward_model(tmp_path, tiny_model_dir, pairs_file):
    # the checkpoint is built from the fp32 masters: as the model's own class, score head and all
    torch.set_num_threads(1)
    out = tmp_path / "bf16"
    run_rm("tiny", sets(tiny_model_dir, pairs_file, out, "train.bf16_weights=true", "train.precision=bf16",
                        "train.max_steps=3", "eval.every=0"))
    ckpt = out / "checkpoints" / "step_3"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    from safetensors.torch import load_file
    from zhllm.model.reward import load_reward_model
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights["score.weight"].dtype == torch.float32
    assert not torch.equal(weights["score.weight"], load_reward_model(tiny_model_dir, seed=0).score.weight)


def test_score_cli_and_grpo_reward(tmp_path, tiny_model_dir, pairs_file, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_rm("tiny", sets(tiny_model_dir, pairs_file, out, "train.max_steps=12", "eval.every=12"))
    ckpt = out / "checkpoints" / "latest"
    inputs = tmp_path / "in.jsonl"
    rows = planted_pairs(6, seed=7) + [{"prompt": "你好", "response": "今天天气很好。"}, {"messages": []}, "x"]
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    scored = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(ckpt), "--input", str(inputs), "--out", str(scored),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "scored 7 records, 6 of them preference pairs: chosen scored higher in 6 (100.0%)" in text
    assert "skipped 2 bad records" in text
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(r["chosen_score"] > r["rejected_score"] for r in lines[:6]) and isinstance(lines[6]["score"], float)
    # a reward-model reward for GRPO: the same scores for the same conversations
    from zhllm.align.rewards import RewardSpec, build_rewards
    rewards = build_rewards([RewardSpec(type="model", path=str(ckpt))])
    total, per = rewards.score(["北京是哪里？", [{"role": "user", "content": "北京是哪里？"}]],
                               ["北京是中国的首都。", "Hello, world."], [None, None], [5, 3])
    assert total[0] > total[1] and torch.equal(total, per["model"])
    # mistakes are one line: not a reward model, a missing path
    assert main(["rm", "score", "--model", str(tiny_model_dir), "--input", str(inputs), "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "not a reward model" in capsys.readouterr().err
    from zhllm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(model\): path .*no such reward-model directory"):
        build_rewards([RewardSpec(type="model", path=str(tmp_path / "nope"))])


def test_recipe_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, pairs_file, capsys):
    for base, extra, needle in ((["rm", "--config", "tiny"], ["rm.margin=-1"], "rm.margin"),
                                (["rm", "train", "--config", "tiny"], ["eval.prompts=[你好]"], "no vocabulary head"),
                                (["rm", "--config", "tiny"], ["rm.nope=1"], "unknown key 'rm.nope'"),
                                (["rm"], [], "name a subcommand")):
        argv = base + set_args(sets(tiny_model_dir, pairs_file, tmp_path / "x", *extra))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
