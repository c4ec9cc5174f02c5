"""`zhllm grpo`: Group Relative Policy Optimization = the shared Trainer + the `GRPO` objective + prompts.

Nothing here is a loop or launch code (train/run.py launches `GRPO_STAGE`): this module types the recipe
(configs/grpo/), opens the prompts (grpo_data.py) with the configured rewards (align/rewards.py), loads the
policy as SFT and DPO do (full or LoRA, the SFT `lora` section) and builds the objective (grpo_rollout.py)
with its reference: a frozen copy, or with LoRA the policy with its adapters off; none when beta is 0.
`train.batch_size` counts prompts per micro-batch; each brings `grpo.num_generations` completions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..align.rewards import RewardSpec, build_rewards
from ..config import checked
from ..errors import ConfigError, ZhllmError
from .config import EvalSection, StageConfig, TrainSection, check_continues_model, load_stage_config
from .grpo_loss import check_loss_settings
from .run import Stage, StageRun, run_stage
from .sft import LoraSection, load_policy, lora_checkpoint_hooks, resolve_init_from


@dataclass
class GrpoDataSection:
    path: list[str] = checked(default_factory=list, nonblank=True)  # prompt files, dirs or globs
    chat: bool = True                      # render string prompts with the chat template (false: plain text)
    max_prompt_len: Optional[int] = checked(None, ge=1)  # longer prompts are skipped; default seq_len - max_new_tokens
    strict: bool = False


@dataclass
class GrpoSection:
    num_generations: int = checked(8, ge=2)    # G completions per prompt, normalised as a group
    max_new_tokens: int = checked(64, ge=1)
    temperature: float = checked(1.0, gt=0)
    top_p: float = checked(1.0, gt=0, le=1)
    top_k: int = checked(0, ge=0)
    stop_strings: list[str] = checked(default_factory=list, nonempty=True)
    ppo_epochs: int = checked(1, ge=1)         # optimizer steps on each rollout batch
    loss_type: Literal["grpo", "dr_grpo", "bnpo"] = "grpo"
    scale_rewards: bool = True                 # divide advantages by the group's std (Dr. GRPO: false)
    epsilon_low: float = checked(0.2, ge=0, lt=1)
    epsilon_high: float = checked(0.2, ge=0)   # DAPO's clip-higher: e.g. 0.28
    beta: float = checked(0.0, ge=0)           # KL weight; 0 = no reference pass at all
    # DAPO's dynamic sampling: up to this many more rounds of prompts per micro-batch, keeping only groups whose
    # rewards differ (the others have advantage 0) until the batch is full; 0 = off
    dynamic_sampling: int = checked(0, ge=0)
    reference: Literal["auto", "copy", "adapter"] = "auto"  # auto: adapter with LoRA, else copy
    # dtype the completions are sampled in: auto = inference's default (bf16 on GPUs and on CPUs with native bf16),
    # from a copy of the policy's weights made per rollout (a plain model; LoRA/FSDP sample in their own). The
    # loss's log-probs always come from the training forward.
    rollout_dtype: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class GrpoConfig(StageConfig):
    """The GRPO recipe: the shared sections (GRPO's own defaults), prompts, rewards, the algorithm, LoRA."""
    model: dict = field(default_factory=dict)   # init_from: DIR (an SFT checkpoint)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=200, batch_size=4, lr=1e-6,
                                                                     warmup_steps=0, schedule="constant",
                                                                     weight_decay=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=0))
    out_dir: str = checked("runs/grpo", nonblank=True)
    data: GrpoDataSection = field(default_factory=GrpoDataSection)
    rewards: list[RewardSpec] = field(default_factory=list)
    grpo: GrpoSection = field(default_factory=GrpoSection)
    # LoRA dropout off unless asked, as TRL's disable_dropout: the update then scores the policy that sampled
    # (a demo LoRA step also took 4.7 s with dropout 0.05, 3.0 s without)
    lora: LoraSection = field(default_factory=lambda: LoraSection(dropout=0.0))

    def validate(self, source: str) -> "GrpoConfig":
        check_continues_model(self, source, "grpo", "the SFT model", "prompt files")
        if not self.rewards:
            raise ConfigError(f"{source}: `rewards` is empty; add at least one, e.g. [{{type: exact}}]")
        super().validate(source)
        g = self.grpo
        try:
            check_loss_settings(g.loss_type, g.epsilon_low, g.epsilon_high, g.beta)
        except ZhllmError as e:
            raise ConfigError(f"{source}: {e}") from None
        if g.reference == "adapter" and not self.lora.enabled and g.beta > 0:
            raise ConfigError(f"{source}: grpo.reference=adapter needs lora.enabled: true (the reference is the "
                              "LoRA policy with its adapters off); use copy for full fine-tuning")
        self.lora.check(self.train, source)
        if g.max_new_tokens >= self.train.seq_len:
            raise ConfigError(f"{source}: grpo.max_new_tokens={g.max_new_tokens} leaves no room for a prompt "
                              f"within train.seq_len={self.train.seq_len}")
        if self.data.max_prompt_len and self.data.max_prompt_len + g.max_new_tokens > self.train.seq_len:
            raise ConfigError(f"{source}: data.max_prompt_len + grpo.max_new_tokens exceeds train.seq_len="
                              f"{self.train.seq_len}")
        return self


def load_grpo_config(path: str | Path, overrides: list[str] | None = None) -> tuple[GrpoConfig, str]:
    return load_stage_config(GrpoConfig, path, overrides, "grpo")


def prepare_grpo(run: StageRun) -> None:
    """The base model and tokenizer, and the rewards (a broken user function fails before any model loads)."""
    resolve_init_from(run)
    build_rewards(run.cfg.rewards, run.source)


def open_prompts(run: StageRun):
    """(train PromptDataset, None): the prompts with the skip counts logged."""
    from .grpo_data import PromptDataset, load_prompts
    cfg = run.cfg
    d, t = cfg.data, cfg.train
    stage = "grpo" if hasattr(cfg, "grpo") else "ppo"  # PPO (train/ppo.py) reads its prompts the same way
    g = getattr(cfg, stage)
    rewards = build_rewards(cfg.rewards, run.source)
    records, stats = load_prompts(run.tokenizer, list(d.path), rewards, chat=d.chat, strict=d.strict,
                                  max_prompt_len=d.max_prompt_len or t.seq_len - g.max_new_tokens)
    for line in stats.summary().splitlines():
        run.echo(f"{stage} data: {line}")
    if not records:
        raise ZhllmError(f"data.path {list(d.path)}: no usable prompt ({stats.why_empty()})")
    world = run.dist.world if run.dist is not None else 1
    run.echo(f"{stage} data: {len(records)} prompts, {g.num_generations} completions each")
    return PromptDataset(records, rewards, seed=t.seed, ppo_epochs=g.ppo_epochs,
                         prompts_per_step=t.batch_size * t.grad_accum * world), None


def grpo_objective(run: StageRun, model: torch.nn.Module):
    from .grpo_rollout import GRPO, CopyReference, Sampling, adapter_reference
    cfg: GrpoConfig = run.cfg
    g = cfg.grpo
    reference = None
    if g.beta > 0:
        if g.reference == "adapter" or (g.reference == "auto" and cfg.lora.enabled):
            reference = adapter_reference
        else:
            from ..model.io import load_model
            reference = CopyReference(load_model(run.init_from, dtype=torch.float32))
    sampling = Sampling(g.num_generations, g.max_new_tokens, g.temperature, g.top_p, g.top_k, list(g.stop_strings),
                        g.rollout_dtype)
    return GRPO(sampling, loss_type=g.loss_type, scale_rewards=g.scale_rewards, epsilon_low=g.epsilon_low,
                epsilon_high=g.epsilon_high, beta=g.beta, ppo_epochs=g.ppo_epochs, seed=cfg.train.seed,
                grad_accum=cfg.train.grad_accum, reference=reference, tokenizer=run.tokenizer,
                resume_dir=run.resume_dir, width_multiple=64 if cfg.train.compile else 1,
                dynamic_sampling=g.dynamic_sampling)


GRPO_STAGE = Stage(
    name="grpo", config=GrpoConfig, objective=grpo_objective, prepare=prepare_grpo, open_data=open_prompts,
    build_model=lambda run, train: load_policy(run),
    checkpoint_hooks=lambda run: lora_checkpoint_hooks(run.init_from) if run.cfg.lora.enabled else (None, None))


def run_grpo(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Train from a GRPO recipe; returns the run summary."""
    return run_stage(GRPO_STAGE, config, overrides, resume)
