"""`zhllm distill`: knowledge distillation = the shared Trainer + the `Distill` objective + token shards.

A student (a fresh preset, `init_from`, or a resumed checkpoint, built as pretraining builds it) learns the
next-token distribution of a teacher (any HF Llama/Qwen2 checkpoint with the shards' tokenizer) on the same
packed windows: loss per token = alpha * T^2 * KL + (1 - alpha) * cross-entropy with the data, where KL is
forward KL(teacher_T || student_T) (mass-covering, the classic Hinton loss) or reverse KL(student_T ||
teacher_T) (mode-seeking, as in MiniLLM), both at temperature T. The T^2 keeps the KL's gradients on the
cross-entropy's scale. The teacher runs without gradients in its inference dtype (bf16 where the hardware
has it) and is never part of a checkpoint.

Black-box distillation (only the teacher's text, e.g. a hosted model) is SFT on its answers instead: generate
them with `zhllm data self-instruct` against an OpenAI-compatible endpoint (or `zhllm serve` of the teacher)
and train with `zhllm sft`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import checked
from ..errors import ConfigError, ZhllmError
from ..eval.loss import LossOutput
from .config import RunConfig
from .pretrain import build_model, open_token_data
from .run import Stage, StageRun, default_inputs, run_stage


@dataclass
class TeacherSection:
    path: str = ""                                          # an HF Llama/Qwen2/Qwen2-MoE checkpoint directory
    # auto: bf16 where the hardware has it. int8 (CPU): weight-only int8 linear layers, a quarter of fp32's memory
    # for a teacher that would not fit otherwise, but ~3x slower products than bf16.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # top_k > 0: the KL against the teacher's k most likely tokens at each position, renormalised among them
    # (forward KL only); with cache, those logits are kept on disk so the teacher runs once per training window.
    top_k: int = checked(0, ge=0)
    cache: bool = False
    cache_dir: str = ""                                     # default: teacher_topk/ in out_dir


@dataclass
class DistillSection:
    kind: Literal["forward", "reverse"] = "forward"  # KL(teacher || student), or KL(student || teacher)
    temperature: float = checked(2.0, gt=0)
    alpha: float = checked(0.5, ge=0, le=1)          # weight of the KL term; 1 - alpha: cross-entropy with the data


@dataclass
class DistillConfig(RunConfig):
    """The distillation recipe: pretraining's sections (student model, token shards), the teacher, the loss."""
    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)
    out_dir: str = checked("runs/distill", nonblank=True)

    def validate(self, source: str) -> "DistillConfig":
        t = self.teacher
        if not t.path.strip():
            raise ConfigError(f"{source}: teacher.path must name the teacher's checkpoint directory")
        if t.cache and not t.top_k:
            raise ConfigError(f"{source}: teacher.cache keeps the teacher's top-k logits; set teacher.top_k (e.g. 32)")
        if t.top_k and self.distill.kind != "forward":
            raise ConfigError(f"{source}: distill.kind {self.distill.kind} needs the teacher's whole distribution; "
                              "teacher.top_k works with kind: forward")
        return super().validate(source)


@dataclass
class DistillLossOutput(LossOutput):
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the batch's tokens


def distill_losses(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, kind: str = "forward",
                   temperature: float = 1.0, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kl, ce) summed over tokens, from (N, V) logits of both models and (N,) next tokens, in fp32."""
    s = student.float()
    s_t, t_t = F.log_softmax(s / temperature, -1), F.log_softmax(teacher.float() / temperature, -1)
    if kind == "forward":
        kl = (t_t.exp() * (t_t - s_t)).sum(-1)
    elif kind == "reverse":
        kl = (s_t.exp() * (s_t - t_t)).sum(-1)
    else:
        raise ZhllmError(f"distill kind must be forward or reverse, not {kind!r}")
    kl = kl.sum()
    ce = F.cross_entropy(s, targets, reduction="sum")
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


def topk_distill_losses(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor,
                        targets: torch.Tensor, temperature: float = 1.0,
                        alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`distill_losses` (forward KL) against the teacher's top-k only: (N, V) student logits, (N, k) teacher ids and
    logits. The teacher's distribution at temperature T is renormalised over its k tokens; the student's is its
    full softmax read at those tokens."""
    s = student.float()
    s_t = F.log_softmax(s / temperature, -1).gather(-1, teacher_ids)
    t_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    kl = (t_t.exp() * (t_t - s_t)).sum()
    ce = F.cross_entropy(s, targets, reduction="sum")
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


class Distill:
    """Next-token distillation on packed windows: `weight` is the predicted tokens, as in pretraining. Batches are
    token windows, or {"tokens", "windows"} when the teacher's top-k logits are cached (teacher_cache.py)."""

    name = "distill"
    data_nll = "ce"  # val_ppl and val_bpb: the data's cross-entropy, not the mixed loss

    def __init__(self, teacher: torch.nn.Module, vocab: int, kind: str, temperature: float, alpha: float,
                 top_k: int = 0, open_cache=None):
        self.teacher, self.vocab = teacher.eval().requires_grad_(False), vocab
        self.kind, self.temperature, self.alpha, self.top_k = kind, temperature, alpha, top_k
        self.open_cache, self.cache = open_cache, None

    def prepare(self, trainer) -> None:
        from . import parallel as par
        self.teacher.to(trainer.d.device)
        if self.open_cache is not None:  # rank 0 creates the files, the others open them
            if trainer.d.is_main:
                self.cache = self.open_cache(trainer.train_data.data)
            par.barrier(trainer.d)
            if not trainer.d.is_main:
                self.cache = self.open_cache(trainer.train_data.data)

    def weight(self, batch) -> float:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        return float(tokens.shape[0] * (tokens.shape[1] - 1))

    def loss(self, model: torch.nn.Module, batch) -> DistillLossOutput:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
        student = model(inputs)[..., :self.vocab].reshape(-1, self.vocab)
        if self.top_k:
            ids, logits = self.teacher_top_k(inputs, batch.get("windows") if isinstance(batch, dict) else None)
            total, kl, ce = topk_distill_losses(student, ids.reshape(-1, self.top_k), logits.reshape(-1, self.top_k),
                                                targets, self.temperature, self.alpha)
        else:
            with torch.no_grad():
                teacher = self.teacher(inputs)[..., :self.vocab]
            total, kl, ce = distill_losses(student, teacher.reshape(-1, self.vocab), targets, self.kind,
                                           self.temperature, self.alpha)
        return DistillLossOutput(total, self.weight(batch), {"kl": float(kl), "ce": float(ce)})

    @torch.no_grad()
    def run_teacher(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k (ids, logits rounded to fp16, as the cache keeps them: cached or not, one value)."""
        top = self.teacher(inputs)[..., :self.vocab].float().topk(self.top_k, dim=-1)
        return top.indices, top.values.half()

    def teacher_top_k(self, inputs: torch.Tensor, windows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None or windows is None:  # no cache, or validation windows
            return self.run_teacher(inputs)
        hit, ids, logits = self.cache.lookup(windows.cpu())
        miss = [i for i, h in enumerate(hit) if not h]
        if miss:
            new_ids, new_logits = self.run_teacher(inputs[miss])
            self.cache.store(windows[miss], new_ids, new_logits)
            if ids is None:
                return new_ids, new_logits
            ids[miss], logits[miss] = new_ids.cpu(), new_logits.cpu()
        return ids.to(inputs.device), logits.to(inputs.device)


def check_teacher(run: StageRun) -> None:
    """Before anything loads: the teacher exists and speaks the shards' tokenizer (same vocabulary fingerprint)."""
    from ..data.shard_dir import tokenizer_fingerprint
    from ..data.shards import ShardDirectory
    from ..tokenizer.load import load_tokenizer
    path = run.cfg.teacher.path
    if not Path(path).is_dir():
        raise ConfigError(f"{run.source}: teacher.path {path}: no such model directory")
    shards = next((p for p in run.cfg.data.path if (Path(p) / "meta.json").is_file()), None)
    if shards is None:
        return  # open_data names the missing shard directory
    theirs, ours = tokenizer_fingerprint(load_tokenizer(path)), ShardDirectory(shards).meta.get("tokenizer_sha256")
    if ours != theirs:
        raise ZhllmError(f"teacher {path} and the shards {shards} use different tokenizers (their vocabularies "
                         "differ); distillation compares next-token distributions id by id, so tokenize the "
                         "corpus with the teacher's tokenizer")


def distill_objective(run: StageRun, model: torch.nn.Module) -> Distill:
    from ..data.shards import ShardDirectory
    from ..device import resolve_device, resolve_dtype
    from ..model.io import load_model
    cfg: DistillConfig = run.cfg
    vocab = ShardDirectory(cfg.data.path[0]).vocab_size  # the tokenizer's ids; rows past them are padding
    device = resolve_device(cfg.train.device)
    if cfg.teacher.dtype == "int8":
        if device.type != "cpu":
            raise ConfigError(f"{run.source}: teacher.dtype int8 runs on a CPU; on a GPU use bfloat16")
        from ..infer.linear import quantize_linears_int8
        teacher = quantize_linears_int8(load_model(cfg.teacher.path, dtype=torch.bfloat16))
    else:
        teacher = load_model(cfg.teacher.path, dtype=resolve_dtype(cfg.teacher.dtype, device))
    if teacher.config.vocab_size < vocab:
        raise ZhllmError(f"teacher {cfg.teacher.path}: vocabulary {teacher.config.vocab_size} is smaller than the "
                         f"shards' {vocab}")
    d, t = cfg.distill, cfg.teacher
    open_cache = None
    if t.cache:
        from .teacher_cache import TeacherTopKCache, teacher_fingerprint
        where = Path(t.cache_dir) if t.cache_dir else Path(cfg.out_dir) / "teacher_topk"
        fingerprint = teacher_fingerprint(t.path)
        open_cache = lambda data: TeacherTopKCache(where, data, t.top_k, vocab, fingerprint)  # noqa: E731
    return Distill(teacher, vocab, d.kind, d.temperature, d.alpha, t.top_k, open_cache)


def open_distill_data(run: StageRun):
    """Pretraining's windows; with a teacher cache, each training batch also names its windows (the cache keys)."""
    train, val = open_token_data(run.cfg)
    if run.cfg.teacher.cache:
        from .teacher_cache import KeyedWindows
        train = KeyedWindows(train)
    return train, val


DISTILL_STAGE = Stage(
    name="distill", config=DistillConfig, objective=distill_objective, prepare=check_teacher,
    open_data=open_distill_data,
    build_model=lambda run, train: build_model(run.cfg, run.source, train.vocab_size, getattr(train, "eos_id", None),
                                               run.resume_dir),
    inputs=lambda cfg: default_inputs(cfg) + [cfg.teacher.path])


def run_distill(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Distil a teacher into a student from a recipe; returns the run summary. Works under torchrun too."""
    return run_stage(DISTILL_STAGE, config, overrides, resume)
