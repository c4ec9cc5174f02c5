"""SFT throughput and memory: packing vs padding, LoRA vs full fine-tuning, through the shared training loop,
against transformers (and peft for LoRA) on the same batches.

Counts only real (non-pad) tokens, so padding waste shows up as lower tokens/s. Each variant runs in its own
process so its peak RSS is its own. Default: the 26m preset, the real SFT sample in ../shared/data with the
MiniMind tokenizer, seq 512, micro-batch 4, the 26m SFT recipe's settings (compiled layers; bf16 weights with
fp32 masters for full fine-tuning, bf16 autocast for LoRA). transformers' LlamaForCausalLM + AdamW trains on the
padded, length-grouped batches (its SFT setting on a CPU: packing without cross-document attention needs
flash-attention) in bf16 autocast and in fp32, each eager and with compiled layers; the fastest of those four is
the reference, for full fine-tuning and for LoRA alike.

    python benchmarks/bench_sft.py [--steps 4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench_support import SHARED

VARIANTS = {"full, packed": (True, False), "full, padded (length-grouped)": (False, False),
            "LoRA r=16, packed": (True, True), "LoRA r=16, padded (length-grouped)": (False, True)}
HF_VARIANTS = {  # name -> (lora, precision, compiled layers)
    f"transformers{peft}, padded (length-grouped), {setting}": (lora, precision, compiled)
    for lora, peft in ((False, ""), (True, " + peft LoRA r=16"))
    for setting, precision, compiled in (("bf16 autocast", "bf16", False), ("fp32", "fp32", False),
                                         ("bf16 autocast, compiled layers", "bf16", True),
                                         ("fp32, compiled layers", "fp32", True))}


def timed_steps(step, next_batch, steps: int) -> tuple[int, int, float]:
    """(real tokens, all tokens, seconds) over `steps` calls of step(); next_batch() is what it trains on next."""
    real = total = 0
    seconds = 0.0
    for _ in range(steps):
        b = next_batch()
        mask = b["segment_ids"] >= 0 if "segment_ids" in b else b["attention_mask"].bool()
        real += int(mask.sum())
        total += mask.numel()
        t = time.perf_counter()
        step()
        seconds += time.perf_counter() - t
    return real, total, seconds


def run_variant(packing: bool, lora: bool, steps: int, preset: str, seq: int, batch: int, data: str) -> dict:

    from zhllm.config import from_dict
    from zhllm.data.sft_batches import build_sft_datasets
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.lora import apply_lora
    from zhllm.train.objectives import MaskedCausalLM
    from zhllm.train.parallel import Dist
    from zhllm.train.sft import SftConfig
    from zhllm.train.trainer import Trainer

    tok = load_tokenizer(SHARED / "tokenizers" / "minimind")
    train, _, _, _ = build_sft_datasets(tok, [data], seq, packing=packing, progress=False)
    model = new_model(model_config_from(preset, {"vocab_size": len(tok)}), seed=0)
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        model = apply_lora(model, r=16, alpha=32)
    cfg = from_dict(SftConfig, {
        "model": {"init_from": "unused"}, "data": {"path": [data]},
        "train": {"max_steps": 10 ** 6, "batch_size": batch, "seq_len": seq, "precision": "bf16", "compile": True,
                  "bf16_weights": not lora},  # the configs/sft/26m.yaml recipe (LoRA: bf16 autocast)
        "eval": {"every": 0}, "checkpoint": {"every": 0},
        "log": {"tensorboard": False, "progress": False, "plots": False}, "out_dir": "/tmp/zhllm-bench-sft"})
    tr = Trainer(cfg, MaskedCausalLM(), model, train, None, dist=Dist(), echo=lambda *_: None)
    for _ in range(3):  # warm-up: compiles, and recompiles once for the varying widths of padded batches
        tr.train_step()
    result = timed_steps(tr.train_step, lambda: train.batch(tr.state.data_position, batch), steps)
    return summary(model, *result)


def run_transformers(lora: bool, precision: str, compiled: bool, steps: int, preset: str, seq: int, batch: int,
                     data: str) -> dict:
    """transformers (peft for LoRA) + torch.optim.AdamW on the batches zhllm's padded variant trains on."""
    import torch
    from bench_train import HFBaseline

    from zhllm.data.sft_batches import build_sft_datasets
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.lora import LORA_TARGETS, lora_config

    tok = load_tokenizer(SHARED / "tokenizers" / "minimind")
    train, _, _, _ = build_sft_datasets(tok, [data], seq, packing=False, progress=False)
    hf = HFBaseline(preset, seq, batch, len(tok), precision, compiled)
    if lora:
        from peft import get_peft_model
        hf.model = get_peft_model(hf.model, lora_config(16, 32, 0.0, LORA_TARGETS))
        hf.opt = torch.optim.AdamW([p for p in hf.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    position = 0

    def step():
        nonlocal position
        hf.step(train.batch(position, batch))
        position += batch
    for _ in range(3):
        step()
    result = timed_steps(step, lambda: train.batch(position, batch), steps)
    return summary(hf.model, *result)


def summary(model, real: int, total: int, seconds: float) -> dict:
    import torch
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": real / seconds, "pad_share": 1 - real / total, "trainable": trainable,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data", default=str(SHARED / "sft" / "alpaca_gpt4_zh_sample_1k.json"))
    ap.add_argument("--quick", action="store_true", help="2 steps per variant")
    ap.add_argument("--no-reference", action="store_true", help="skip the transformers rows")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        if args.variant in VARIANTS:
            packing, lora = VARIANTS[args.variant]
            r = run_variant(packing, lora, args.steps, args.preset, args.seq, args.batch, args.data)
        else:
            r = run_transformers(*HF_VARIANTS[args.variant], args.steps, args.preset, args.seq, args.batch, args.data)
        print(json.dumps(r))
        return 0
    if not (SHARED / "tokenizers" / "minimind").is_dir():
        print("needs ../shared/data (tokenizer and SFT sample)", file=sys.stderr)
        return 1
    steps = 2 if args.quick else args.steps
    results = {}
    for name in [*VARIANTS, *([] if args.no_reference else HF_VARIANTS)]:
        cmd = [sys.executable, __file__, "--variant", name, "--steps", str(steps), "--preset", args.preset,
               "--seq", str(args.seq), "--batch", str(args.batch), "--data", args.data]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    print(f"SFT at the {args.preset} preset, seq {args.seq}, micro-batch {args.batch}, {steps} timed steps, "
          f"{results['full, packed']['threads']} threads; zhllm rows run the 26m SFT recipe's precision\n")
    print("| variant | non-pad tokens/s | padding share | trainable params | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['pad_share']:.1%} | {r['trainable'] / 1e6:.2f}M | "
              f"{r['peak_rss_mb']:.0f} |")
    full_p, full_u = results["full, packed"], results["full, padded (length-grouped)"]
    lora_p = results["LoRA r=16, packed"]
    print("\n| figure | zhllm | reference | ratio | target |")
    print("|---|---:|---:|---:|---|")
    if not args.no_reference:
        for zh, lora in (("full, packed", False), ("LoRA r=16, packed", True)):
            ref = max((n for n, v in HF_VARIANTS.items() if v[0] == lora), key=lambda n: results[n]["tokens_per_s"])
            z, h = results[zh]["tokens_per_s"], results[ref]["tokens_per_s"]
            print(f"| zhllm {zh} vs the fastest {ref} | {z:.0f} | {h:.0f} | {z / h:.2f}x | > 1x |")
    print(f"| packed vs padded non-pad tokens/s | {full_p['tokens_per_s']:.0f} | {full_u['tokens_per_s']:.0f} | "
          f"{full_p['tokens_per_s'] / full_u['tokens_per_s']:.2f}x | > 1x |")
    print(f"| LoRA vs full tokens/s (packed) | {lora_p['tokens_per_s']:.0f} | {full_p['tokens_per_s']:.0f} | "
          f"{lora_p['tokens_per_s'] / full_p['tokens_per_s']:.2f}x | - |")
    print(f"| LoRA vs full peak RSS (packed) | {lora_p['peak_rss_mb']:.0f} MB | {full_p['peak_rss_mb']:.0f} MB | "
          f"{lora_p['peak_rss_mb'] / full_p['peak_rss_mb']:.2f}x | < 1x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
