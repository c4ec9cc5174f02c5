"""Special tokens and the ChatML chat template: the one place their spellings live.

A leaf module (no zhllm imports): the tokenizer trainers put these tokens at ids 0, 1, 2, data/ renders and
labels chat with them, model/ and infer/ stop generation at the end of a turn.
"""
from __future__ import annotations

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}"
)
DEFAULT_NUM_RESERVED = 13


def special_tokens(num_reserved: int) -> list[str]:
    """EOS and the ChatML pair first (ids 0, 1, 2), then reserved slots for later stages' control tokens."""
    return [EOS, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(num_reserved)]
