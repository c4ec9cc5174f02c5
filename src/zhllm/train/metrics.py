"""What a run reports: console lines, metrics.jsonl, TensorBoard, MFU, and PNG plots of a run directory."""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

from ..fsutil import atomic_write_text

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, by a substring of the device name.
GPU_PEAK_BF16 = {"H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L40": 181e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12, "A10": 125e12,
                 "V100": 125e12, "T4": 65e12}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters a token uses (lm_head included; the embedding lookup and
    the experts a token is not routed to not) plus the attention scores and values,
    12 x layers x heads x head_dim x seq_len (PaLM appendix B)."""
    matmul_params = cfg.num_params(include_embeddings=False, active=True) + cfg.vocab_size * cfg.dim
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def measure_matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up (oneDNN picks its kernel on first call)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Known GPU peak, or on a CPU the matmul peak measured in this process (under a second on a modern CPU).

    Not cached: a virtual machine reports the same CPU name on hosts of very different speed, and a peak
    measured while another job held a core would understate every later run's peak (seen here: 0.9 vs 2.8
    TFLOP/s on the same reported CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak / (2 if precision == "fp32" else 1)
        return None
    return cpu_matmul_peak(cpu_dtype(precision))


def cpu_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


class MFU:
    """Model FLOP utilisation of a run: achieved FLOP/s over the peak of its device(s) and precision.

    On a CPU an MFU above 100% means the peak was measured while the host was slow: it is measured again
    (the larger kept), at most `remeasures` times a run."""

    def __init__(self, device: torch.device, precision: str, world: int, remeasures: int = 3):
        self.device, self.precision, self.world, self.remeasures = device, precision, world, remeasures
        self.peak = peak_flops(device, precision)

    def __call__(self, flops_per_s: float) -> float | None:
        if not self.peak:
            return None
        if self.device.type == "cpu" and flops_per_s > self.peak * self.world and self.remeasures > 0:
            self.remeasures -= 1
            self.peak = cpu_matmul_peak(cpu_dtype(self.precision), remeasure=True)
        return flops_per_s / (self.peak * self.world)


def cpu_matmul_peak(dtype: torch.dtype, remeasure: bool = False) -> float:
    """The CPU matmul peak in FLOP/s for a dtype, measured once per process and thread count.

    remeasure: measure again and keep the larger, for when a run's MFU came out above 100%, which means the
    first measurement caught the host at a slow moment."""
    key = (dtype, torch.get_num_threads())
    if remeasure or key not in _CPU_PEAKS:
        _CPU_PEAKS[key] = max(_CPU_PEAKS.get(key, 0.0), measure_matmul_peak(dtype))
    return _CPU_PEAKS[key]


_CPU_PEAKS: dict[tuple[torch.dtype, int], float] = {}  # once per process: runs in one process share a host


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class MetricsLogger:
    """Rank 0 only: appends records to metrics.jsonl, mirrors their scalars to the enabled trackers
    (train/trackers.py: TensorBoard, wandb, SwanLab), prints lines.

    start_step: the step the run starts from (the resumed checkpoint's, 0 for a fresh run). Records after it
    were written by a run that died before its next checkpoint; those steps are about to be redone, so they
    are dropped instead of appearing twice."""

    def __init__(self, run_dir: Path, trackers: list, echo=print, start_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        _drop_records_after(self.path, start_step)
        self.echo = echo
        self.trackers = trackers
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict, line: str | None = None) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        for tracker in self.trackers:
            tracker.log(record)
        if line:
            self.echo(line)

    def close(self) -> None:
        self._fh.close()
        for tracker in self.trackers:
            tracker.close()


def _drop_records_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a crash: the next record would be glued onto it
        if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def train_line(r: dict) -> str:
    mfu = f" mfu {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
    # an objective's own figures are namespaced ("rewards/margins"); the console shows the few that say most
    extra = "".join(f" {k.split('/')[-1]} {r[k]:.3f}" for k in ("rewards/margins", "rewards/accuracy", "reward", "kl",
                                                                "moe/aux_loss") if k in r)
    return (f"step {r['step']}/{r['max_steps']} loss {r['loss']:.4f}{extra} lr {r['lr']:.2e} "
            f"gnorm {r['grad_norm']:.3f} tok/s {r['tokens_per_s']:.0f}{mfu} mem {r['memory_gb']:.2f}GB "
            f"eta {'-' if r['eta_s'] is None else format_eta(r['eta_s'])}")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Records of metrics.jsonl; for a step logged twice (a resumed run re-does steps) the last one wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        from ..errors import ZhllmError
        raise ZhllmError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    by_key = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            by_key[(r.get("kind", "train"), r["step"])] = r
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def plot_run(run_dir: str | Path) -> list[Path]:
    """plots/loss.png (train and val), plots/lr.png, plots/throughput.png from metrics.jsonl; for a preference
    run also plots/rewards.png (chosen, rejected, margin) and plots/accuracy.png (preference accuracy); for an
    RL run plots/reward.png (total and per reward function) and plots/kl.png; for a mixture-of-experts run
    plots/expert_load.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [("loss", [("train", train, "loss"), ("val", val, "val_loss")], "loss (nats/token)"),
              ("lr", [("lr", train, "lr")], "learning rate"),
              ("throughput", [("tokens/s", train, "tokens_per_s")], "tokens/s")]
    if any("rewards/margins" in r for r in train):
        panels += [("rewards", [("chosen", train, "rewards/chosen"), ("rejected", train, "rewards/rejected"),
                                ("margin", train, "rewards/margins"), ("val margin", val, "val_rewards/margins")],
                    "reward (β × log-ratio)"),
                   ("accuracy", [("train", train, "rewards/accuracy"), ("val", val, "val_rewards/accuracy")],
                    "preference accuracy")]
    if any("reward" in r for r in train):  # an RL run: the total reward and each reward function's mean
        names = sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
        panels.append(("reward", [("total", train, "reward")] + [(k.split("/")[1], train, k) for k in names],
                       "reward (mean per completion)"))
        if any("kl" in r for r in train):
            panels.append(("kl", [("kl", train, "kl")], "KL to the reference (k3, per token)"))
    written = []
    if train and any(k.startswith("expert_load/") for k in train[-1]):
        written.append(_plot_expert_load(train, out_dir / "expert_load.png", plt))
    for name, series, ylabel in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if label.startswith("val") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_expert_load(train: list[dict], path: Path, plt) -> Path:
    """A mixture-of-experts run: the last logged share of tokens per expert in each layer (a heat map), and each
    layer's busiest expert over training as a multiple of the balanced share 1/E."""
    keys = [k.split("/")[1:] for k in train[-1] if k.startswith("expert_load/")]
    layers = sorted({int(a[1:]) for a, _ in keys})
    experts = sorted({int(b[1:]) for _, b in keys})
    share = lambda r, lay, e: r.get(f"expert_load/L{lay}/E{e}", 0.0)  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    grid = [[share(train[-1], lay, e) for e in experts] for lay in layers]
    im = left.imshow(grid, aspect="auto", cmap="viridis")
    left.set_xticks(range(len(experts)), experts)
    left.set_yticks(range(len(layers)), layers)
    left.set_xlabel("expert")
    left.set_ylabel("MoE layer")
    left.set_title(f"share of tokens per expert, step {train[-1]['step']}")
    fig.colorbar(im, ax=left)
    for lay in layers:
        pts = [(r["step"], max(share(r, lay, e) for e in experts) * len(experts)) for r in train
               if f"expert_load/L{lay}/E0" in r]
        right.plot(*zip(*pts), label=f"layer {lay}")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("step")
    right.set_ylabel("busiest expert / balanced share")
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
