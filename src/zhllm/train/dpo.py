"""`zhllm dpo train`: preference optimisation = the shared Trainer + the `DPO` objective + preference pairs.

Nothing here is a loop or launch code (train/run.py launches the `DPO_STAGE` record): this module types the
DPO recipe (configs/dpo/), turns preference records into train/val `PreferenceDataset`s, loads the policy as
SFT does (full or LoRA, the SFT `lora` section) and builds the objective with its reference:
`copy` (a frozen second model), `adapter` (LoRA policy with adapters off) or `precomputed` (log-probs computed
once before training into the run directory; see dpo_reference.py). All three give the same loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..config import checked
from ..errors import ConfigError, ZhllmError
from .config import EvalSection, StageConfig, TrainSection, check_continues_model, load_stage_config
from .dpo_loss import DPO, REFERENCE_FREE, adapter_reference, check_loss_settings
from .run import Stage, StageRun, run_stage
from .sft import LoraSection, load_policy, lora_checkpoint_hooks, resolve_init_from

REFERENCES = ("copy", "adapter", "precomputed")


@dataclass
class DpoDataSection:
    path: list[str] = checked(default_factory=list, nonblank=True)  # preference files, dirs or globs
    format: Literal["auto", "strings", "messages", "sharegpt"] = "auto"
    max_len: Optional[int] = checked(None, ge=2)         # longer side of a pair, in tokens; default train.seq_len
    max_prompt_len: Optional[int] = checked(None, ge=1)  # prompt tokens; earlier turns dropped to fit
    overflow: Literal["truncate", "skip"] = "truncate"
    val_fraction: float = checked(0.05, ge=0, lt=1)      # a seeded random subset of the pairs
    strict: bool = False


@dataclass
class DpoSection:
    loss: Literal["sigmoid", "label_smoothing", "robust", "hinge", "ipo", "simpo", "orpo"] = "sigmoid"
    beta: float = checked(0.1, gt=0)
    label_smoothing: float = checked(0.0, ge=0, lt=0.5)
    gamma: float = checked(0.0, ge=0)     # simpo's target margin
    rpo_alpha: float = checked(0.0, ge=0)  # weight of the NLL on chosen replies added to the loss
    reference: Literal["copy", "adapter", "precomputed"] = "precomputed"


@dataclass
class DpoConfig(StageConfig):
    """The DPO recipe: the shared sections (DPO's own defaults), preference data, the loss and its reference,
    and LoRA (the SFT recipe's section)."""
    model: dict = field(default_factory=dict)   # init_from: DIR (the SFT checkpoint)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=200, lr=5e-6, warmup_steps=10,
                                                                     weight_decay=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=100, batches=8))
    out_dir: str = checked("runs/dpo", nonblank=True)
    data: DpoDataSection = field(default_factory=DpoDataSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    # LoRA dropout off unless asked, as TRL's disable_dropout: policy and reference log-probs are then both
    # deterministic forwards of the models they name
    lora: LoraSection = field(default_factory=lambda: LoraSection(dropout=0.0))

    def validate(self, source: str) -> "DpoConfig":
        check_continues_model(self, source, "dpo", "the SFT model", "preference files")
        super().validate(source)
        d = self.dpo
        try:
            check_loss_settings(d.loss, d.beta, d.label_smoothing, d.gamma, d.rpo_alpha)
        except ZhllmError as e:
            raise ConfigError(f"{source}: {e}") from None
        if d.reference == "adapter" and not self.lora.enabled and d.loss not in REFERENCE_FREE:
            raise ConfigError(f"{source}: dpo.reference=adapter needs lora.enabled: true (the base model is the "
                              "LoRA policy with its adapters off); use copy or precomputed for full fine-tuning")
        self.lora.check(self.train, source)
        if self.data.max_len and self.data.max_len > self.train.seq_len:
            raise ConfigError(f"{source}: data.max_len={self.data.max_len} exceeds train.seq_len={self.train.seq_len}")
        if self.data.max_prompt_len and self.data.max_prompt_len >= (self.data.max_len or self.train.seq_len):
            raise ConfigError(f"{source}: data.max_prompt_len={self.data.max_prompt_len} leaves no room for a reply "
                              f"within {self.data.max_len or self.train.seq_len} tokens")
        return self


def load_dpo_config(path: str | Path, overrides: list[str] | None = None) -> tuple[DpoConfig, str]:
    return load_stage_config(DpoConfig, path, overrides, "dpo")


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random val subset (in input order), at least one pair when val_fraction > 0."""
    n_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1) if val_fraction > 0 and len(pairs) > 1 else 0
    held = set(np.random.default_rng([seed, 0x5EED]).permutation(len(pairs))[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def open_preference_data(cfg: DpoConfig, tokenizer, log=print, stage: str = "dpo"):
    """(train, val or None) PreferenceDataset of the configured files, with the skip counts logged.
    `cfg` is any recipe with a `DpoDataSection` as `data` (DPO's, the reward model's)."""
    from ..data.preference import PreferenceDataset, load_preference_pairs
    from ..model.reward import default_pad_token_id
    d, t = cfg.data, cfg.train
    pairs, stats = load_preference_pairs(tokenizer, list(d.path), d.format, max_len=d.max_len or t.seq_len,
                                         max_prompt_len=d.max_prompt_len, overflow=d.overflow, strict=d.strict)
    for line in stats.summary().splitlines():
        log(f"{stage} data: {line}")
    if not pairs:
        raise ZhllmError(f"data.path {list(d.path)}: no usable preference pair ({stats.bad.why_empty()})")
    train, val = split_pairs(pairs, d.val_fraction, t.seed)
    pad = default_pad_token_id(tokenizer)  # a reward model's config.json names the same (build_reward_model)
    log(f"{stage} data: {len(train)} training pairs, {len(val)} held out")
    return PreferenceDataset(train, seed=t.seed, pad_id=pad), \
        (PreferenceDataset(val, seed=t.seed, pad_id=pad) if val else None)


def dpo_objective(run: StageRun, model: torch.nn.Module) -> DPO:
    """The objective with the configured reference (none for the reference-free losses)."""
    from .dpo_reference import CopyReference, PrecomputedReference
    cfg: DpoConfig = run.cfg
    d = cfg.dpo
    reference = None
    if d.loss not in REFERENCE_FREE:
        if d.reference == "copy":
            from ..model.io import load_model
            reference = CopyReference(load_model(run.init_from, dtype=torch.float32))
        elif d.reference == "adapter":
            reference = adapter_reference(model)
        else:
            reference = PrecomputedReference({"init_from": str(Path(run.init_from).resolve()),
                                              "lora": cfg.lora.enabled}, lora=cfg.lora.enabled)
    return DPO(d.loss, d.beta, d.label_smoothing, d.gamma, d.rpo_alpha, reference=reference)


DPO_STAGE = Stage(
    name="dpo", config=DpoConfig, objective=dpo_objective, prepare=resolve_init_from,
    open_data=lambda run: open_preference_data(run.cfg, run.tokenizer, log=run.echo),
    build_model=lambda run, train: load_policy(run),
    checkpoint_hooks=lambda run: lora_checkpoint_hooks(run.init_from) if run.cfg.lora.enabled else (None, None))


def run_dpo(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Train from a DPO recipe; returns the run summary. Works under torchrun like pretraining and SFT."""
    return run_stage(DPO_STAGE, config, overrides, resume)
