"""Prompt -> token ids, with control tokens coming only from the chat template (ARCHITECTURE rule 8).

A plain string is encoded as text with special tokens split. A list of messages is rendered with the
tokenizer's own `chat_template` (so inference sees exactly what SFT trained on); message contents are
encoded as text, so `<|im_end|>` typed by a user stays text and cannot end the turn early. A template that
alters contents while rendering them is refused rather than guessed at.
"""
from __future__ import annotations

import re
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
    # Render with a unique placeholder per content; the text between placeholders is the template's own
    # (control tokens on), each placeholder becomes its message's content encoded as text (control tokens off).
    tag = uuid.uuid4().hex
    shown = [{**m, "content": f"@@{tag}:{i}@@"} for i, m in enumerate(messages)]
    pieces = re.split(f"@@{tag}:(\\d+)@@", _render(tokenizer, shown, add_generation_prompt))
    template_parts, slots = pieces[0::2], [int(i) for i in pieces[1::2]]
    # The split is only trusted if it reproduces the real rendering: a template may drop a message (system
    # messages, say) or repeat one, both fine, but one that rewrites a content (strip, upper, a prefix test)
    # renders text we cannot attribute to template or user, and guessing could let user text become control ids.
    contents = [messages[i]["content"] for i in slots]
    rebuilt = template_parts[0] + "".join(c + t for c, t in zip(contents, template_parts[1:]))
    if rebuilt != _render(tokenizer, messages, add_generation_prompt):
        raise ZhllmError("the chat template changes message contents as it renders them, so the prompt cannot be "
                         "encoded with user text kept apart from control tokens; use a template that inserts each "
                         "content unchanged, or pass a plain string prompt")
    ids = _encode_template_text(tokenizer, template_parts[0])
    for content, after in zip(contents, template_parts[1:]):
        ids += encode_text(tokenizer, content) + _encode_template_text(tokenizer, after)
    return ids


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors from the template (e.g. a role it does not accept)
        raise ZhllmError(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _encode_template_text(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
