"""GRPO throughput: zhllm's GRPO step split into rollout and update, against TRL's GRPOTrainer on the same model,
prompts and machine, in the same run; and zhllm's batched rollout tokens/s against its own batch-1 decode.

Each side runs in its own process. Default: the 26m preset (random weights: speed does not depend on them) with the
MiniMind tokenizer, prompts from the demo's tasks (short Chinese questions, chat-rendered), 4 prompts x 8
completions per step, 64 new tokens at temperature 1, beta 0 (no reference), one update per rollout, bf16
autocast with fp32 weights on both sides, eager layers; zhllm runs once more with its bf16 weights (fp32 master
copies in the optimizer, `train.bf16_weights`, as its CPU recipes train). Random weights seldom sample an end token, so
both sides generate close to 64 tokens per completion; the table shows each side's mean completion length and
compares samples/s and completion tokens/s. `--lora R` trains a rank-R LoRA (alpha 2R, no dropout, the attention
and MLP projections) on both sides instead of the whole model: zhllm then runs with fp32 weights only (bf16
weights are for full fine-tuning) and TRL gets the same adapter as its `peft_config`.

    python benchmarks/bench_rl.py [--steps 4] [--warmup 1] [--prompts 4] [--generations 8] [--new-tokens 64]
                                  [--lora R]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_support import SHARED, random_model_dir

SIDES = ("zhllm", "zhllm, bf16 weights", "zhllm, bf16 weights, compiled", "TRL")
LORA_SIDES = ("zhllm", "TRL")


def run_zhllm(model_dir: Path, prompts: Path, a, bf16_weights: bool = False, compile: bool = False) -> dict:
    import shutil

    import torch

    from zhllm.train import trainer as trainer_mod
    from zhllm.train.grpo import run_grpo
    from zhllm.train.metrics import read_metrics

    out = Path(a.tmp) / f"zhllm-run{'-bf16w' if bf16_weights else ''}{'-compiled' if compile else ''}"
    shutil.rmtree(out, ignore_errors=True)
    times: list[float] = []
    step = trainer_mod.Trainer.train_step

    def timed_step(self):
        t = time.perf_counter()
        r = step(self)
        times.append(time.perf_counter() - t)
        return r

    trainer_mod.Trainer.train_step = timed_step
    run_grpo("tiny", [f"model.init_from={model_dir}", f"data.path=[{prompts}]", f"out_dir={out}",
                      f"train.max_steps={a.steps + a.warmup}", f"train.batch_size={a.prompts}", "train.grad_accum=1",
                      "train.seq_len=256", "train.precision=bf16", f"train.bf16_weights={str(bf16_weights).lower()}",
                      f"train.compile={str(compile).lower()}",
                      f"grpo.num_generations={a.generations}", f"grpo.max_new_tokens={a.new_tokens}",
                      "grpo.temperature=1.0", "grpo.beta=0.0", "grpo.ppo_epochs=1", "eval.every=0",
                      "checkpoint.every=0", "log.every=1", "log.progress=false", "log.tensorboard=false",
                      "log.plots=false", *_lora_sets(a.lora)])
    records = [r for r in read_metrics(out) if r.get("kind", "train") == "train"][a.warmup:]
    timed = times[a.warmup:]
    rollout = sum(r["rollout_s"] for r in records)
    samples = a.prompts * a.generations * len(timed)
    length = sum(r["completions/mean_length"] for r in records) / len(records)
    return {"samples_per_s": samples / sum(timed), "tokens_per_s": samples * length / sum(timed),
            "rollout_share": rollout / sum(timed), "rollout_tokens_per_s": samples * length / rollout,
            "mean_length": length, "batch1_tokens_per_s": _batch1_decode(model_dir, prompts, a.new_tokens),
            "threads": torch.get_num_threads()}


def _lora_sets(rank: int) -> list[str]:
    return [] if not rank else ["lora.enabled=true", f"lora.r={rank}", f"lora.alpha={2 * rank}", "lora.dropout=0"]


def _batch1_decode(model_dir: Path, prompts: Path, new_tokens: int) -> float:
    """zhllm's batch-1 decode of the same model (`zhllm generate`: the engine's default dtype, bf16 where the
    CPU multiplies bf16 natively), the best of 3, in tokens/s."""
    from zhllm.infer.engine import Engine
    engine = Engine.load(model_dir)
    prompt = [{"role": "user", "content": json.loads(prompts.read_text(encoding="utf-8").splitlines()[0])["prompt"]}]
    best = 0.0
    for _ in range(4):  # the first is warm-up
        t = time.perf_counter()
        out = engine.generate_batch([prompt], n=1, stop_token_ids=[], max_new_tokens=new_tokens, temperature=0.0)
        best = max(best, len(out.completions[0].token_ids) / (time.perf_counter() - t))
    return best


def run_trl(model_dir: Path, prompts: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    times: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def exact(completions, answer, **kw):  # the reward costs nothing next to the model: any rule will do
        return [float(str(ans) in c[0]["content"]) for c, ans in zip(completions, answer)]

    args = GRPOConfig(output_dir=str(Path(a.tmp) / "trl-out"), report_to="none", use_cpu=True, bf16=True,
                      per_device_train_batch_size=a.prompts * a.generations, num_generations=a.generations,
                      max_completion_length=a.new_tokens, temperature=1.0, beta=0.0, num_iterations=1,
                      max_steps=a.steps + a.warmup, learning_rate=1e-6, logging_steps=1, save_strategy="no",
                      dataloader_num_workers=0, loss_type="grpo", disable_dropout=True, seed=0)
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        from zhllm.train.lora import LORA_TARGETS
        peft_config = LoraConfig(r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[StepTimer()], peft_config=peft_config)
    trainer.train()
    timed = times[a.warmup:]
    length = sum(lengths[a.warmup:]) / max(1, len(lengths[a.warmup:])) if lengths else float("nan")
    samples = a.prompts * a.generations * len(timed)
    return {"samples_per_s": samples / sum(timed), "tokens_per_s": samples * length / sum(timed),
            "rollout_share": None, "rollout_tokens_per_s": None, "mean_length": length,
            "batch1_tokens_per_s": None, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (each: one rollout + one update)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--tmp", default="/tmp/zhllm-bench-rl")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="train a rank-R LoRA on both sides (default: "
                    "the whole model)")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sides = LORA_SIDES if a.lora else SIDES
    tmp = Path(a.tmp)
    prompts = tmp / "prompts.jsonl"
    if a.side:
        model_dir = random_model_dir(a.preset, tmp)
        result = run_trl(model_dir, prompts, a) if a.side == "TRL" else \
            run_zhllm(model_dir, prompts, a, bf16_weights=a.side != "zhllm", compile=a.side.endswith("compiled"))
        print(json.dumps(result))
        return 0
    if not (SHARED / "tokenizers" / "minimind").is_dir():
        print("needs ../shared/data (the MiniMind tokenizer)", file=sys.stderr)
        return 1
    from zhllm.demo import write_demo_rl_prompts
    tmp.mkdir(parents=True, exist_ok=True)
    write_demo_rl_prompts(prompts, 256, seed=0)
    random_model_dir(a.preset, tmp)
    results = {}
    for side in sides:
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--prompts", str(a.prompts), "--generations", str(a.generations), "--new-tokens", str(a.new_tokens),
               "--preset", a.preset, "--tmp", str(tmp), "--lora", str(a.lora)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{side}: failed\n{r.stderr[-2500:]}", file=sys.stderr)
            continue
        results[side] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{side}: {results[side]}", file=sys.stderr)
    trained = f"a rank-{a.lora} LoRA" if a.lora else "the whole model"
    print(f"GRPO at the {a.preset} preset ({trained}): {a.prompts} prompts x {a.generations} completions per step, "
          f"up to {a.new_tokens} new tokens, bf16 autocast, {a.steps} timed steps after {a.warmup} warm-up\n")
    print("| side | samples/s | completion tokens/s | mean completion length | rollout share of step | "
          "rollout tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        share = "-" if r["rollout_share"] is None else f"{r['rollout_share']:.0%}"
        roll = "-" if r["rollout_tokens_per_s"] is None else f"{r['rollout_tokens_per_s']:.0f}"
        print(f"| {side} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['mean_length']:.1f} | {share} | "
              f"{roll} |")
    t = results.get("TRL")
    print("\n| measure | zhllm | reference | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for side in sides[:-1]:
        z = results.get(side)
        if z is None:
            continue
        if t is not None:
            print(f"| GRPO samples/s, {side} | {z['samples_per_s']:.2f} | {t['samples_per_s']:.2f} (TRL GRPOTrainer) | "
                  f"{z['samples_per_s'] / t['samples_per_s']:.2f}x | >= 2x |")
        print(f"| rollout tokens/s, {side} | {z['rollout_tokens_per_s']:.0f} | {z['batch1_tokens_per_s']:.0f} (zhllm "
              f"batch-1 decode) | {z['rollout_tokens_per_s'] / z['batch1_tokens_per_s']:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
