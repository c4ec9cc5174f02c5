"""THE training loop, shared by every stage (rule 2): an objective, a dataset, a model and a stage config.

Data order is a pure function of one global integer, `data_position` (windows consumed across all ranks):
on micro-step m, rank r of world w with micro-batch b reads windows [p + (m*w + r)*b, ... + b). Resuming
with a different number of processes, or with a different split between processes and accumulation, reads
the same windows in the same steps, so resumed runs reproduce uninterrupted ones.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ..device import to_device
from ..errors import ZhllmError
from ..eval.loss import evaluate_loss
from ..model.moe import record_router_logits, router_loss_terms
from . import parallel as par
from .config import StageConfig
from .cpu_memory import keep_freed_memory
from .evaluate import greedy_samples
from .master import MasterWeights
from .metrics import MFU, MetricsLogger, flops_per_token, memory_gb, plot_run, train_line
from .objectives import Objective
from .optim import build_optimizer, lr_at, parameter_groups, set_lr, split_muon_groups
from .precision import resolve_precision
from .state import (TrainerState, capture_rng, load_optimizer_state, load_trainer_state, restore_rng,
                    save_checkpoint_atomic)
from .trackers import open_trackers

FAIL_AT_STEP_ENV = "ZHLLM_FAIL_AT_STEP"  # test hook: os._exit(1) right after this step


class NonFiniteError(ZhllmError):
    pass


class Trainer:
    def __init__(self, cfg: StageConfig, objective: Objective, model: torch.nn.Module, train_data, val_data=None,
                 tokenizer_dir: str | Path | None = None, resume_dir: Path | None = None,
                 dist: par.Dist | None = None, echo=print,
                 export_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 checkpoint_extra: Callable[[torch.nn.Module, Path], None] | None = None):
        """export_model: the plain model a checkpoint saves as its HF directory (e.g. LoRA merged into the
        base); checkpoint_extra(model, staging_dir): writes more files into a checkpoint before it is sealed."""
        self.cfg, self.objective, self.train_data, self.val_data = cfg, objective, train_data, val_data
        self.tokenizer_dir = tokenizer_dir
        self.export_model, self.checkpoint_extra = export_model, checkpoint_extra
        self.d = dist or par.init_distributed(cfg.train.device)
        if self.d.device.type == "cpu":
            keep_freed_memory()  # page faults on freshly mapped buffers cost ~10% of a CPU step
        self.echo = echo if self.d.is_main else (lambda *_: None)
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        resumed = load_trainer_state(resume_dir) if resume_dir is not None else None
        t = self._concrete_precision(cfg.train, resumed)
        self.cfg = cfg = dataclasses.replace(cfg, train=t)
        self.model = model.to(self.d.device)  # fp32 master weights; bf16 comes from autocast / FSDP policy
        self.model.train()
        self.master = MasterWeights(self.model) if t.bf16_weights else None
        self.wrapped = par.parallelize(self.model, t, self.d)
        if t.compile and hasattr(objective, "cross_entropy_sum"):
            from .objectives import compiled_cross_entropy_sum
            objective.cross_entropy_sum = compiled_cross_entropy_sum()
        self.fsdp = par.is_fsdp(self.wrapped) and self.d.enabled
        self.optimizer = self._build_optimizer()
        self.autocast = self._autocast()
        self.scaler = torch.amp.GradScaler(self.d.device.type) if t.precision == "fp16" else None
        self.state = TrainerState(precision=t.precision, optimizer=t.optimizer)
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * self.d.world
        self.max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.max_tokens / self.tokens_per_step)
        self.stop_requested = False
        self.consecutive_nonfinite = 0
        if resume_dir is not None:
            self._resume(resume_dir, resumed)
        if hasattr(objective, "prepare"):
            # once the model is placed, parallelised and resumed: e.g. DPO computes or loads its reference here
            objective.prepare(self)

    # ---- setup ----
    def _concrete_precision(self, t, resumed: TrainerState | None):
        """train with `precision: auto` resolved (train/precision.py); bf16_weights only applies to bf16."""
        precision = resolve_precision(t.precision, self.d, resumed.precision if resumed else None, self.echo)
        if t.bf16_weights and precision != "bf16":
            self.echo(f"training in {precision}: train.bf16_weights (for bf16) does not apply")
        return dataclasses.replace(t, precision=precision, bf16_weights=t.bf16_weights and precision == "bf16")

    def _build_optimizer(self):
        t = self.cfg.train
        groups = parameter_groups(self.model, t.weight_decay)
        if self.master is not None:
            groups = self.master.groups_for(groups)
        if t.optimizer == "muon":
            held = (lambda p: self.master.by_model_id[id(p)]) if self.master is not None else (lambda p: p)
            groups = split_muon_groups(self.model, groups, params_of=held)
        if t.zero1 and self.d.enabled and t.parallel == "ddp":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=t.lr,
                                           betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)
        return build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), groups=groups,
                               kind=t.optimizer)

    def _positional_names(self) -> list[str] | None:
        """The optimizer's parameters' names in its group order where its state is keyed by position: it holds
        bf16 masters (copies of the model's parameters) or is ZeRO. None: torch's name-keyed state dict."""
        from torch.distributed.optim import ZeroRedundancyOptimizer
        if self.master is None and not isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return None
        pairs = zip(self.master.names, self.master.master) if self.master is not None else self.model.named_parameters()
        names = {id(p): n for n, p in pairs}
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        t = self.cfg.train
        if t.precision == "fp32" or t.bf16_weights or (self.fsdp and t.precision == "bf16"):
            return nullcontext()  # FSDP's MixedPrecisionPolicy already computes in bf16
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
        return torch.autocast(self.d.device.type, dtype=dtype)

    def _resume(self, ckpt: Path, state: TrainerState) -> None:
        t = self.cfg.train
        if state.optimizer is not None and state.optimizer != t.optimizer:
            raise ZhllmError(f"{ckpt}: the run was trained with train.optimizer={state.optimizer}, the recipe now "
                             f"asks for {t.optimizer}; resume with {state.optimizer}, or start a new run from this "
                             "checkpoint's weights (model.init_from) to switch")
        self.state = state
        optim_sd = load_optimizer_state(ckpt)
        try:
            par.load_optimizer_full(self.wrapped, self.optimizer, optim_sd, positional=self._positional_names())
        except (KeyError, ValueError, RuntimeError) as e:  # a state saved under other optimizer settings
            raise ZhllmError(f"{ckpt}: its optimizer state does not fit this run's optimizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else e!r}); resume with the settings it was saved "
                             "with (train.optimizer, train.bf16_weights, train.zero1)") from None
        restore_rng(self.state.rng)
        self.state.precision, self.state.optimizer = t.precision, t.optimizer
        self.echo(f"resumed from {ckpt} at step {self.state.step} (data position {self.state.data_position})")

    # ---- one optimizer step ----
    def _micro_batches(self) -> list[torch.Tensor]:
        b, w, r = self.cfg.train.batch_size, self.d.world, self.d.rank
        p = self.state.data_position
        return [self.train_data.batch(p + (m * w + r) * b, b) for m in range(self.cfg.train.grad_accum)]

    def train_step(self) -> dict:
        t = self.cfg.train
        t0 = time.perf_counter()
        batches = [to_device(x, self.d.device) for x in self._micro_batches()]
        t_data = time.perf_counter() - t0
        # Normalise by the global number of loss units so the gradient is a true mean over the step,
        # whatever the split into ranks and micro-batches (and for masked losses of uneven length).
        local_weight = sum(self.objective.weight(x) for x in batches)
        global_weight = par.all_reduce_sum(self.d, [local_weight])[0]
        scale = self.d.world / global_weight  # DDP/FSDP average gradients over ranks
        loss_total = torch.zeros((), device=self.d.device, dtype=torch.float32)
        extra: dict[str, float] = {}  # an objective's own figures (LossOutput.metrics), sums over its units
        tokens: list[int | None] = []  # what an objective's forward computed, when its rows are not seq_len long
        for m, batch in enumerate(batches):
            with par.no_sync(self.wrapped, m == len(batches) - 1), self.autocast, record_router_logits() as routed:
                out = self.objective.loss(self.wrapped, batch)
            loss = out.loss_sum
            figures = dict(getattr(out, "metrics", {}))
            if routed:  # a mixture-of-experts model: its router losses, weighted like the objective's units
                term, moe_figures = router_loss_terms(routed)
                loss = loss + term * out.weight
                figures.update({k: v * out.weight for k, v in moe_figures.items()})
            loss = loss * scale
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += out.loss_sum.detach().float()
            tokens.append(getattr(out, "tokens", None))
            for k, v in figures.items():
                extra[k] = extra.get(k, 0.0) + v
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.master is not None:
            self.master.grads_to_master()
        params = self.master.master if self.master is not None else self.model.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        counted = None not in tokens
        sums = par.all_reduce_sum(self.d, [float(loss_total), float(sum(tokens)) if counted else 0.0, *extra.values()])
        loss_value = sums[0] / global_weight
        step_tokens = int(sums[1]) if counted else self.tokens_per_step
        extra = {k: v / global_weight for k, v in zip(extra, sums[2:])}
        grad_norm = float(grad_norm)
        lr = lr_at(self.state.step, lr=t.lr, total_steps=self.max_steps, warmup_steps=t.warmup_steps,
                   schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        finite = math.isfinite(loss_value) and (math.isfinite(grad_norm) or self.scaler is not None)
        if finite:
            set_lr(self.optimizer, lr)
            if self.scaler:
                self.scaler.step(self.optimizer)  # skips the update itself on inf/nan fp16 gradients
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.master is not None:
                self.master.master_to_model()
            self.consecutive_nonfinite = 0
        else:
            self.state.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self.echo(f"step {self.state.step + 1}: non-finite loss {loss_value} / grad norm {grad_norm}, step skipped "
                      f"({self.consecutive_nonfinite} in a row)")
        self.optimizer.zero_grad(set_to_none=True)
        if self.consecutive_nonfinite >= t.max_nonfinite:
            raise NonFiniteError(f"{self.consecutive_nonfinite} non-finite steps in a row at step "
                                 f"{self.state.step + 1} (loss or gradients are inf/nan); "
                                 "lower train.lr, raise train.warmup_steps or use bf16/fp32")
        self.state.step += 1
        self.state.data_position += t.grad_accum * self.d.world * t.batch_size
        self.state.tokens_seen += step_tokens
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "data_s": t_data, "tokens": step_tokens,
                "step_s": time.perf_counter() - t0, "finite": finite, "metrics": extra}

    # ---- periodic work ----
    def evaluate(self) -> dict:
        ev = self.cfg.eval
        result = {}
        if self.val_data is not None:
            result = evaluate_loss(self.wrapped, self.objective, self.val_data, self.cfg.train.batch_size,
                                   ev.batches, device=self.d.device, autocast=self.autocast, rank=self.d.rank,
                                   world=self.d.world, reduce=lambda sums: par.all_reduce_sum(self.d, sums))
            self.state.val_loss = result["val_loss"]
            if self.state.best_val_loss is None or result["val_loss"] < self.state.best_val_loss:
                self.state.best_val_loss = result["val_loss"]
        if ev.prompts and self.tokenizer_dir is not None:
            from ..tokenizer.load import load_tokenizer
            result["samples"] = greedy_samples(self.model, load_tokenizer(self.tokenizer_dir), ev.prompts,
                                               ev.max_new_tokens, self.autocast)
        if self.fsdp:
            par.reshard(self.model)
        return result

    def save_checkpoint(self) -> Path | None:
        """Collective: gathers full state on every rank, rank 0 writes, all wait at a barrier.

        Non-finite weights raise NonFiniteError on every rank and nothing is written: the ranks agree on that
        before any gather, so none is left waiting in a collective the others have abandoned."""
        if par.broadcast_flag(self.d, not self._weights_finite()):
            raise NonFiniteError(f"step {self.state.step}: the weights are not finite (inf/nan), checkpoint NOT "
                                 "written; the last checkpoint is intact. Lower train.lr, raise train.warmup_steps "
                                 "or use bf16/fp32")
        optim_sd = par.full_optimizer_state(self.wrapped, self.optimizer, self.d,
                                             positional=self._positional_names())
        model_sd = par.full_model_state(self.wrapped) if self.fsdp else \
            self.master.state_dict() if self.master is not None else None
        files = self.objective.checkpoint_files(self.d) if hasattr(self.objective, "checkpoint_files") else {}
        path = None
        if self.d.is_main:
            # the whole model as one module (shards gathered, fp32 masters in), then what the stage exports of it
            full = self.model if model_sd is None else par.module_from_state(self.model, model_sd)
            source = self.export_model(full) if self.export_model is not None else full
            self.state.rng = capture_rng()
            extra = (lambda staging: self._write_extra(full, staging, files)) \
                if self.checkpoint_extra or files else None
            path = save_checkpoint_atomic(self.ckpt_root, self.state, source, optim_sd, self.tokenizer_dir,
                                          self.cfg.checkpoint.keep, extra)
        par.barrier(self.d)
        return path

    def _write_extra(self, model: torch.nn.Module, staging: Path, files: dict[str, bytes]) -> None:
        """The stage's files (e.g. a LoRA adapter, from the whole `model`) and the objective's (e.g. GRPO's
        pending rollouts, gathered from every rank)."""
        if self.checkpoint_extra:
            self.checkpoint_extra(model, staging)
        for name, data in files.items():
            (staging / name).write_bytes(data)

    def _weights_finite(self) -> bool:
        """This rank's weights (its shards under FSDP; the fp32 masters too when they exist) are all finite."""
        tensors = list(self.model.parameters()) + (list(self.master.master) if self.master is not None else [])
        return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in tensors)

    # ---- the loop ----
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        logger = MetricsLogger(self.run_dir, open_trackers(cfg.log, self.run_dir, dataclasses.asdict(cfg), st.step),
                               self.echo, start_step=st.step) if self.d.is_main else None
        fpt = flops_per_token(self.model.config, cfg.train.seq_len)
        mfu = MFU(self.d.device, cfg.train.precision, self.d.world) if self.d.is_main else None
        fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress(cfg.log.progress and self.d.is_main, self.max_steps, st.step)
        if bar is not None:
            logger.echo = bar.write
        window = _new_window()
        warming_up = True  # the first window holds kernel selection and compilation: no ETA from it
        saved_at = st.step if st.step else None
        t_start = time.perf_counter()
        try:
            while st.step < self.max_steps:
                r = self.train_step()
                window["tokens"] += r["tokens"]
                window["ran"] += 1
                window["time"] += r["step_s"]
                window["data"] += r["data_s"]
                if r["finite"]:
                    window["loss"] += r["loss"]
                    window["steps"] += 1
                    for k, v in r["metrics"].items():
                        window["metrics"][k] = window["metrics"].get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.3f}")
                if logger and (st.step % cfg.log.every == 0 or st.step == 1 or st.step == self.max_steps):
                    tps = window["tokens"] / max(window["time"], 1e-9)
                    rec = {"kind": "train", "step": st.step, "max_steps": self.max_steps,
                           "loss": window["loss"] / max(window["steps"], 1),
                           "lr": r["lr"], "grad_norm": r["grad_norm"], "tokens_per_s": tps,
                           "mfu": mfu(tps * fpt),
                           "data_share": window["data"] / max(window["time"], 1e-9),
                           "memory_gb": memory_gb(self.d.device), "tokens_seen": st.tokens_seen,
                           "skipped_steps": st.skipped_steps,
                           "step_s": window["time"] / window["ran"],
                           "eta_s": None if warming_up else (self.max_steps - st.step) * window["time"] / window["ran"]}
                    rec.update({k: v / max(window["steps"], 1) for k, v in window["metrics"].items()})
                    logger.log(rec, train_line(rec))
                    warming_up = False
                    window = _new_window()
                last = st.step == self.max_steps
                if cfg.eval.every and (st.step % cfg.eval.every == 0 or last):
                    ev = self.evaluate()
                    if logger and ev:
                        logger.log({"kind": "eval", "step": st.step, **ev}, _eval_line(st.step, ev))
                stop = par.broadcast_flag(self.d, self.stop_requested)
                if (cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0) or last or stop:
                    self.save_checkpoint()
                    saved_at = st.step
                if fail_at and st.step == fail_at:
                    os._exit(1)
                if stop:
                    self.echo(f"stop requested: checkpoint saved at step {st.step}; resume with --resume auto")
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if logger:
                logger.close()
        if self.d.is_main and cfg.log.plots:
            try:
                plot_run(self.run_dir)
            except ZhllmError:
                pass
        return {"step": st.step, "max_steps": self.max_steps, "tokens_seen": st.tokens_seen,
                "val_loss": st.val_loss, "best_val_loss": st.best_val_loss, "skipped_steps": st.skipped_steps,
                "seconds": time.perf_counter() - t_start, "last_checkpoint_step": saved_at,
                "stopped_early": st.step < self.max_steps}

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.stop_requested = True
        self.echo(f"received {signal.Signals(signum).name}: saving a checkpoint after this step")


def _new_window() -> dict:
    """What the loop sums between two log lines ("steps" counts the finite steps, "ran" all of them)."""
    return {"tokens": 0, "time": 0.0, "data": 0.0, "loss": 0.0, "steps": 0, "ran": 0, "metrics": {}}


def _eval_line(step: int, ev: dict) -> str:
    parts = [f"eval step {step}"]
    if "val_loss" in ev:
        parts.append(f"val_loss {ev['val_loss']:.4f}" + (f" ppl {ev['val_ppl']:.2f}" if "val_ppl" in ev else ""))
    if "val_bpb" in ev:
        parts.append(f"bpb {ev['val_bpb']:.4f}")
    parts += [f"{k.removeprefix('val_')} {v:.4f}" for k, v in ev.items()
              if k.startswith("val_") and ("/" in k or k in ("val_kl", "val_ce"))]
    lines = [" ".join(parts)] + [f"  sample: {s}" for s in ev.get("samples", [])]
    return "\n".join(lines)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False, disable=None)
