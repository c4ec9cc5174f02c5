"""Mixture-of-experts training throughput: zhllm's MoE step vs transformers' Qwen2-MoE of the same config, and vs
zhllm's dense model with the same active parameters.

Default: the moe-26m preset (8 experts, 2 routed + a shared expert per token, ~26M of ~52M parameters active) and
the dense 26m preset (the same attention and FFN width per token), seq 512, micro-batch 4. zhllm runs its recipe
(precision auto, compiled layers; router losses on). transformers runs `Qwen2MoeForCausalLM` with its
load-balancing loss (`output_router_logits`) and torch.optim.AdamW, in bf16 autocast and in fp32, with its default
`grouped_mm` experts and with its `eager` loop over experts, each setting in a process of its own; the fastest is the
reference. Runs alternate so machine noise hits every side alike. Prints a markdown table.

    python benchmarks/bench_moe.py [--preset moe-26m] [--dense 26m] [--steps 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench_train import HFProcess, synthetic_shards, time_zhllm, zhllm_trainer
from zhllm.model.config import model_config_from
from zhllm.train.metrics import flops_per_token

HF_VARIANTS = {  # name -> (precision, experts implementation)
    "transformers Qwen2MoeForCausalLM + AdamW (bf16 autocast, grouped_mm experts)": ("bf16", "grouped_mm"),
    "transformers Qwen2MoeForCausalLM + AdamW (fp32, grouped_mm experts)": ("fp32", "grouped_mm"),
    "transformers Qwen2MoeForCausalLM + AdamW (bf16 autocast, eager experts)": ("bf16", "eager"),
    "transformers Qwen2MoeForCausalLM + AdamW (fp32, eager experts)": ("fp32", "eager"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="moe-26m")
    ap.add_argument("--dense", default="26m", help="the dense preset with the same active parameters")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    args = ap.parse_args()

    cfg, dense = model_config_from(args.preset), model_config_from(args.dense)
    tokens = args.batch * args.seq
    moe_name = f"zhllm {args.preset} recipe (precision auto, compiled layers)"
    dense_name = f"zhllm {args.dense} (dense, same active parameters) recipe"
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp) / "shards", cfg.vocab_size, tokens * (args.steps + 2) * args.rounds * 4)
        runs = {name: zhllm_trainer(preset, args.seq, args.batch, shards, Path(tmp) / preset, precision="auto",
                                    bf16_weights=True, compile=True)
                for name, preset in ((moe_name, args.preset), (dense_name, args.dense))}
        baselines = {name: HFProcess(args.preset, args.seq, args.batch, cfg.vocab_size, False, precision, False,
                                     experts)
                     for name, (precision, experts) in HF_VARIANTS.items()}
        times = {name: [] for name in [*runs, *baselines]}
        for tr in runs.values():
            time_zhllm(tr, 2)  # warm up: kernel choice and compilation
        for _ in range(args.rounds):
            for name, tr in runs.items():
                times[name].append(time_zhllm(tr, args.steps)[0])
            for name, hf in baselines.items():
                times[name].append(hf.run(args.steps)[0])
        for hf in baselines.values():
            hf.close()
        precision = runs[moe_name].cfg.train.precision
    reference = min(HF_VARIANTS, key=lambda name: statistics.median(times[name]))
    base = statistics.median(times[reference])
    print(f"\n{args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_params(active=True) / 1e6:.1f}M active "
          f"({cfg.moe.n_experts} experts, top {cfg.moe.top_k}, shared expert {cfg.moe.shared_expert_ffn_dim}); "
          f"{args.dense}: {dense.num_params() / 1e6:.1f}M. seq {args.seq}, micro-batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; zhllm's precision auto chose {precision}; "
          f"{flops_per_token(cfg, args.seq) / 1e6:.1f} MFLOP/token (active) for both presets.\n")
    print(f"Reference (1.00x): the fastest transformers setting here, {reference}. "
          "'Paired' is the median, and range, of the ratios within each round.\n")
    print("| run | s/step | tokens/s | vs reference | paired |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        paired = [h / z for h, z in zip(times[reference], ts)]
        print(f"| {name} | {s:.3f} | {tokens / s:.0f} | {base / s:.2f}x "
              f"| {statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) |")
    moe, dense_s = statistics.median(times[moe_name]), statistics.median(times[dense_name])
    print(f"\nzhllm MoE step / zhllm dense step at the same active parameters: {moe / dense_s:.2f}x the time")


if __name__ == "__main__":
    main()
