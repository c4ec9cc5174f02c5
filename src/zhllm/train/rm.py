"""`zhllm rm`: a reward model = the shared Trainer + the Bradley–Terry objective + preference pairs.

The model is model/reward.py's `RewardModel` (the decoder and a scalar head on each sequence's last token),
started from a causal LM (an SFT checkpoint: its backbone, a new head) and saved as transformers'
`*ForSequenceClassification`. The pairs are DPO's (the same formats, rendering, truncation and held-out split);
the loss is -log sigmoid(r_chosen - r_rejected - margin) (margin: the pair's own `margin` field where it has one,
else `rm.margin`), plus `center_coef` * (r_chosen + r_rejected)^2
(keeps the scores near zero; TRL's `center_rewards_coefficient`). Held-out pair accuracy is its eval metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import checked
from ..errors import ConfigError
from ..eval.loss import LossOutput
from .config import EvalSection, StageConfig, TrainSection, check_continues_model, load_stage_config
from .dpo import DpoDataSection, open_preference_data
from .run import Stage, StageRun, run_stage
from .sft import LoraSection, load_policy, lora_checkpoint_hooks, resolve_init_from

HEAD = ("score",)  # what trains whole beside a LoRA adapter: the reward model's new head


@dataclass
class RmSection:
    margin: float = checked(0.0, ge=0)       # r_chosen must beat r_rejected by this much (pairs without a `margin`)
    center_coef: float = checked(0.0, ge=0)  # weight of (r_chosen + r_rejected)^2


@dataclass
class RmConfig(StageConfig):
    """The reward-model recipe: the shared sections (its own defaults), preference data, the loss."""
    model: dict = field(default_factory=dict)   # init_from: DIR (an SFT checkpoint, or a reward model)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=200, lr=1e-5, warmup_steps=10,
                                                                     weight_decay=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=100, batches=8))
    out_dir: str = checked("runs/rm", nonblank=True)
    data: DpoDataSection = field(default_factory=DpoDataSection)
    rm: RmSection = field(default_factory=RmSection)
    # a LoRA on the backbone; the new score head trains whole beside it (saved with the adapter)
    lora: LoraSection = field(default_factory=LoraSection)

    def validate(self, source: str) -> "RmConfig":
        check_continues_model(self, source, "rm", "an SFT model or a reward model", "preference files")
        if self.eval.prompts:
            raise ConfigError(f"{source}: eval.prompts samples text; a reward model has no vocabulary head")
        super().validate(source)
        self.lora.check(self.train, source)
        if self.data.max_len and self.data.max_len > self.train.seq_len:
            raise ConfigError(f"{source}: data.max_len={self.data.max_len} exceeds train.seq_len={self.train.seq_len}")
        return self


def load_rm_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RmConfig, str]:
    return load_stage_config(RmConfig, path, overrides, "rm")


@dataclass
class RmLossOutput(LossOutput):
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the batch's pairs


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair losses: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (margin: a number or
    per pair)."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    return losses + center_coef * (chosen + rejected) ** 2 if center_coef else losses


class BradleyTerry:
    """The reward-model objective: `weight` is the number of pairs; one forward scores chosen and rejected rows."""

    name = "rm"
    data_nll = None  # a Bradley-Terry loss has no perplexity

    def __init__(self, margin: float = 0.0, center_coef: float = 0.0):
        self.margin, self.center_coef = margin, center_coef

    def weight(self, batch: dict) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def loss(self, model: torch.nn.Module, batch: dict) -> RmLossOutput:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        margin = self.margin
        if "margin" in batch:  # the pairs' own margins; NaN marks a pair without one
            margin = torch.nan_to_num(batch["margin"].to(chosen.dtype), nan=self.margin)
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_coef)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": float(c.sum()), "rewards/rejected": float(r.sum()),
                   "rewards/margins": float((c - r).sum()), "rewards/accuracy": float((c > r).float().sum())}
        return RmLossOutput(losses.sum(), float(b), metrics, tokens=batch["input_ids"].numel())


def build_reward_model(run: StageRun, train) -> torch.nn.Module:
    from ..model.reward import default_pad_token_id, load_reward_model
    cfg = run.cfg
    # with LoRA: the base's backbone and a new head (a resume loads the adapter and the head from adapter/)
    model = load_policy(run, load=lambda path: load_reward_model(path, train=True, seed=cfg.train.seed))
    if cfg.lora.enabled:
        for name in HEAD:
            model.get_submodule(name).requires_grad_(True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = default_pad_token_id(run.tokenizer)  # what open_preference_data pads with
    return model


RM_STAGE = Stage(
    name="rm", config=RmConfig, prepare=resolve_init_from, build_model=build_reward_model,
    objective=lambda run, model: BradleyTerry(run.cfg.rm.margin, run.cfg.rm.center_coef),
    open_data=lambda run: open_preference_data(run.cfg, run.tokenizer, log=run.echo, stage="rm"),
    checkpoint_hooks=lambda run: lora_checkpoint_hooks(run.init_from, HEAD) if run.cfg.lora.enabled else (None, None))


def run_rm(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Train a reward model from a recipe; returns the run summary. Works under torchrun like the other stages."""
    return run_stage(RM_STAGE, config, overrides, resume)
