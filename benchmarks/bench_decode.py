"""Decode speed: zhllm's generation engine vs transformers' `generate`, same weights, same process.

The `26m` preset with random weights (vocab 6400) is saved once; zhllm (`load_model`) and transformers
(`AutoModelForCausalLM.from_pretrained`) both load that directory. Each run is greedy, a random prompt of
16 tokens, exactly `--new-tokens` new tokens per row (transformers: min_new_tokens = max_new_tokens; the
checkpoint has no eos, so nothing is banned), prefill included in the time. On a shared machine timings
jitter, so runs alternate between the two engines and the best of `--repeats` is reported.

    python benchmarks/bench_decode.py            # batch 1 and 8; fp32, bf16 and int8 weights; 256 new tokens
    python benchmarks/bench_decode.py --quick    # the same with 64 new tokens, 1 repeat
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from zhllm.infer.engine import Engine
from zhllm.infer.native import native_decode
from zhllm.model.config import model_config_from
from zhllm.model.io import load_model, new_model, save_model

# name -> (dtype of both engines, zhllm's decode quantization). int8 is weight-only: its weights are not
# identical to the checkpoint's, so transformers runs the same checkpoint in the activation dtype (bf16).
DTYPES = {"float32": (torch.float32, "none"), "bfloat16": (torch.bfloat16, "none"),
          "int8": (torch.bfloat16, "int8")}
TARGET_RATIO = 5.0


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). CPU time is the honest figure on a shared
    machine: it does not count time spent waiting for other people's processes (but does count spinning)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def zhllm_run(engine: Engine, prompts: torch.Tensor, n: int):
    rows = [c.token_ids for c in engine.generate_batch(prompts.tolist(), max_new_tokens=n).completions]
    assert all(len(r) == n for r in rows), "zhllm stopped early"
    return rows


def hf_run(model, prompts: torch.Tensor, n: int):
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompts.shape[1] + n, "transformers stopped early"
    return out[:, prompts.shape[1]:].tolist()


def measure(ours, theirs, batch: int, n: int, repeats: int, prompt_len: int) -> dict:
    vocab = ours.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    zhllm_run(ours, prompts, 4)  # warm-up: allocator, fused weights, thread pools
    hf_run(theirs, prompts, 4)
    best = {"ours": [float("inf")] * 2, "theirs": [float("inf")] * 2}
    ids = {}
    for _ in range(repeats):
        for key, run, engine in (("ours", zhllm_run, ours), ("theirs", hf_run, theirs)):
            wall, cpu, ids[key] = timed(lambda: run(engine, prompts, n))
            best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]
    same = sum(a == b for a, b in zip(ids["ours"], ids["theirs"]))
    tokens = batch * n
    return {"ours": tokens / best["ours"][0], "theirs": tokens / best["theirs"][0],
            "ours_cpu": tokens / best["ours"][1], "theirs_cpu": tokens / best["theirs"][1],
            "same_rows": f"{same}/{batch}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 new tokens, 1 repeat")
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both engines (default: torch's). On a busy machine 1 thread avoids "
                         "OpenMP threads spin-waiting for each other, which slows small-batch decoding by 10x")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new_tokens, args.repeats = 64, 1
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    cfg = model_config_from(args.preset)
    print(f"preset {args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(new_model(cfg, seed=0), Path(tmp) / "model")
        for name in args.dtypes.split(","):
            dtype, quantize = DTYPES[name]
            ours = Engine(load_model(path, dtype=dtype), quantize=quantize)  # no tokenizer: ids only
            theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
            for batch in map(int, args.batches.split(",")):
                r = measure(ours, theirs, batch, args.new_tokens, args.repeats, args.prompt_len)
                rows.append((f"decode tok/s, batch {batch}, {name}", r))
    print("\n| figure | zhllm tok/s | transformers tok/s | ratio | target | zhllm tok/CPU-s | "
          "transformers tok/CPU-s | CPU ratio | same greedy ids |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for figure, r in rows:
        ratio, cpu_ratio = r["ours"] / r["theirs"], r["ours_cpu"] / r["theirs_cpu"]
        target = (f">= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'missed'}" if "batch 1," in figure
                  else "-")
        print(f"| {figure} | {r['ours']:.1f} | {r['theirs']:.1f} | {ratio:.1f}x | {target} | {r['ours_cpu']:.1f} | "
              f"{r['theirs_cpu']:.1f} | {cpu_ratio:.1f}x | {r['same_rows']} |")
    print("\nint8 rows: zhllm with weight-only int8 matrices and bf16 activations (batch 1: the native step of "
          f"infer/native.py, {'built' if native_decode() is not None else 'NOT available, PyTorch step'}); "
          "transformers in bf16.")


if __name__ == "__main__":
    main()
