"""Greedy samples for the loop's periodic eval (its val loss comes from zhllm.eval.loss)."""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def greedy_samples(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                   autocast: AbstractContextManager | None = None) -> list[str]:
    """Prompt + greedy continuation for each prompt, decoded together by the inference engine from the
    weights being trained (LoRA deltas applied, FSDP shards gathered; collective under FSDP: every rank calls
    it). `autocast` is not entered: the engine decodes in the weights' own dtype, and the fused step would
    re-cast fp32 weights at every token under it."""
    from ..infer.engine import Engine
    was_training = model.training
    model.eval()
    try:
        texts = Engine(model, tokenizer).generate_batch(prompts, max_new_tokens=max_new_tokens).texts
    finally:
        model.train(was_training)
    return [prompt + " → " + text for prompt, text in zip(prompts, texts)]
