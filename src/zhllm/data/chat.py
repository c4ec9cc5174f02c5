"""SFT data: chat records in any common format -> messages -> token ids + assistant-only labels.

Formats (auto-detected per record): alpaca (`instruction`, `input`, `output`, optional `system`, `history`),
prompt/response (`prompt`/`response`, `query`/`answer`, ...), ShareGPT (`conversations` of `from`/`value`)
and OpenAI `messages` (`role`/`content`). Every record becomes a list of `{"role", "content"}` dicts:
an optional system message, then user/assistant turns alternating, ending with the assistant.

The token ids are exactly `tokenizer.apply_chat_template(messages, sanitize_control_tokens=True)`: the
tokenizer's own template renders them, so training sees what chat sees, and control tokens typed in data
(`<|im_end|>` in a user message) are encoded as plain text (ARCHITECTURE rule 8). For data without such
text this equals plain `apply_chat_template(messages)`. Labels are found by rendering each assistant turn's
prefix with the generation prompt: the tokens after that prefix, up to and including the turn's end-of-turn
token, are trained; everything else (system, user turns, role headers, the "\\n" after `<|im_end|>`) is -100.
Labels are aligned with input_ids (the objective shifts them), as in transformers.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import ZhllmError
from ..tokenizer.special import IM_END

IGNORE = -100
FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_response")
ROLE_NAMES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}
# (prompt key, response key) pairs seen in the wild, most common first.
PROMPT_RESPONSE_KEYS = (("prompt", "response"), ("query", "response"), ("query", "answer"),
                        ("question", "answer"), ("prompt", "completion"), ("input", "output"))
Message = dict[str, str]


class BadRecord(Exception):
    """A record that cannot become a training conversation; the message is the reason counted in stats."""


# ---------------------------------------------------------------- formats -> messages

def detect_format(data: dict) -> str:
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data:
        return "alpaca"
    if any(p in data and r in data for p, r in PROMPT_RESPONSE_KEYS):
        return "prompt_response"
    raise BadRecord("unknown format")


def normalize_record(data: Any, fmt: str = "auto") -> list[Message]:
    """One record (a dict) as a list of {role, content} messages; raises BadRecord with the reason."""
    if not isinstance(data, dict):
        raise BadRecord("not an object")
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt == "alpaca":
        return _from_alpaca(data)
    if fmt == "prompt_response":
        return _from_prompt_response(data)
    if fmt in ("sharegpt", "messages"):
        return _from_turn_list(data, "conversations" if fmt == "sharegpt" else "messages")
    raise ZhllmError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _text(data: dict, key: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise BadRecord("missing field")
        return ""
    if not isinstance(value, str):
        raise BadRecord("field is not text")
    return value


def _system_and_history(data: dict) -> list[Message]:
    out = []
    system = _text(data, "system", required=False)
    if system.strip():
        out.append({"role": "system", "content": system})
    history = data.get("history") or []
    if not isinstance(history, list):
        raise BadRecord("history is not a list")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRecord("history item is not a [user, assistant] pair")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _from_alpaca(data: dict) -> list[Message]:
    instruction, extra = _text(data, "instruction"), _text(data, "input", required=False)
    prompt = f"{instruction}\n{extra}" if instruction.strip() and extra.strip() else instruction or extra
    return _system_and_history(data) + [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": _text(data, "output")}]


def _from_prompt_response(data: dict) -> list[Message]:
    for p, r in PROMPT_RESPONSE_KEYS:
        if p in data and r in data:
            return _system_and_history(data) + [{"role": "user", "content": _text(data, p)},
                                                {"role": "assistant", "content": _text(data, r)}]
    raise BadRecord("missing field")


def _from_turn_list(data: dict, key: str) -> list[Message]:
    turns = data.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord("missing field")
    out = []
    system = data.get("system")  # some ShareGPT dumps keep the system prompt beside the turns
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("turn is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or content is None:
            raise BadRecord("missing field")
        if not isinstance(content, str):
            raise BadRecord("field is not text")
        if role.lower() not in ROLE_NAMES:
            raise BadRecord("unknown role")
        out.append({"role": ROLE_NAMES[role.lower()], "content": content})
    return out


def check_conversation(messages: list[Message]) -> list[Message]:
    """Validate turn order and contents; drops an empty system prompt and a trailing unanswered user turn."""
    msgs = [m for i, m in enumerate(messages) if not (i == 0 and m["role"] == "system" and not m["content"].strip())]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRecord("roles do not alternate")
        if not m["content"].strip():
            raise BadRecord(f"empty {m['role']} turn")
    if len(body) % 2:  # nothing to learn from a question without its answer
        msgs = msgs[:-1]
    if len(body) < 2:
        raise BadRecord("no assistant turn")
    return msgs


# ---------------------------------------------------------------- messages -> ids + labels

def _render_ids(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, sanitize_control_tokens=True,
                                            add_generation_prompt=add_generation_prompt)
    except ValueError as e:  # no chat_template, or the template rejects the conversation
        raise ZhllmError(f"tokenizer cannot render this chat: {str(e).splitlines()[0]}") from None
    return list(ids)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that close an assistant turn: ChatML's <|im_end|> and the tokenizer's EOS."""
    ids = set()
    for tok in (IM_END, tokenizer.eos_token):
        i = tokenizer.convert_tokens_to_ids(tok) if tok else None
        if i is not None and i != tokenizer.unk_token_id:
            ids.add(i)
    if not ids:
        raise ZhllmError(f"tokenizer has neither {IM_END} nor an EOS token to end assistant turns")
    return ids


def render_with_labels(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a validated conversation, with no length limit."""
    ids, labels, _ = _render_with_reply_ends(tokenizer, messages)
    return ids, labels


def _render_with_reply_ends(tokenizer, messages: list[Message]) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, token index just after each assistant reply's end-of-turn token)."""
    ends = []
    ids = _render_ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    eot = end_of_turn_ids(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        start = _common_prefix_len(prompt, ids)
        # Byte-level BPE may merge the header's last "\n" with content starting with "\n" (one token);
        # anything more means the template renders history differently from the live prompt.
        if start < len(prompt) - 1:
            raise ZhllmError("the tokenizer's chat template renders earlier turns differently once a reply "
                             "follows, so assistant spans cannot be located")
        end = next((j + 1 for j in range(start, len(ids)) if ids[j] in eot), None)
        if end is None:
            raise ZhllmError(f"the tokenizer's chat template does not close assistant turns with {IM_END} or EOS")
        labels[start:end] = ids[start:end]
        ends.append(end)
    return ids, labels, ends


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def fit_conversation(tokenizer, messages: list[Message], max_len: int | None,
                     overflow: str = "truncate") -> tuple[list[int], list[int], int]:
    """Encode, dropping whole earliest user/assistant pairs (the system prompt stays) until it fits.

    Returns (input_ids, labels, pairs_dropped); raises BadRecord("too long") when even the last exchange does
    not fit or overflow == "skip".
    """
    if overflow not in ("truncate", "skip"):
        raise ZhllmError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    first = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    if max_len is not None:
        messages, dropped = _drop_hopeless_turns(tokenizer, messages, first, max_len)
        if dropped and overflow == "skip":
            raise BadRecord("too long")
    while True:
        ids, labels, ends = _render_with_reply_ends(tokenizer, messages)
        if max_len is None or len(ids) <= max_len:
            return ids, labels, dropped
        if overflow == "skip" or len(messages) - first <= 2:
            raise BadRecord("too long")
        # Re-rendering after every single drop is quadratic in turns; instead jump to the fewest drops that
        # should fit by this render's token positions (exact for ChatML); the loop re-renders and re-checks,
        # so a wrong estimate costs one more round, never a wrong result.
        head = len(_render_ids(tokenizer, messages[:first])) if first else 0
        gap = len(_render_ids(tokenizer, messages[:first + 2])) - ends[0]  # the "\n" between turns
        n = 1
        while n < len(ends) - 1 and head + len(ids) - (ends[n - 1] + gap) > max_len:
            n += 1
        messages = messages[:first] + messages[first + 2 * n:]
        dropped += n


def _drop_hopeless_turns(tokenizer, messages: list[Message], first: int, max_len: int) -> tuple[list[Message], int]:
    """Drop the earliest exchanges that cannot fit whatever the template adds, before any rendering.

    Contents encoded alone lower-bound their rendered length (a boundary merge saves at most one token per
    message), so a 300-turn chat costs one batch encode here instead of hundreds of prefix renders.
    """
    lengths = [max(len(x) - 1, 0) for x in tokenizer([m["content"] for m in messages], add_special_tokens=False,
                                                    split_special_tokens=True)["input_ids"]]
    total, keep = sum(lengths[:first]), 0
    for end in range(len(messages), first, -2):
        cost = lengths[end - 2] + lengths[end - 1]
        if keep and total + cost > max_len:
            break
        total, keep = total + cost, keep + 1
    pairs = (len(messages) - first) // 2
    return messages[:first] + messages[len(messages) - 2 * keep:], pairs - keep


def encode_conversation(tokenizer, messages: list[Message], max_len: int | None = None,
                        overflow: str = "truncate") -> tuple[list[int], list[int]]:
    """(input_ids, labels): ids as the chat template renders them, labels -100 outside assistant replies."""
    ids, labels, _ = fit_conversation(tokenizer, check_conversation(messages), max_len, overflow)
    return ids, labels


# ---------------------------------------------------------------- records -> examples, with accounting

@dataclass
class SFTStats:
    records: int = 0
    conversations: int = 0
    turns: int = 0
    truncated: int = 0
    trailing_user_dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def skip(self, reason: str, where: str, strict: bool) -> None:
        if strict:
            raise ZhllmError(f"{where}: bad SFT record ({reason})")
        self.skipped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.max_examples:
            seen.append(where)

    def merge(self, other: "SFTStats") -> "SFTStats":
        """Add the counts of a later stretch of input (a worker's unit) into self, keeping input order."""
        for name in ("records", "conversations", "turns", "truncated", "trailing_user_dropped", "tokens",
                     "trained_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.formats.update(other.formats)
        self.skipped.update(other.skipped)
        for reason, where in other.examples.items():
            seen = self.examples.setdefault(reason, [])
            seen.extend(where[:max(self.max_examples - len(seen), 0)])
        return self

    def summary(self) -> str:
        lines = [f"records {self.records}, conversations {self.conversations}, assistant turns {self.turns}, "
                 f"formats {dict(self.formats)}",
                 f"tokens {self.tokens}, trained {self.trained_tokens} "
                 f"({100 * self.trained_tokens / max(self.tokens, 1):.1f}%)"]
        if self.truncated:
            lines.append(f"truncated (earlier turns dropped): {self.truncated}")
        if self.trailing_user_dropped:
            lines.append(f"unanswered last user turn dropped: {self.trailing_user_dropped}")
        for reason, n in self.skipped.most_common():
            lines.append(f"skipped {n} ({reason}), e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)


def _where(record: Any, index: int) -> tuple[Any, str]:
    """(data, "file:line") for a readers.Record, or (dict, "record N") for a plain dict."""
    if hasattr(record, "data"):
        return record.data, f"{getattr(record, 'path', '?')}:{getattr(record, 'line', '?')}"
    return record, f"record {index + 1}"


def iter_conversations(records: Iterable[Any], fmt: str = "auto", strict: bool = False,
                       stats: SFTStats | None = None) -> Iterator[tuple[list[Message], str]]:
    """Yield (validated messages, "file:line") per good record; bad ones are counted in stats and skipped."""
    if fmt not in FORMATS:
        raise ZhllmError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else SFTStats()
    for i, record in enumerate(records):
        data, where = _where(record, i)
        stats.records += 1
        try:
            raw = normalize_record(data, fmt)
            msgs = check_conversation(raw)
        except BadRecord as e:
            stats.skip(str(e), where, strict)
            continue
        stats.trailing_user_dropped += raw[-1]["role"] == "user"  # valid conversations end with the assistant
        stats.formats[detect_format(data) if fmt == "auto" else fmt] += 1
        yield msgs, where


def encode_records(tokenizer, records: Iterable[Any], fmt: str = "auto", max_len: int | None = None,
                   overflow: str = "truncate", strict: bool = False, stats: SFTStats | None = None,
                   progress: bool = False) -> list[tuple[list[int], list[int]]]:
    """All good records as (input_ids, labels), in input order; counts go to `stats`."""
    from tqdm import tqdm

    stats = stats if stats is not None else SFTStats()
    out = []
    convs = iter_conversations(records, fmt, strict, stats)
    for msgs, where in tqdm(convs, desc="encode sft", unit="conv", disable=not progress):
        try:
            ids, labels, dropped = fit_conversation(tokenizer, msgs, max_len, overflow)
        except BadRecord as e:  # too long is a length policy, not bad data: never fatal under strict
            stats.skip(str(e), where, strict=False)
            continue
        stats.conversations += 1
        stats.truncated += dropped > 0
        stats.turns += sum(m["role"] == "assistant" for m in msgs) - dropped
        stats.tokens += len(ids)
        stats.trained_tokens += sum(t != IGNORE for t in labels)
        out.append((ids, labels))
    return out


@contextmanager
def tokenizers_single_threaded() -> Iterator[None]:
    """Rayon threads cost more than they give on one conversation's few messages (one worker on a 10k-record
    file: 1,277 -> 1,628 records/s; in-process encoding of 20k alpaca records: 43-48 s -> 29-34 s).
    A TOKENIZERS_PARALLELISM set by the user wins. Worker processes inherit it."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
