"""Prompt -> token ids, with control tokens coming only from the chat template (ARCHITECTURE rule 8).

A plain string is encoded as text with special tokens split. A list of messages is rendered with the
tokenizer's own `chat_template` (so inference sees exactly what SFT trained on); message contents are
encoded as text, so `<|im_end|>` typed by a user stays text and cannot end the turn early.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence

from ..errors import ZhllmError
from ..tokenizer.encode import encode_text

Messages = Sequence[dict]


def encode_prompt(tokenizer, prompt_or_messages: str | Messages) -> list[int]:
    if isinstance(prompt_or_messages, str):
        ids = encode_text(tokenizer, prompt_or_messages)
    elif isinstance(prompt_or_messages, Sequence) and all(isinstance(m, dict) for m in prompt_or_messages):
        ids = encode_messages(tokenizer, prompt_or_messages)
    else:
        raise ZhllmError("prompt must be a str or a list of {'role': ..., 'content': ...} messages, "
                         f"got {type(prompt_or_messages).__name__}")
    if not ids:
        raise ZhllmError("the prompt is empty")
    return ids


def encode_messages(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Render with the chat template; template text may hold control tokens, message contents may not."""
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ZhllmError(f"message {i} needs a str 'role' and a str 'content', got {m!r:.80}")
    if not getattr(tokenizer, "chat_template", None):
        raise ZhllmError("this tokenizer has no chat_template; pass a plain string prompt instead")
    # Render with a unique placeholder per content, then encode the template pieces (control tokens on)
    # and the contents (control tokens off) separately.
    tag = uuid.uuid4().hex
    marks = [f"@@{tag}{i}@@" for i in range(len(messages))]
    shown = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    rendered = _render(tokenizer, shown, add_generation_prompt)
    ids: list[int] = []
    rest = rendered
    for m, mark in zip(messages, marks):
        before, found, rest = rest.partition(mark)
        if not found:  # a template that rewrites contents: fall back to rendering the real text
            return _encode_template_text(tokenizer, _render(tokenizer, messages, add_generation_prompt))
        ids += _encode_template_text(tokenizer, before) + encode_text(tokenizer, m["content"])
    return ids + _encode_template_text(tokenizer, rest)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors from the template (e.g. a role it does not accept)
        raise ZhllmError(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _encode_template_text(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
