"""Function-style generation for scripts and the public API: each call wraps the model in a fresh `Engine`.

    model, tok = zhllm.load_model("DIR"), zhllm.load_tokenizer("DIR")
    zhllm.generate(model, tok, [{"role": "user", "content": "你好"}], max_new_tokens=64)

A fresh engine builds the fused decode weights again on every call (a few tens of milliseconds at 26m); for
more than a few calls, or for int8 decoding, make one `Engine` (infer/engine.py) and keep it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .engine import Engine, Prompt
from .loading import load_checkpoint, stop_ids_for


def load_for_inference(path: str | Path, device: str | torch.device = "auto",
                       dtype: str | torch.dtype | None = "auto") -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) from a checkpoint directory, checked to fit together."""
    model, tokenizer, _ = load_checkpoint(path, device, dtype)
    return model, tokenizer


def default_stop_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """The tokenizer's EOS and ChatML's end of turn (an `Engine.load`ed engine adds generation_config's)."""
    return stop_ids_for(tokenizer)


def stream_generate(model: torch.nn.Module, tokenizer, prompt_or_messages: Prompt, *,
                    stop_strings: Sequence[str] = (), stop_token_ids: Iterable[int] | None = None,
                    **sampling) -> Iterator[str]:
    """`Engine.stream`: the answer as text pieces while it is generated."""
    return Engine(model, tokenizer).stream(prompt_or_messages, stop_strings=stop_strings,
                                           stop_token_ids=stop_token_ids, **sampling)


def generate(model: torch.nn.Module, tokenizer, prompt_or_messages: Prompt, *, stop_strings: Sequence[str] = (),
             stop_token_ids: Iterable[int] | None = None, **sampling) -> str:
    """`Engine.generate`: the answer to a prompt (str: plain text; list of messages: the chat template)."""
    return Engine(model, tokenizer).generate(prompt_or_messages, stop_strings=stop_strings,
                                             stop_token_ids=stop_token_ids, **sampling)


def generate_batch(model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt], *, stop_strings: Sequence[str] = (),
                   stop_token_ids: Iterable[int] | None = None, **sampling) -> list[str]:
    """The texts of `Engine.generate_batch`: answers to several prompts decoded together."""
    return Engine(model, tokenizer).generate_batch(prompts, stop_strings=stop_strings, stop_token_ids=stop_token_ids,
                                                   **sampling).texts


def generate_ids(model: torch.nn.Module, input_ids_list: Sequence[Sequence[int]], *,
                 stop_token_ids: Iterable[int] = (), quantize: str = "none", **sampling) -> list[list[int]]:
    """New token ids per prompt, stop tokens excluded. No stop tokens unless given: ids know no tokenizer."""
    out = Engine(model, stop_ids=stop_token_ids, quantize=quantize).generate_batch(input_ids_list, **sampling)
    return [c.token_ids[:-1] if c.finish_reason == "stop_token" else c.token_ids for c in out.completions]
