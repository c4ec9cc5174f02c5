"""Training throughput: the zhllm loop step vs transformers' LlamaForCausalLM + torch.optim.AdamW.

Same shapes (default: the 26m preset, seq 512, micro-batch 4), runs alternating so machine noise hits
both alike. zhllm runs its 26m recipe (precision auto: bf16 weights with fp32 master copies where this CPU
multiplies bf16 at least as fast as fp32, else fp32; torch.compile per layer), and the same recipe forced to
bf16 where auto chose fp32; transformers runs bf16 autocast over fp32 weights and plain fp32, each eager and
with compiled layers, every setting in a process of its own as it would run alone, and the fastest of them is
the reference the ratios use. The zhllm trainer tunes this process's malloc (train/cpu_memory.py), so a second
transformers process runs under that same setting, to show what the tuning alone is worth. Prints a
markdown table with tokens/s, MFU against the matmul peak measured here for the precision each row computes
in (bf16 and fp32 peaks both printed), and the data-loading share of the zhllm step.

    python benchmarks/bench_train.py [--preset 26m] [--steps 5] [--rounds 5] [--variants]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zhllm.config import from_dict
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model
from zhllm.train.config import RunConfig
from zhllm.train.metrics import cpu_matmul_peak, flops_per_token
from zhllm.train.objectives import CausalLM
from zhllm.train.parallel import Dist
from zhllm.train.trainer import Trainer


RECIPE = "zhllm, 26m recipe (precision auto, compiled layers)"
RECIPE_BF16 = "zhllm, 26m recipe forced to bf16 (bf16 weights + fp32 masters, compiled layers)"
HF = "transformers LlamaForCausalLM + AdamW (bf16 autocast)"
HF_VARIANTS = {  # name -> (precision, compiled layers): the reference is whichever of these is fastest here
    HF: ("bf16", False),
    "transformers LlamaForCausalLM + AdamW (fp32)": ("fp32", False),
    "transformers LlamaForCausalLM + AdamW (bf16 autocast, compiled layers)": ("bf16", True),
    "transformers LlamaForCausalLM + AdamW (fp32, compiled layers)": ("fp32", True),
}
HF_KEEP = "transformers, with zhllm's malloc setting (freed memory kept)"


def synthetic_shards(out: Path, vocab: int, tokens: int) -> Path:
    """Random documents in the real shard format, so the loop reads through PackedTokenDataset."""
    from zhllm.data.shard_dir import token_dtype, write_meta
    from zhllm.data.shards import ShardWriter, build_meta
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, n in (("train", tokens), ("val", tokens // 20)):
        lengths = rng.integers(50, 800, n // 300)
        ids = rng.integers(1, vocab, int(lengths.sum()))
        ids[np.cumsum(lengths) - 1] = 0
        with ShardWriter(out, f"{split}-00000", token_dtype(vocab), 0) as w:
            w.add_documents(ids, lengths, num_bytes=int(lengths.sum()) * 3)
            entries.append(w.close())
    write_meta(out, build_meta(vocab, 0, "synthetic", entries))
    return out


def zhllm_trainer(preset: str, seq: int, batch: int, shards: Path, run_dir: Path, **train) -> Trainer:
    cfg = from_dict(RunConfig, {
        "model": {"preset": preset}, "data": {"path": [str(shards)]},
        "train": {"max_steps": 10 ** 6, "batch_size": batch, "seq_len": seq, **train},
        "eval": {"every": 0}, "checkpoint": {"every": 0},
        "log": {"tensorboard": False, "progress": False, "plots": False}, "out_dir": str(run_dir)})
    from zhllm.data.shards import PackedTokenDataset
    data = PackedTokenDataset([str(shards)], seq, "train")
    model = new_model(model_config_from(preset, {"vocab_size": data.vocab_size}), seed=0)
    return Trainer(cfg, CausalLM(), model, data, None, dist=Dist(), echo=lambda *_: None)


def time_zhllm(tr: Trainer, steps: int) -> tuple[float, float]:
    """Seconds per step and data-loading share, over `steps` steps."""
    total = data = 0.0
    for _ in range(steps):
        r = tr.train_step()
        total += r["step_s"]
        data += r["data_s"]
    return total / steps, data / total


class HFBaseline:
    """transformers' Llama (or, for a mixture-of-experts preset, Qwen2-MoE with its load-balancing loss and the
    `experts` implementation named) with the same config, SDPA attention, torch.optim.AdamW; bf16 autocast over
    fp32 weights or plain fp32, each decoder layer compiled or eager."""

    def __init__(self, preset: str, seq: int, batch: int, vocab: int, precision: str = "bf16", compile: bool = False,
                 experts: str | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
        cfg = model_config_from(preset, {"vocab_size": vocab})
        fields = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
        torch.manual_seed(0)
        if cfg.moe is not None:
            hf = Qwen2MoeConfig(**{**fields, "output_router_logits": True})
            self.model = Qwen2MoeForCausalLM._from_config(hf, attn_implementation="sdpa",
                                                          experts_implementation=experts).train()
        else:
            self.model = LlamaForCausalLM._from_config(LlamaConfig(**fields), attn_implementation="sdpa").train()
        if compile:
            for layer in self.model.model.layers:
                layer.compile()
        self.autocast = precision == "bf16"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.gen = torch.Generator().manual_seed(0)
        self.seq, self.batch, self.vocab = seq, batch, vocab

    def step(self, batch: dict | None = None) -> float:
        """One optimizer step on `batch` (input_ids, labels, attention_mask), by default on random tokens."""
        t = time.perf_counter()
        if batch is None:
            ids = torch.randint(0, self.vocab, (self.batch, self.seq), generator=self.gen)
            batch = {"input_ids": ids, "labels": ids}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def hf_worker(conn, preset: str, seq: int, batch: int, vocab: int, keep_memory: bool, precision: str = "bf16",
              compile: bool = False, experts: str | None = None) -> None:
    """Child process: build the baseline, then for each request of n steps send back (s/step, CPU s/step)."""
    if keep_memory:
        from zhllm.train.cpu_memory import keep_freed_memory
        keep_freed_memory()
    hf = HFBaseline(preset, seq, batch, vocab, precision, compile, experts)
    hf.step()
    hf.step()  # warm up: the first calls pick oneDNN kernels (and compile)
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        c0 = time.process_time()
        wall = statistics.mean(hf.step() for _ in range(steps))
        conn.send((wall, (time.process_time() - c0) / steps))


class HFProcess:
    """The transformers baseline in a spawned process, so it keeps glibc's default malloc behaviour."""

    def __init__(self, *args):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=hf_worker, args=(child, *args), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def run(self, steps: int) -> tuple[float, float]:
        self.conn.send(steps)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def matmul_peaks(remeasure: bool = False) -> dict[str, float]:
    """{"bf16": FLOP/s, "fp32": FLOP/s}; remeasure keeps the larger of this and the earlier measurement."""
    return {p: cpu_matmul_peak(dtype, remeasure) for p, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="26m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--variants", action="store_true",
                    help="also time zhllm eager with bf16 weights, bf16 autocast, fp32, and fp32 compiled")
    args = ap.parse_args()

    matmul_peaks()  # before the runs; kept (cached) and compared with a measurement after them
    cfg = model_config_from(args.preset)
    fpt = flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp) / "shards", cfg.vocab_size, tokens * (args.steps + 2) * args.rounds * 8)
        def run(name: str, **train) -> Trainer:
            return zhllm_trainer(args.preset, args.seq, args.batch, shards, Path(tmp) / name, **train)
        runs = {RECIPE: run("a", precision="auto", bf16_weights=True, compile=True)}
        if runs[RECIPE].cfg.train.precision != "bf16":  # the figure is in bf16: time the recipe there too
            runs[RECIPE_BF16] = run("f", precision="bf16", bf16_weights=True, compile=True)
        if args.variants:
            runs["zhllm loop, bf16 weights + fp32 masters, eager"] = run("b", precision="bf16", bf16_weights=True)
            runs["zhllm loop, bf16 autocast"] = run("c", precision="bf16")
            runs["zhllm loop, fp32"] = run("d", precision="fp32")
            runs["zhllm loop, fp32, compiled layers"] = run("e", precision="fp32", compile=True)
        computes_in = {name: tr.cfg.train.precision for name, tr in runs.items()}
        baselines = {name: HFProcess(args.preset, args.seq, args.batch, cfg.vocab_size, False, precision, compiled)
                     for name, (precision, compiled) in HF_VARIANTS.items()}
        baselines[HF_KEEP] = HFProcess(args.preset, args.seq, args.batch, cfg.vocab_size, True)
        computes_in.update({name: precision for name, (precision, _) in HF_VARIANTS.items()})
        computes_in[HF_KEEP] = "bf16"
        times = {name: [] for name in [*runs, *baselines]}
        cpu = {name: [] for name in times}
        shares = []
        for tr in runs.values():  # warm up (first calls pick oneDNN kernels; compile traces here)
            time_zhllm(tr, 2)
        for _ in range(args.rounds):
            for name, tr in runs.items():
                c0 = time.process_time()
                s, share = time_zhllm(tr, args.steps)
                cpu[name].append((time.process_time() - c0) / args.steps)
                times[name].append(s)
                if name == RECIPE:
                    shares.append(share)
            for name, hf in baselines.items():
                wall, cpu_s = hf.run(args.steps)
                times[name].append(wall)
                cpu[name].append(cpu_s)
        for hf in baselines.values():
            hf.close()
    # measured again after the runs, keeping the larger: one measurement at a slow moment of a shared host gave
    # half the peak (and MFUs above 100%)
    peaks = matmul_peaks(remeasure=True)
    reference = min(HF_VARIANTS, key=lambda name: statistics.median(times[name]))  # the fastest transformers
    hf_times = times[reference]
    base = statistics.median(hf_times)
    base_cpu = statistics.median(cpu[reference])
    threads = torch.get_num_threads()
    print(f"\n{args.preset} preset, seq {args.seq}, micro-batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; matmul peak measured: bf16 {peaks['bf16'] / 1e9:.0f}, "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s; the recipe's precision auto chose {computes_in[RECIPE]}; "
          f"{fpt / 1e6:.1f} MFLOP/token\n")
    print("Wall-clock columns suffer from other processes on a shared machine; the CPU-time columns divide the\n"
          "process CPU seconds by the thread count, an estimate of the step time on an idle machine.\n")
    print("MFU is against the peak of the precision a row computes in. 'Paired' is the median, and range, of the\n"
          "ratios within each round, where both sides ran a minute apart.\n")
    print(f"Reference (1.00x): the fastest transformers setting here, {reference}.\n")
    print("| run | s/step (wall) | tokens/s (wall) | MFU (wall) | vs reference (wall) | paired (wall) "
          "| s/step (CPU/threads) | tokens/s (CPU) | MFU (CPU) | vs reference (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        s, c = statistics.median(ts), statistics.median(cpu[name]) / threads
        peak = peaks[computes_in[name]]
        paired = [h / z for h, z in zip(hf_times, ts)]
        print(f"| {name} | {s:.3f} | {tokens / s:.0f} | {tokens / s * fpt / peak * 100:.1f}% | {base / s:.2f}x "
              f"| {statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) "
              f"| {c:.3f} | {tokens / c:.0f} | {tokens / c * fpt / peak * 100:.1f}% | {base_cpu / threads / c:.2f}x |")
    keep = statistics.median(times[HF_KEEP])
    for name in (RECIPE, RECIPE_BF16):
        if name in times:
            paired = [h / z for h, z in zip(times[HF_KEEP], times[name])]
            print(f"\n{name} against transformers under the same malloc setting: "
                  f"{keep / statistics.median(times[name]):.2f}x (paired {statistics.median(paired):.2f}x, "
                  f"{min(paired):.2f}-{max(paired):.2f})", end="")
    print()
    print(f"\nzhllm data loading share of step time: {statistics.median(shares) * 100:.2f}%")


if __name__ == "__main__":
    main()
