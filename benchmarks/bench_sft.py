"""SFT throughput and memory: packing vs padding, LoRA vs full fine-tuning, through the shared training loop.

Counts only real (non-pad) tokens, so padding waste shows up as lower tokens/s. Each variant runs in its own
process so its peak RSS is its own. Default: the 26m preset, the real SFT sample in ../shared/data with the
MiniMind tokenizer, seq 512, micro-batch 4, the 26m SFT recipe's settings (compiled layers; bf16 weights with
fp32 masters for full fine-tuning, bf16 autocast for LoRA).

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


def run_variant(packing: bool, lora: bool, steps: int, preset: str, seq: int, batch: int, data: str) -> dict:
    import torch

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
    real = total = 0
    seconds = 0.0
    for _ in range(steps):
        b = train.batch(tr.state.data_position, batch)
        mask = b["segment_ids"] >= 0 if "segment_ids" in b else b["attention_mask"].bool()
        real += int(mask.sum())
        total += mask.numel()
        t = time.perf_counter()
        tr.train_step()
        seconds += time.perf_counter() - t
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": real / seconds, "pad_share": 1 - real / total, "trainable": trainable,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data", default=str(SHARED / "sft" / "alpaca_gpt4_zh_sample_1k.json"))
    ap.add_argument("--quick", action="store_true", help="2 steps per variant")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        packing, lora = VARIANTS[args.variant]
        print(json.dumps(run_variant(packing, lora, args.steps, args.preset, args.seq, args.batch, args.data)))
        return 0
    if not (SHARED / "tokenizers" / "minimind").is_dir():
        print("needs ../shared/data (tokenizer and SFT sample)", file=sys.stderr)
        return 1
    steps = 2 if args.quick else args.steps
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--steps", str(steps), "--preset", args.preset,
               "--seq", str(args.seq), "--batch", str(args.batch), "--data", args.data]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"SFT at the {args.preset} preset, seq {args.seq}, micro-batch {args.batch}, bf16 autocast, {steps} timed steps\n")
    print("| variant | non-pad tokens/s | padding share | trainable params | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['pad_share']:.1%} | {r['trainable'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} |")
    full_p, full_u = results["full, packed"], results["full, padded (length-grouped)"]
    lora_p = results["LoRA r=16, packed"]
    print("\n| figure | zhllm | reference | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| packed vs padded non-pad tokens/s | {full_p['tokens_per_s']:.0f} | {full_u['tokens_per_s']:.0f} | "
          f"{full_p['tokens_per_s'] / full_u['tokens_per_s']:.2f}x | > 1x |")
    print(f"| LoRA vs full tokens/s (packed) | {lora_p['tokens_per_s']:.0f} | {full_p['tokens_per_s']:.0f} | "
          f"{lora_p['tokens_per_s'] / full_p['tokens_per_s']:.2f}x | - |")
    print(f"| LoRA vs full peak RSS (packed) | {lora_p['peak_rss_mb']:.0f} MB | {full_p['peak_rss_mb']:.0f} MB | "
          f"{lora_p['peak_rss_mb'] / full_p['peak_rss_mb']:.2f}x | < 1x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
