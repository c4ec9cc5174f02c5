"""`zhllm sft` through the shared loop: full and LoRA fine-tuning, PEFT-loadable adapters, exact resume."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import shared_data
from zhllm.model.io import load_model
from zhllm.train.sft import run_sft

CONVERSATIONS = [
    [{"role": "user", "content": f"{a}加{b}等于几？"}, {"role": "assistant", "content": f"答案：{a + b}"}]
    for a in range(1, 9) for b in range(1, 9)
] + [
    [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "再见"},
     {"role": "assistant", "content": "再见！"}],
] * 8


@pytest.fixture()
def sft_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS))
    return path


def sets(model_dir, data, out, *extra):
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=6",
            "train.batch_size=4", "train.seq_len=64", "train.warmup_steps=1", "train.lr=3e-3", "eval.every=3",
            "eval.batches=2", "checkpoint.every=3", "log.progress=false", "log.tensorboard=false",
            "log.plots=false", *extra]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "train"]


def test_full_sft_learns_and_resumes_exactly(tmp_path, tiny_model_dir, sft_file):
    # train.threads=1 sets one thread in this process and in the subprocesses alike: the same kernels, the same
    # bits, whatever thread count an earlier test left here (a suite run once differed in the first loss's 7th digit)
    base = ["log.every=1", "train.threads=1"]
    ref = run_sft("tiny", sets(tiny_model_dir, sft_file, tmp_path / "ref", *base))
    assert ref["step"] == 6 and ref["val_loss"] < 6.0
    args = [sys.executable, "-m", "zhllm", "sft", "--config", "tiny"]
    for s in sets(tiny_model_dir, sft_file, tmp_path / "cut", *base):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "ZHLLM_FAIL_AT_STEP": "3"}, capture_output=True, text=True)
    assert died.returncode != 0
    done = subprocess.run(args + ["--resume", "auto"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    a = load_model(tmp_path / "ref" / "checkpoints" / "step_6")
    b = load_model(tmp_path / "cut" / "checkpoints" / "step_6")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_lora_sft_writes_merged_model_and_peft_adapter(tmp_path, tiny_model_dir, sft_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_sft("tiny", sets(tiny_model_dir, sft_file, tmp_path / "lora", "lora.enabled=true", "lora.r=4"))
    ckpt = tmp_path / "lora" / "checkpoints" / "step_6"
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    x = torch.randint(0, 300, (2, 12))
    merged = load_model(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    base_logits = load_model(tiny_model_dir)(x)
    with torch.no_grad():
        ref = peft_model(x).logits
        got = merged(x)
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter was trained, not a no-op
    # resume of a LoRA run rebuilds base + adapter and continues
    run_sft("tiny", sets(tiny_model_dir, sft_file, tmp_path / "lora", "lora.enabled=true", "lora.r=4",
                         "train.max_steps=8"), resume="auto")
    assert (tmp_path / "lora" / "checkpoints" / "step_8" / "adapter").is_dir()


def test_lora_sft_under_fsdp_saves_the_merged_model_and_its_adapter(tmp_path, tiny_model_dir, sft_file):
    # the checkpoint gathers the shards into an unsharded module with the same LoRA layers: the merged model is
    # base + adapter, and the adapter is saved from the whole weights (not from the rank's shards)
    from safetensors.torch import load_file
    from train_support import run_on_two_ranks, set_args
    from zhllm.train.lora import merge_lora
    args = ["sft", "--config", "tiny"] + set_args(sets(
        tiny_model_dir, sft_file, tmp_path / "fsdp", "lora.enabled=true", "lora.r=4", "train.parallel=fsdp",
        "train.max_steps=2", "checkpoint.every=2", "eval.every=0", "train.threads=1"))
    run_on_two_ranks(args)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_2"
    merged = load_file(str(merge_lora(tiny_model_dir, ckpt / "adapter", tmp_path / "merged") / "model.safetensors"))
    saved, base = load_file(str(ckpt / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(saved) == set(merged) and all(torch.equal(saved[k], merged[k]) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # the adapter trained


def test_sft_config_errors_are_one_line(tmp_path, tiny_model_dir, sft_file):
    r = subprocess.run([sys.executable, "-m", "zhllm", "sft", "--config", "tiny", "--set", "lora.rank=4",
                        "--set", f"model.init_from={tiny_model_dir}"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'lora.rank'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "zhllm", "sft", "--config", "26m", "--set", "lora.enabled=true",
                        "--set", f"model.init_from={tiny_model_dir}"], capture_output=True, text=True)
    assert r.returncode == 2 and "train.bf16_weights=false" in r.stderr and "Traceback" not in r.stderr


def test_sft_on_real_sample_lowers_val_loss_and_chats(tmp_path):
    """A tiny model fine-tuned on real short Chinese Q&A learns the answers' form and to end its turn."""
    tok = shared_data("tokenizers/minimind")
    records = json.loads(shared_data("sft/zh_supplement_hikariming.json").read_text(encoding="utf-8"))
    short = [r for r in records if len(r["output"]) <= 40 and len(r["instruction"]) <= 60][:600]
    data = tmp_path / "short_qa.json"
    data.write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    model_dir = tmp_path / "base"
    r = subprocess.run([sys.executable, "-m", "zhllm", "model", "init", "--preset", "tiny", "--tokenizer", str(tok),
                        "--out", str(model_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = run_sft("tiny", [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={tmp_path / 'sft'}",
                               "train.max_steps=150", "train.batch_size=8", "train.seq_len=256", "train.lr=1e-2",
                               "eval.every=50", "eval.batches=4", "checkpoint.every=150", "log.progress=false",
                               "log.tensorboard=false", "log.plots=false", "data.val_fraction=0.05"])
    evals = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "eval"]
    # an untrained model sits near ln(vocab) = 8.76 nats; learning must take it well below, and keep going
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_loss"] < math.log(6400) - 3.0
    assert summary["step"] == 150
    ckpt = tmp_path / "sft" / "checkpoints" / "step_150"
    chat = subprocess.run([sys.executable, "-m", "zhllm", "chat", str(ckpt), "--max-new-tokens", "48"],
                          input=short[0]["instruction"] + "\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    assert "<|im" not in chat.stdout and "Traceback" not in chat.stderr
    # it ends its turn with <|im_end|> instead of running to the token limit
    from zhllm.infer.generate import default_stop_ids, generate_ids, load_for_inference
    from zhllm.infer.prompts import encode_prompt
    model, tokenizer = load_for_inference(ckpt)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": r["instruction"]}]) for r in short[:8]]
    answers = generate_ids(model, prompts, stop_token_ids=default_stop_ids(tokenizer, model), max_new_tokens=120)
    assert sum(len(a) < 120 for a in answers) >= 6
