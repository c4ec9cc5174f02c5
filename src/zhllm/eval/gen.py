"""Generation tasks from JSONL: a prompt (plain text, or chat `messages`) and a reference answer, the model's
greedy answer judged by exact match, numeric match or containment. A `Task` (eval/tasks.py) like the demo
tasks, run by the same `run_task`.

Records: `prompt` (str) or `messages` (list of {role, content}); the reference in `answer`, `reference`,
`target` or `output`. Rows without them are counted with file:line and skipped.

Matching: `exact` compares the first line of the answer with the reference, both stripped of surrounding
whitespace and final punctuation; `numeric` compares the first number in the answer with the reference's
number (1e-6 relative); `contains` asks whether the reference occurs anywhere in the answer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..corpus.read_stats import MISSING_FIELD, ReadStats
from ..errors import ZhllmError
from .tasks import Item, Task

MATCHES = ("exact", "numeric", "contains")
REFERENCE_FIELDS = ("answer", "reference", "target", "output")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_END_PUNCT = "。．.！!？?，,；;：:"


def normalise(text: str) -> str:
    return text.strip().rstrip(_END_PUNCT).strip()


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def matches(output: str, reference: str, how: str) -> bool:
    if how == "exact":
        lines = output.strip().splitlines()
        return normalise(lines[0] if lines else "") == normalise(reference)
    if how == "numeric":
        got, want = first_number(output), first_number(reference)
        return got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    if how == "contains":
        return normalise(reference) in output
    raise ZhllmError(f"--match must be one of {', '.join(MATCHES)}, got {how!r}")


class JsonlGenTask(Task):
    """Generative items read from files; a plain prompt is sent as a user message when `chat` is asked."""
    name = "gen"
    kind = "generative"

    def __init__(self, inputs: Iterable[str | Path], match: str = "exact", stop: Sequence[str] = (),
                 stats: ReadStats | None = None):
        if match not in MATCHES:
            raise ZhllmError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")
        from ..corpus.readers import iter_records
        self.match, self.stop = match, tuple(stop)
        self.stats = stats if stats is not None else ReadStats()
        self._items = []
        for rec in iter_records(list(inputs), stats=self.stats):
            item = self._item(rec)
            if item is not None:
                self._items.append(item)

    def _item(self, rec) -> Item | None:
        data = rec.data
        ref = next((data[k] for k in REFERENCE_FIELDS if isinstance(data.get(k), (str, int, float))), None)
        prompt, messages = data.get("prompt"), data.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            if ref is None and messages[-1].get("role") == "assistant":
                ref, messages = messages[-1].get("content"), messages[:-1]
            if not messages:
                messages = None
        else:
            messages = None
        if messages is None and not (isinstance(prompt, str) and prompt.strip()):
            self.stats.add_bad(rec.where, MISSING_FIELD, "no prompt or messages")
            return None
        if ref is None or not str(ref).strip():
            self.stats.add_bad(rec.where, MISSING_FIELD, f"no reference ({'/'.join(REFERENCE_FIELDS)})")
            return None
        question = prompt if messages is None else messages[-1].get("content", "")
        return Item(str(question), str(ref), meta={"messages": messages, "where": rec.where})

    def items(self) -> Sequence[Item]:
        return self._items

    def prompt(self, item: Item, chat: bool) -> str | list[dict]:
        if item.meta["messages"] is not None:
            return item.meta["messages"]
        return [{"role": "user", "content": item.question}] if chat else item.question

    def stop_strings(self, chat: bool) -> tuple[str, ...]:
        return self.stop

    def score(self, item: Item, output: str) -> bool:
        return matches(output, item.answer, self.match)
