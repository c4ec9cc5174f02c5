"""`zhllm ppo`: PPO with a learned value model = the shared Trainer + the `PPO` objective + GRPO's prompts.

The trained module is `PolicyAndValue`: the policy (a causal LM) and a value model (model/reward.py's
`RewardModel`: a copy of the policy's backbone, or a reward model's, with a scalar head), trained together
by one optimizer. A checkpoint saves the policy as the HF model directory and the value model under
`value/`, so the run resumes exactly and the policy loads anywhere. With `lora.enabled` the policy trains a LoRA
adapter (the checkpoint's model is then merged, the adapter under `adapter/`, as SFT's) and the KL reference is the
policy with its adapters off; the value model still trains whole. Rollouts reuse GRPO's machinery
(grpo_rollout.py: sampling through the engine, rewards, the pending rollout in the checkpoint); the loss is
ppo_loss.py's: per-token KL penalty to a frozen reference in the reward, GAE, whitened advantages, clipped
policy and value losses, an entropy bonus, and a fixed or adaptive KL coefficient. Under FSDP both models' layers
are sharded under one root: the reference runs through that root, rollouts decode from the gathered policy, and a
checkpoint rebuilds the pair from the gathered state (`PolicyAndValue.empty_like`), as it does from bf16 weights'
fp32 masters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from ..align.rewards import RewardSpec
from ..config import checked
from ..errors import ConfigError, ZhllmError
from .config import EvalSection, StageConfig, TrainSection, check_continues_model, load_stage_config
from .grpo import GrpoDataSection, open_prompts, prepare_grpo
from .grpo_rollout import (GRPO, CopyReference, GrpoOutput, Rollout, Sampling, _reward_metrics, _training_rows,
                           adapter_reference)
from .ppo_loss import adapt_kl_coef, gae, ppo_loss, token_rewards, whiten
from .run import Stage, StageRun, run_stage
from .sft import LoraSection

VALUE_DIR = "value"
STATE_FILE = "ppo_state.json"


@dataclass
class PpoSection:
    num_generations: int = checked(1, ge=1)     # completions per prompt (PPO needs no groups)
    max_new_tokens: int = checked(64, ge=1)
    temperature: float = checked(1.0, gt=0)
    top_p: float = checked(1.0, gt=0, le=1)
    top_k: int = checked(0, ge=0)
    stop_strings: list[str] = checked(default_factory=list, nonempty=True)
    ppo_epochs: int = checked(2, ge=1)          # optimizer steps on each rollout
    gamma: float = checked(1.0, ge=0, le=1)
    lam: float = checked(0.95, ge=0, le=1)
    cliprange: float = checked(0.2, gt=0, lt=1)
    cliprange_value: float = checked(0.2, gt=0)
    vf_coef: float = checked(0.1, ge=0)
    ent_coef: float = checked(0.0, ge=0)
    kl_coef: float = checked(0.05, ge=0)        # per-token KL penalty in the reward (0: no reference at all)
    target_kl: Optional[float] = checked(None, gt=0)  # set: kl_coef adapts to hold the KL near it
    kl_horizon: int = checked(10000, ge=1)      # samples over which the adaptive controller acts
    whiten_advantages: bool = True
    rollout_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # as grpo.rollout_dtype


@dataclass
class ValueSection:
    init_from: Optional[str] = None  # a reward model's directory; default: a copy of the policy's backbone


@dataclass
class PpoConfig(StageConfig):
    """The PPO recipe: the shared sections (its own defaults), prompts and rewards as GRPO's, the algorithm."""
    model: dict = field(default_factory=dict)   # init_from: DIR (an SFT checkpoint)
    train: TrainSection = field(default_factory=lambda: TrainSection(max_steps=200, batch_size=8, lr=1e-6,
                                                                     warmup_steps=0, schedule="constant",
                                                                     weight_decay=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=0))
    out_dir: str = checked("runs/ppo", nonblank=True)
    data: GrpoDataSection = field(default_factory=GrpoDataSection)
    rewards: list[RewardSpec] = field(default_factory=list)
    ppo: PpoSection = field(default_factory=PpoSection)
    value: ValueSection = field(default_factory=ValueSection)
    # a LoRA policy (the reference is then the policy with its adapters off); the value model trains whole
    lora: LoraSection = field(default_factory=lambda: LoraSection(dropout=0.0))

    def validate(self, source: str) -> "PpoConfig":
        check_continues_model(self, source, "ppo", "the SFT model", "prompt files")
        if not self.rewards:
            raise ConfigError(f"{source}: `rewards` is empty; add at least one, e.g. [{{type: exact}}]")
        if self.eval.every:
            raise ConfigError(f"{source}: eval.every must be 0 for ppo (its figures are the rollouts' rewards)")
        super().validate(source)
        self.lora.check(self.train, source)
        return self


def load_ppo_config(path: str | Path, overrides: list[str] | None = None) -> tuple[PpoConfig, str]:
    return load_stage_config(PpoConfig, path, overrides, "ppo")


class PolicyAndValue(nn.Module):
    """The two trained models as one module: `forward(ids)` is the policy's logits; `with_values=True` adds
    the value model's output at every position, in the same forward (so DDP sees one module)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config  # what the trainer reads (FLOPs per token)

    def empty_like(self) -> "PolicyAndValue":
        """Weightless (meta) copies of both, unsharded, LoRA layers included: what a gathered or fp32-master
        state loads into for a checkpoint or a rollout (parallel.empty_like)."""
        from .parallel import empty_like
        return PolicyAndValue(empty_like(self.policy), empty_like(self.value))

    def forward(self, input_ids: torch.Tensor, with_values: bool = False, **kwargs):
        logits = self.policy(input_ids, **kwargs)
        if not with_values:
            return logits
        return logits, self.value.score(self.value.hidden_states(input_ids)).squeeze(-1).float()


class PPO(GRPO):
    """GRPO's rollouts and checkpointed buffer, with PPO's rewards, advantages and loss."""

    name = "ppo"

    def __init__(self, sampling: Sampling, p: PpoSection, *, seed: int, grad_accum: int, reference, tokenizer,
                 resume_dir: Path | None):
        super().__init__(sampling, loss_type="grpo", scale_rewards=False, epsilon_low=p.cliprange,
                         epsilon_high=p.cliprange, beta=0.0, ppo_epochs=p.ppo_epochs, seed=seed,
                         grad_accum=grad_accum, reference=None, tokenizer=tokenizer, resume_dir=resume_dir)
        self.p, self.ref = p, reference
        self.kl_coef = p.kl_coef

    def prepare(self, trainer) -> None:
        super().prepare(trainer)
        from ..infer.backends import unwrap
        self.both = unwrap(trainer.model)
        self.policy = self.both.policy
        if hasattr(self.ref, "prepare"):  # a frozen copy; the adapter reference needs nothing
            self.ref.prepare(trainer)
        state = self.resume_dir / STATE_FILE if self.resume_dir is not None else None
        if state is not None and state.is_file():
            self.kl_coef = json.loads(state.read_text())["kl_coef"]

    def checkpoint_files(self, d) -> dict[str, bytes]:
        """GRPO's pending rollouts and the KL controller's state (the same on every rank)."""
        return {**super().checkpoint_files(d), STATE_FILE: json.dumps({"kl_coef": self.kl_coef}).encode()}

    def _rollout(self, prompt_index: list[int], source: int, group: int) -> Rollout:
        p = self.p
        rows, total, per_function = self._sample_and_score(self._engine(), prompt_index, source)
        ids, positions, targets, mask = _training_rows([r.ids for r, _ in rows], [c.token_ids for _, c in rows],
                                                       self.device)
        metrics = _reward_metrics(total, per_function, self.sampling.group_size, [c for _, c in rows])
        rollout = Rollout(ids, positions, targets, mask, advantages=torch.empty(0), group=group, metrics=metrics)
        with torch.no_grad():
            logits, values = self.both(ids, with_values=True, logits_at=positions)
            rollout.old_logps = self._logps_of(logits, rollout)[0]
            rollout.values = values.gather(1, positions) * mask
            ref = None
            if self.ref is not None:
                module, context = self.ref(self.both)  # through the root module: FSDP gathers there
                with context:
                    ref = self._token_logps(module, rollout)[0]
            rewards, kl = token_rewards(total.to(self.device), rollout.old_logps, ref, mask, self.kl_coef)
            advantages, rollout.returns = gae(rewards, rollout.values, mask, p.gamma, p.lam)
            rollout.advantages = whiten(advantages, mask) if p.whiten_advantages else advantages
        kl_per_sample = float(kl.sum(1).mean())
        rollout.metrics.update({"kl": kl_per_sample, "kl_coef": self.kl_coef})
        if p.target_kl is not None:
            kl_mean, samples = kl_per_sample, len(rows)
            if self.dist.enabled:  # one controller: every rank moves it by the KL of all ranks' samples
                from .parallel import all_reduce_sum
                kl_sum, samples = all_reduce_sum(self.dist, [kl_per_sample * len(rows), float(len(rows))])
                kl_mean, samples = kl_sum / samples, int(samples)
            self.kl_coef = adapt_kl_coef(self.kl_coef, kl_mean, p.target_kl, samples, p.kl_horizon)
        return rollout

    def loss(self, model: nn.Module, batch: dict) -> GrpoOutput:
        source, pass_, group = (int(x) for x in batch["rollout"].tolist())
        rollout, rollout_s = self._rollout_for(batch, source, pass_, group)
        logits, values = model(rollout.input_ids, with_values=True, logits_at=rollout.positions)
        logps, entropy = self._logps_of(logits, rollout, with_entropy=True)
        values = values.gather(1, rollout.positions)
        p = self.p
        out = ppo_loss(logps, rollout.old_logps, rollout.advantages, values, rollout.values, rollout.returns,
                       rollout.mask, entropy, cliprange=p.cliprange, cliprange_value=p.cliprange_value,
                       vf_coef=p.vf_coef, ent_coef=p.ent_coef)
        m = rollout.mask
        with torch.no_grad():
            residual = ((rollout.returns - values) * m)[m]
            explained = 1 - float(residual.var() / rollout.returns[m].var().clamp(min=1e-8)) if m.sum() > 1 else 0.0
        metrics = {**rollout.metrics, "clip_ratio": out.clip_fraction, "value_clip_ratio": out.value_clip_fraction,
                   "policy_loss": out.policy, "value_loss": out.value, "explained_variance": explained,
                   "entropy": float((entropy * m).sum() / m.sum().clamp(min=1)),
                   "rollout_s": rollout_s * self.grad_accum}
        if pass_ == self.ppo_epochs - 1:
            self.buffer.pop(source, None)
        return GrpoOutput(out.loss, 1.0, metrics, tokens=rollout.input_ids.numel())


def ppo_objective(run: StageRun, model: nn.Module) -> PPO:
    cfg: PpoConfig = run.cfg
    p = cfg.ppo
    reference = None
    if p.kl_coef > 0 or p.target_kl is not None:
        if cfg.lora.enabled:
            reference = adapter_reference
        else:
            from ..model.io import load_model
            reference = CopyReference(load_model(run.init_from, dtype=torch.float32))
    sampling = Sampling(p.num_generations, p.max_new_tokens, p.temperature, p.top_p, p.top_k, list(p.stop_strings),
                        p.rollout_dtype)
    return PPO(sampling, p, seed=cfg.train.seed, grad_accum=cfg.train.grad_accum, reference=reference,
               tokenizer=run.tokenizer, resume_dir=run.resume_dir)


def build_ppo_model(run: StageRun, train) -> nn.Module:
    from ..model.reward import load_reward_model
    from .sft import load_policy
    cfg: PpoConfig = run.cfg
    policy = load_policy(run)
    value_from = run.resume_dir / VALUE_DIR if run.resume_dir is not None else (cfg.value.init_from or run.init_from)
    if not Path(value_from).is_dir():
        raise ZhllmError(f"value model {value_from}: no such directory")
    value = load_reward_model(value_from, train=True, seed=cfg.train.seed)
    return PolicyAndValue(policy, value)


def _checkpoint_hooks(run: StageRun):
    """The policy as the checkpoint's model (merged with its adapter under LoRA, the adapter under adapter/ as
    SFT's), and the value model under value/."""
    from ..model.io import save_model
    from .sft import lora_checkpoint_hooks
    export_policy, extra_policy = lora_checkpoint_hooks(run.init_from) if run.cfg.lora.enabled else (None, None)

    def extra(model: nn.Module, staging: Path) -> None:
        save_model(model.value, staging / VALUE_DIR)
        if extra_policy is not None:
            extra_policy(model.policy, staging)

    return (lambda model: export_policy(model.policy) if export_policy else model.policy), extra


PPO_STAGE = Stage(name="ppo", config=PpoConfig, objective=ppo_objective, prepare=prepare_grpo,
                  open_data=open_prompts, build_model=build_ppo_model, checkpoint_hooks=_checkpoint_hooks)


def run_ppo(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Train from a PPO recipe; returns the run summary."""
    return run_stage(PPO_STAGE, config, overrides, resume)
