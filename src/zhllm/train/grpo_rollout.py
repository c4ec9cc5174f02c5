"""The GRPO objective: sample G completions per prompt with the current policy, score them, and minimise the
clipped, KL-regularised loss (grpo_loss.py) over `ppo_epochs` optimizer steps of each rollout.

The shared Trainer drives it like any objective: `weight` is 1 per micro-batch (each micro-batch's loss is
already a mean, as in TRL, so a step averages its micro-batches) and `loss(model, batch)` does the work. On a
rollout's first pass it generates through the inference engine (infer/engine.py; a LoRA policy decodes
from a copy with its adapter folded in, an FSDP-sharded one from a gathered copy), computes rewards and group
advantages, and, when needed, the sampling policy's and the reference's per-token log-probs (no gradient); later
passes reuse that rollout. The rollouts of the current step (every rank's) are written into each checkpoint
(`grpo_rollouts.pt`) when more passes remain, so a run killed between two passes resumes bitwise. Sampling is
seeded per rollout from (train.seed, its data position).
"""
from __future__ import annotations

import io
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ZhllmError
from ..eval.loss import LossOutput
from .grpo_loss import group_advantages, grpo_loss, token_logps_and_entropy

ROLLOUT_FILE = "grpo_rollouts.pt"


@dataclass
class GrpoOutput(LossOutput):
    metrics: dict[str, float] = field(default_factory=dict)  # per micro-batch means; the trainer averages them


@dataclass
class Rollout:
    """One micro-batch's completions as training rows: prompt + completion, right-padded."""
    input_ids: torch.Tensor    # (N, W)
    positions: torch.Tensor    # (N, Tc): the position whose logits predict each completion token
    targets: torch.Tensor      # (N, Tc): the completion tokens (0 at padding)
    mask: torch.Tensor         # (N, Tc) bool: real completion tokens
    advantages: torch.Tensor   # (N,)
    metrics: dict[str, float]  # reward figures of the rollout
    group: int                 # which rollout (ppo_epochs passes share it)
    old_logps: torch.Tensor | None = None  # the sampling policy's, when passes > 1
    ref_logps: torch.Tensor | None = None  # the reference's, when beta > 0
    values: torch.Tensor | None = None     # PPO: the value model's (N, Tc) at sampling time
    returns: torch.Tensor | None = None    # PPO: GAE returns (N, Tc)

    def to_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict) -> "Rollout":
        return cls(**state)


@dataclass
class Sampling:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_strings: list[str]
    dtype: str = "auto"  # auto | fp32 | bf16 (GrpoSection.rollout_dtype)


class GRPO:
    name = "grpo"

    def __init__(self, sampling: Sampling, *, loss_type: str, scale_rewards: bool, epsilon_low: float,
                 epsilon_high: float, beta: float, ppo_epochs: int, seed: int, grad_accum: int,
                 reference: Callable | None, tokenizer, resume_dir: Path | None = None, width_multiple: int = 1,
                 dynamic_sampling: int = 0):
        """reference(model) -> (module, context): what computes the reference's log-probs (a frozen copy, or
        the policy inside `adapters_disabled`); None when beta == 0. dynamic_sampling: see `_informative`."""
        self.sampling, self.loss_type, self.scale_rewards = sampling, loss_type, scale_rewards
        self.epsilon_low, self.epsilon_high, self.beta = epsilon_low, epsilon_high, beta
        self.ppo_epochs, self.seed, self.grad_accum = ppo_epochs, seed, grad_accum
        self.reference, self.tokenizer, self.resume_dir = reference, tokenizer, resume_dir
        self.width_multiple, self.dynamic_sampling = width_multiple, dynamic_sampling
        self.buffer: dict[int, Rollout] = {}
        self.echo = print

    # ---- the trainer's hooks ----
    def weight(self, batch: dict) -> float:
        return 1.0

    def prepare(self, trainer) -> None:
        self.data, self.policy, self.echo = trainer.train_data, trainer.model, trainer.echo
        self.dist, self.device, self.sharded = trainer.d, trainer.d.device, trainer.fsdp
        from ..device import resolve_dtype
        self.sample_dtype = resolve_dtype({"fp32": "float32", "bf16": "bfloat16"}.get(self.sampling.dtype, "auto"),
                                          self.device)
        if hasattr(self.reference, "prepare"):
            self.reference.prepare(trainer)
        path = self.resume_dir / ROLLOUT_FILE if self.resume_dir is not None else None
        if path is not None and path.is_file():
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
            except (RuntimeError, EOFError, OSError) as e:
                raise ZhllmError(f"{path}: cannot read the stored rollout ({str(e).splitlines()[0]})") from None
            self.buffer = {int(k): Rollout.from_state(v) for k, v in state.items()}

    def checkpoint_files(self, d) -> dict[str, bytes]:
        """What a checkpoint stores for this objective, by file name, on rank 0 (collective: every rank calls it):
        the rollouts that later passes still need, every rank's (keyed by their data positions, which differ per
        rank), so a run killed between two passes resumes bit for bit under torchrun too. Nothing when none is
        pending."""
        if self.ppo_epochs == 1:
            return {}
        pending = {str(k): {n: v.cpu() if torch.is_tensor(v) else v for n, v in r.to_state().items()}
                   for k, r in self.buffer.items()}
        from .parallel import gather_objects
        merged = {k: v for rank in gather_objects(d, pending) for k, v in rank.items()}
        if not d.is_main or not merged:
            return {}
        buf = io.BytesIO()
        torch.save(merged, buf)
        return {ROLLOUT_FILE: buf.getvalue()}

    def loss(self, model: torch.nn.Module, batch: dict) -> GrpoOutput:
        source, pass_, group = (int(x) for x in batch["rollout"].tolist())
        rollout, rollout_s = self._rollout_for(batch, source, pass_, group)
        logps, entropy = self._token_logps(model, rollout, with_entropy=True)
        old = rollout.old_logps if rollout.old_logps is not None else logps.detach()
        out = grpo_loss(logps, old, rollout.ref_logps, rollout.advantages, rollout.mask, loss_type=self.loss_type,
                        epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
                        max_completion_length=self.sampling.max_new_tokens)
        mask = rollout.mask.float()
        metrics = {**rollout.metrics, "clip_ratio": out.clip_fraction,
                   "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
                   "rollout_s": rollout_s * self.grad_accum}
        if out.kl is not None:
            metrics["kl"] = out.kl
        if pass_ == self.ppo_epochs - 1:
            self.buffer.pop(source, None)  # its last pass: nothing later needs it
        return GrpoOutput(out.loss, 1.0, metrics, tokens=rollout.input_ids.numel())

    # ---- rollouts ----
    def _rollout_for(self, batch: dict, source: int, pass_: int, group: int) -> tuple[Rollout, float]:
        """(the rollout this micro-batch trains on, seconds spent sampling it now): the buffered one on later
        passes, a new one on the first."""
        rollout = self.buffer.get(source)
        if rollout is not None and rollout.group == group:
            return rollout, 0.0
        if pass_ > 0:
            self.echo(f"{self.name}: the rollout of pass {pass_ + 1}/{self.ppo_epochs} is missing (a checkpoint "
                      "made without it); sampling it again from the current policy")
        t0 = time.perf_counter()
        rollout = self._rollout(batch["prompt_index"].tolist(), source, group)
        self.buffer = {k: r for k, r in self.buffer.items() if r.group == group}
        self.buffer[source] = rollout
        return rollout, time.perf_counter() - t0

    def _rollout(self, prompt_index: list[int], source: int, group: int) -> Rollout:
        s = self.sampling
        engine = self._engine()
        rows, total, per_function = self._sample_and_score(engine, prompt_index, source)
        if self.dynamic_sampling:
            rows, total, metrics = self._informative(engine, rows, total, per_function, source)
        else:
            metrics = _reward_metrics(total, per_function, s.group_size, [c for _, c in rows])
        advantages = group_advantages(total, s.group_size, self.scale_rewards)
        rollout = Rollout(*_training_rows([r.ids for r, _ in rows], [c.token_ids for _, c in rows], self.device,
                                          self.width_multiple),
                          advantages=advantages.to(self.device), metrics=metrics, group=group)
        with torch.no_grad():
            if self.ppo_epochs > 1:
                rollout.old_logps = self._token_logps(self.policy, rollout)[0]
            if self.beta != 0.0:
                module, context = self.reference(self.policy)
                with context:
                    rollout.ref_logps = self._token_logps(module, rollout)[0]
        return rollout

    def _informative(self, engine, rows: list, total: torch.Tensor, per_function: dict[str, torch.Tensor],
                     source: int):
        """DAPO's dynamic sampling: (rows, total rewards, metrics) of only the groups whose rewards differ (a
        group that agrees has advantage 0 and teaches nothing). Up to `dynamic_sampling` more rounds sample as
        many prompts again, drawn at random (seeded by the rollout's position and the round), until the
        micro-batch's count of groups is kept; with none kept, the first round stays (a step without gradient).
        The reward metrics cover every sampled group (the policy's reward on the prompts), with the rounds used
        and the share of groups kept."""
        g, want = self.sampling.group_size, len(rows) // self.sampling.group_size
        sampled = [(rows, total, per_function)]
        kept: list[tuple[list, torch.Tensor]] = []
        for round_ in range(self.dynamic_sampling + 1):
            if round_:
                pick = np.random.default_rng([self.seed, source, round_]).choice(
                    len(self.data.records), size=min(want, len(self.data.records)), replace=False)
                sampled.append(self._sample_and_score(engine, [int(i) for i in pick], source, round_))
            r_rows, r_total, _ = sampled[-1]
            for j in range(0, len(r_rows), g):
                if r_total[j:j + g].max() > r_total[j:j + g].min():
                    kept.append((r_rows[j:j + g], r_total[j:j + g]))
            if len(kept) >= want:
                break
        metrics = _reward_metrics(torch.cat([t for _, t, _ in sampled]),
                                  {n: torch.cat([f[n] for _, _, f in sampled]) for n in per_function}, g,
                                  [c for r, _, _ in sampled for _, c in r])
        metrics["sampling_rounds"] = float(len(sampled))
        metrics["groups_kept"] = len(kept) * g / sum(len(r) for r, _, _ in sampled)
        if not kept:
            return rows, total, metrics
        kept = kept[:want]
        return [row for r, _ in kept for row in r], torch.cat([t for _, t in kept]), metrics

    def _sample_and_score(self, engine, prompt_index: list[int], source: int, round_: int = 0):
        """(rows: [(record, completion)], total rewards (N,), {function: rewards (N,)}) of `group_size` samples
        per prompt, seeded by the rollout's data position (and the dynamic-sampling round after the first)."""
        s = self.sampling
        records = [self.data.records[i] for i in prompt_index]
        entropy = [self.seed, source] + ([round_] if round_ else [])
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        was_training = self.policy.training
        self.policy.eval()  # LoRA dropout off while sampling
        # Sampling in the weights' own dtype: under the trainer's autocast the fused step would re-cast fp32
        # weights at every token. The log-probs the loss uses come from the training forward.
        try:
            with torch.autocast(self.device.type, enabled=False):
                gen = engine.generate_batch([r.ids for r in records], n=s.group_size, seed=seed,
                                            max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                            top_p=s.top_p, top_k=s.top_k, stop_strings=tuple(s.stop_strings))
        finally:
            self.policy.train(was_training)
        rows = [(records[c.prompt_index], c) for c in gen.completions]
        total, per_function = self.data.rewards.score(
            [r.prompt for r, _ in rows], [c.text for _, c in rows], [r.answer for r, _ in rows],
            [len(c.token_ids) for _, c in rows])
        return rows, total, per_function

    def _engine(self):
        """A fresh engine per rollout (collective under FSDP: every rank makes one per rollout): fused AdamW
        updates weights without bumping the version counters a long-lived engine's fused decode cache watches, so
        a kept engine could sample from stale weights."""
        from ..infer.engine import Engine
        return Engine(self._sampling_model(), self.tokenizer)

    def _sampling_model(self) -> torch.nn.Module:
        """The policy, or a plain copy of its current weights to decode from, made per rollout: the whole model
        when it is FSDP-sharded (parallel.unsharded_copy), in the sampling dtype (bf16 decodes about twice as fast
        on a CPU with bf16 units), with a LoRA adapter folded in (the fused decode step reads plain weights;
        through peft's layers a rollout took three times as long)."""
        from ..infer.decoder import can_fuse
        from .lora import folded_state_dict
        module = self._whole_policy()
        state = folded_state_dict(module)
        if state is None:
            if not can_fuse(module) or module.model.embed_tokens.weight.dtype == self.sample_dtype:
                return module
            state = module.state_dict()
        from ..model.io import model_from_state_dict
        state = {k: v.detach().to(self.sample_dtype) for k, v in state.items()}
        return model_from_state_dict(module.config, state).eval()

    def _whole_policy(self) -> torch.nn.Module:
        """The policy module; under FSDP its shards gathered into a plain copy (collective). PPO's policy is one
        of two models under the sharded root: only it is gathered."""
        from ..infer.backends import unwrap
        from .parallel import unsharded_copy
        module = unwrap(self.policy)
        return unsharded_copy(module).eval() if self.sharded else module

    def _token_logps(self, model: torch.nn.Module, rollout: Rollout,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._logps_of(model(rollout.input_ids, logits_at=rollout.positions), rollout, with_entropy)

    def _logps_of(self, logits: torch.Tensor, rollout: Rollout,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked log-probs of the completion tokens (and entropies) from the logits at `rollout.positions`."""
        logps, entropy = token_logps_and_entropy(logits, rollout.targets, self.sampling.temperature)
        return logps * rollout.mask, entropy if with_entropy else None


def _training_rows(prompts: list[list[int]], completions: list[list[int]], device,
                   multiple: int = 1) -> tuple[torch.Tensor, ...]:
    """(input_ids, positions, targets, mask): prompt + completion per row, right-padded (a causal model's
    real tokens never see the padding after them) to a multiple of `multiple` tokens: compiled layers then
    see a few shapes instead of one per rollout."""
    n = len(prompts)
    up = lambda x: -(-x // multiple) * multiple  # noqa: E731
    width = up(max(len(p) + len(c) for p, c in zip(prompts, completions)))
    tc = up(max(len(c) for c in completions))
    ids = torch.zeros(n, width, dtype=torch.long)
    positions = torch.zeros(n, tc, dtype=torch.long)
    targets = torch.zeros(n, tc, dtype=torch.long)
    mask = torch.zeros(n, tc, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        positions[i, :len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        targets[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = True
    return ids.to(device), positions.to(device), targets.to(device), mask.to(device)


def _reward_metrics(total: torch.Tensor, per_function: dict[str, torch.Tensor], group_size: int,
                    completions: list) -> dict:
    """TRL's names: reward and reward_std (mean over groups of the group's std), per-function mean and std,
    completion lengths and the share cut at max_new_tokens."""
    groups = total.view(-1, group_size)
    metrics = {"reward": float(total.mean()),
               "reward_std": float(groups.std(1).mean()) if group_size > 1 else 0.0}
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = float(values.mean())
        metrics[f"rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    metrics["completions/mean_length"] = float(lengths.mean())
    metrics["completions/clipped_ratio"] = float(np.mean([c.finish_reason == "length" for c in completions]))
    return metrics


class CopyReference:
    """A frozen copy of the starting model (loaded from init_from, never from a resumed checkpoint)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    def prepare(self, trainer) -> None:
        policy = next(trainer.model.parameters())
        self.model.to(device=policy.device, dtype=policy.dtype)

    def __call__(self, policy: torch.nn.Module):
        return self.model, nullcontext()


def adapter_reference(policy: torch.nn.Module):
    """The LoRA policy with its adapters off: the base model without a second copy."""
    from .lora import adapters_disabled
    return policy, adapters_disabled(policy)
