"""Periodic evaluation inside the loop: val loss, perplexity, bits per byte, and greedy samples."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch

from .objectives import Objective, to_device
from .parallel import Dist, all_reduce_sum


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, objective: Objective, data, batch_size: int, batches: int, d: Dist,
                  autocast: AbstractContextManager, bytes_per_token: float | None) -> dict:
    """Mean loss over the first `batches` x world micro-batches of the val split (the same windows every time,
    so successive evals are comparable). Collective under DDP/FSDP: every rank calls it."""
    was_training = model.training
    model.eval()
    loss_sum, weight = 0.0, 0.0
    n = max(1, min(batches, len(data) // max(batch_size * d.world, 1)))
    for i in range(n):
        batch = to_device(data.batch((i * d.world + d.rank) * batch_size, batch_size), d.device)
        with autocast:
            out = objective.loss(model, batch)
        loss_sum += float(out.loss_sum)
        weight += out.weight
    model.train(was_training)
    loss_sum, weight = all_reduce_sum(d, [loss_sum, weight])
    loss = loss_sum / weight
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        result["val_bpb"] = loss / math.log(2) / bytes_per_token
    return result


@torch.no_grad()
def greedy_samples(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                   autocast: AbstractContextManager) -> list[str]:
    """Prompt + greedy continuation for each prompt, via zhllm.infer.generate when it exists."""
    was_training = model.training
    model.eval()
    try:
        from ..infer.generate import generate  # KV-cache generation, written by the inference area
    except ImportError:
        generate = None
    out = []
    for prompt in prompts:
        with autocast:
            text = None
            if generate is not None:
                try:
                    text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
                except TypeError:
                    text = None
            if not isinstance(text, str):
                text = _plain_greedy(model, tokenizer, prompt, max_new_tokens)
        out.append(prompt + " → " + text)
    model.train(was_training)
    return out


def _plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Recompute-everything greedy decoding: slow but dependency-free, fine for a few dozen tokens."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, split_special_tokens=True, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids or [tokenizer.eos_token_id or 0]], device=device)
    limit = model.config.max_seq_len
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(x[:, -limit:])[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
    return tokenizer.decode(new)
