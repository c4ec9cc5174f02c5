"""DPO throughput and memory: zhllm's three references (copy, adapter, precomputed), full and LoRA, against
TRL's DPOTrainer on the same model, pairs and machine, in the same run.

Each variant runs in its own process so its peak RSS is its own. Default: the 26m preset (random weights:
speed does not depend on them) with the MiniMind tokenizer, the real pairs of ../shared/data/dpo/dpo_zh.jsonl,
sequences up to 512 tokens (prompt up to 256), 4 pairs per step (the 26m recipe's micro-batch), bf16 autocast with fp32
weights on both sides, eager layers. Pairs/s counts optimizer steps x pairs per step, after warm-up steps; the
precomputed reference's one-off pass before training is timed separately (`ref pass s`).

    python benchmarks/bench_dpo.py [--steps 6] [--warmup 1] [--pairs 4]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_support import SHARED, random_model_dir

VARIANTS = {  # name -> (implementation, reference, lora)
    "zhllm full, copy": ("zhllm", "copy", False), "zhllm full, precomputed": ("zhllm", "precomputed", False),
    "zhllm LoRA, copy": ("zhllm", "copy", True), "zhllm LoRA, adapter": ("zhllm", "adapter", True),
    "zhllm LoRA, precomputed": ("zhllm", "precomputed", True),
    "TRL full, copy": ("trl", "copy", False), "TRL full, precomputed": ("trl", "precomputed", False),
    "TRL LoRA, adapter": ("trl", "adapter", True), "TRL LoRA, precomputed": ("trl", "precomputed", True),
}
PAIRS_USED = 64


def _records(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # short enough that both sides keep every pair whole within 512 tokens: the same pairs for zhllm and TRL
    return [r for r in rows if not r.get("history")
            and len(r["prompt"]) < 200 and len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 500][:n]



def run_zhllm(reference: str, lora: bool, model_dir: Path, data: Path, steps: int, warmup: int, pairs: int,
              seq: int, tmp: Path) -> dict:
    import shutil

    import torch

    from zhllm.train.dpo import run_dpo
    from zhllm.train import trainer as trainer_mod

    out = tmp / f"zhllm-{reference}-{'lora' if lora else 'full'}"
    shutil.rmtree(out, ignore_errors=True)
    times: list[float] = []
    ref_pass = [0.0]
    step = trainer_mod.Trainer.train_step
    prepare = trainer_mod.Trainer.__init__

    def timed_step(self):
        t = time.perf_counter()
        r = step(self)
        times.append(time.perf_counter() - t)
        return r

    def timed_init(self, *a, **k):
        t = time.perf_counter()
        prepare(self, *a, **k)
        ref_pass[0] = time.perf_counter() - t

    trainer_mod.Trainer.train_step, trainer_mod.Trainer.__init__ = timed_step, timed_init
    sets = [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", f"train.max_steps={steps + warmup}",
            f"train.batch_size={pairs}", "train.grad_accum=1", f"train.seq_len={seq}",
            f"data.max_prompt_len={seq // 2}", "data.val_fraction=0",
            "train.precision=bf16", "train.bf16_weights=false", "train.compile=false", "train.lr=5e-6",
            "eval.every=0", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", "log.plots=false",
            f"dpo.reference={reference}", f"lora.enabled={str(lora).lower()}", "lora.r=16", "lora.dropout=0"]
    run_dpo("26m", sets)
    timed = times[warmup:]
    return {"pairs_per_s": pairs * len(timed) / sum(timed),
            "ref_pass_s": ref_pass[0] if reference == "precomputed" else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def run_trl(reference: str, lora: bool, model_dir: Path, data: Path, steps: int, warmup: int, pairs: int,
            seq: int, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = _records(data, PAIRS_USED)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig
        from zhllm.train.lora import LORA_TARGETS
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                 task_type="CAUSAL_LM")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(output_dir=str(tmp / "trl-out"), report_to="none", use_cpu=True, bf16=True,
                     per_device_train_batch_size=pairs, max_steps=steps + warmup, max_length=seq,
                     truncation_mode="keep_end", learning_rate=5e-6, logging_steps=10 ** 6, save_strategy="no",
                     precompute_ref_log_probs=reference == "precomputed", dataloader_num_workers=0,
                     dataset_num_proc=1)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    total = time.perf_counter() - t0
    timed = times[warmup:]
    return {"pairs_per_s": pairs * len(timed) / sum(timed),
            "ref_pass_s": (total - sum(times)) if reference == "precomputed" else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (the 26m recipe's micro-batch)")
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tmp", default="/tmp/zhllm-bench-dpo")
    ap.add_argument("--only", help="run only the variants whose name starts with this (e.g. zhllm, TRL)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = Path(args.tmp)
    data = tmp / "pairs.jsonl"
    if args.variant:
        impl, reference, lora = VARIANTS[args.variant]
        fn = run_zhllm if impl == "zhllm" else run_trl
        print(json.dumps(fn(reference, lora, random_model_dir(args.preset, tmp), data, args.steps, args.warmup,
                            args.pairs, args.seq, tmp)))
        return 0
    source = SHARED / "dpo" / "dpo_zh.jsonl"
    if not source.is_file() or not (SHARED / "tokenizers" / "minimind").is_dir():
        print("needs ../shared/data (dpo/dpo_zh.jsonl and the MiniMind tokenizer)", file=sys.stderr)
        return 1
    tmp.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(source, PAIRS_USED)),
                    encoding="utf-8")
    random_model_dir(args.preset, tmp)
    results = {}
    for name in (n for n in VARIANTS if not args.only or n.startswith(args.only)):
        cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--pairs", str(args.pairs), "--preset", args.preset, "--seq", str(args.seq), "--tmp", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-2500:]}", file=sys.stderr)
            continue
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"DPO at the {args.preset} preset, seq {args.seq}, {args.pairs} pairs/step, bf16 autocast, "
          f"{args.steps} timed steps after {args.warmup} warm-up\n")
    print("| variant | pairs/s | setup incl. ref pass (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        ref = "-" if r["ref_pass_s"] is None else f"{r['ref_pass_s']:.1f}"
        print(f"| {name} | {r['pairs_per_s']:.2f} | {ref} | {r['peak_rss_mb']:.0f} |")
    print("\n| zhllm vs TRL (same reference) | pairs/s ratio | peak RSS ratio | target |")
    print("|---|---:|---:|---|")
    for ours, theirs in (("zhllm full, copy", "TRL full, copy"), ("zhllm full, precomputed", "TRL full, precomputed"),
                         ("zhllm LoRA, adapter", "TRL LoRA, adapter"),
                         ("zhllm LoRA, precomputed", "TRL LoRA, precomputed")):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"| {ours.removeprefix('zhllm ')} | {a['pairs_per_s'] / b['pairs_per_s']:.2f}x | "
                  f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x | >= 1.5x pairs/s |")
    full_copy = results.get("zhllm full, copy")
    if full_copy:
        print("\n| zhllm memory vs its own copy reference | peak RSS ratio | target |")
        print("|---|---:|---|")
        for name in ("zhllm full, precomputed", "zhllm LoRA, adapter", "zhllm LoRA, precomputed"):
            if name in results:
                print(f"| {name.removeprefix('zhllm ')} | "
                      f"{results[name]['peak_rss_mb'] / full_copy['peak_rss_mb']:.2f}x | < 1x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
