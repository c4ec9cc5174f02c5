"""Multiple choice in the CMMLU / C-Eval layouts: read the items, build zero- or k-shot prompts, score them.

Inputs: the upstream CSV files, one per subject (CMMLU: `,Question,A,B,C,D,Answer`; C-Eval:
`id,question,A,B,C,D,answer[,explanation]`; the subject is the file name without `_dev`/`_val`/`_test`), or
JSONL/JSON/parquet records with question/A/B/C/D/answer (and optionally `subject`), field names in any case.
Rows that lack a field or whose answer is not one of the options are counted with file:line and skipped.

Scoring ("letter", the standard): the log-probability of each option's letter as the next token after the
prompt, which ends in "答案："; the four letters share the prompt, so one forward serves the item (the engine
shares rows whose input is the same), and a subject's k-shot items share their header and examples, which the
engine runs once per batch of items (items are scored grouped by subject, reported in input order).
"options": the log-likelihood of each option's text after the prompt, divided by its length in characters
(lm-evaluation-harness's acc_norm).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..corpus.read_stats import MISSING_FIELD, ReadStats
from ..errors import ZhllmError
from .tasks import score_continuations

LETTERS = "ABCDEFGH"
BAD_ANSWER = "bad_answer"
TOO_LONG = "too_long"
HEADER = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
_SPLIT_SUFFIX = re.compile(r"_(dev|val|test|train)$")


@dataclass(frozen=True)
class McItem:
    subject: str
    question: str
    options: tuple[str, ...]  # option texts, for letters A, B, ...
    answer: str               # the correct letter
    where: str = ""           # file:line

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.options)]


def subject_from_path(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".csv", ".jsonl", ".ndjson", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return _SPLIT_SUFFIX.sub("", name)


def read_items(inputs: Iterable[str | Path], stats: ReadStats | None = None, strict: bool = False) -> list[McItem]:
    """Items of every input file, in order; malformed rows are counted in `stats` and skipped."""
    from ..corpus.readers import iter_records
    stats = stats if stats is not None else ReadStats()
    items = []
    for rec in iter_records(list(inputs), strict=strict, stats=stats):
        item = _item(rec, stats, strict)
        if item is not None:
            items.append(item)
    return items


def _item(rec, stats: ReadStats, strict: bool) -> McItem | None:
    data = {str(k).strip().lower(): v for k, v in rec.data.items()}
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        stats.add_bad(rec.where, MISSING_FIELD, "no question", strict)
        return None
    options = []
    for letter in LETTERS:
        if letter.lower() not in data:
            break
        value = data[letter.lower()]
        if value is None or not str(value).strip():  # a column of the file, empty in this row
            stats.add_bad(rec.where, MISSING_FIELD, f"option {letter} is empty", strict)
            return None
        options.append(str(value).strip())
    if len(options) < 2:
        stats.add_bad(rec.where, MISSING_FIELD, f"options {', '.join(LETTERS[:4])} needed, found {len(options)}",
                      strict)
        return None
    answer = str(data.get("answer") or "").strip().upper()
    if answer not in LETTERS[:len(options)] or not answer:
        stats.add_bad(rec.where, BAD_ANSWER, f"answer {answer!r} is not one of {LETTERS[:len(options)]}", strict)
        return None
    subject = data.get("subject") if isinstance(data.get("subject"), str) else subject_from_path(rec.path)
    return McItem(subject, question.strip(), tuple(options), answer, rec.where)


# ------------------------------------------------------------------------------------------------ prompts

def question_block(item: McItem, with_answer: bool) -> str:
    lines = [f"题目：{item.question}"] + [f"{letter}. {text}" for letter, text in zip(item.letters, item.options)]
    return "\n".join(lines) + "\n答案：" + (item.answer if with_answer else "")


def build_prompt(item: McItem, shots: Sequence[McItem], chat: bool) -> str | list[dict]:
    """Base models complete a CMMLU-style text; chat models get each example as a user turn and its letter as
    the assistant's reply, then the question."""
    header = HEADER.format(subject=item.subject.replace("_", " "))
    if not chat:
        return header + "".join(question_block(s, True) + "\n\n" for s in shots) + question_block(item, False)
    messages = []
    for i, s in enumerate(shots):
        messages += [{"role": "user", "content": (header if i == 0 else "") + question_block(s, False)},
                     {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": ("" if shots else header) + question_block(item, False)})
    return messages


def dev_shots(dev: Sequence[McItem], shots: int) -> dict[str, list[McItem]]:
    """The first `shots` dev items of every subject, in file order."""
    by_subject: dict[str, list[McItem]] = defaultdict(list)
    for it in dev:
        if len(by_subject[it.subject]) < shots:
            by_subject[it.subject].append(it)
    return by_subject


# ---------------------------------------------------------------------------------------------- scoring

def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score): sound at 0%, 100% and small n, unlike p ± 2se."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    correct: int = 0
    total: int = 0
    chance: float = 0.0  # summed 1/options: the expected number right by guessing

    def add(self, right: bool, options: int) -> None:
        self.correct += int(right)
        self.total += 1
        self.chance += 1 / options

    def to_dict(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.total)
        return {"acc": self.correct / max(self.total, 1), "ci95": [lo, hi], "chance": self.chance / max(self.total, 1),
                "correct": self.correct, "n": self.total}


@dataclass
class McResult:
    overall: Tally = field(default_factory=Tally)
    subjects: dict[str, Tally] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    read: dict = field(default_factory=dict)
    skipped_too_long: int = 0

    def to_dict(self) -> dict:
        return {**self.overall.to_dict(), "subjects": {s: t.to_dict() for s, t in sorted(self.subjects.items())},
                "skipped_too_long": self.skipped_too_long, "read": self.read}


def evaluate_mc(engine, items: Sequence[McItem], *, dev: Sequence[McItem] = (), shots: int = 0, chat: bool = False,
                score: str = "letter", batch_items: int = 256, batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> McResult:
    """Accuracy of `engine`'s picks on `items`; k-shot examples come from `dev` only (the first `shots` of the
    item's subject). An item whose prompt does not fit the context even with fewer examples is skipped and
    counted."""
    if score not in ("letter", "options"):
        raise ZhllmError(f"--score must be letter or options, got {score!r}")
    if shots < 0:
        raise ZhllmError(f"--shots must be >= 0, got {shots}")
    if shots and not dev:
        raise ZhllmError("--shots needs a dev split to take the examples from (--dev FILE)")
    examples = dev_shots(dev, shots)
    short = sorted(s for s in {it.subject for it in items} if len(examples.get(s, [])) < shots)
    if short:
        raise ZhllmError(f"--dev has fewer than {shots} items for subject(s) {', '.join(short[:5])}"
                         f"{' ...' if len(short) > 5 else ''}; lower --shots or give a dev file with them")
    result = McResult()
    # One subject's k-shot prompts start with the same header and examples, which the engine runs once per
    # batch (Engine.score's shared prefixes): keep each subject's items together, report in input order.
    first = {}
    for it in items:
        first.setdefault(it.subject, len(first))
    order = sorted(range(len(items)), key=lambda i: first[items[i].subject])
    rows: dict[int, dict] = {}
    for start in range(0, len(order), batch_items):
        chunk = order[start:start + batch_items]
        prompts, conts, owners = [], [], []
        for index in chunk:
            it = items[index]
            ids = _fitting_prompt(engine, it, examples.get(it.subject, []), chat, score)
            if ids is None:
                result.skipped_too_long += 1
                continue
            texts = list(it.letters) if score == "letter" else list(it.options)
            prompts += [ids] * len(texts)
            conts += texts
            owners.append((index, it, len(texts)))
        scored = score_continuations(engine, prompts, conts, batch_size) if prompts else []
        k = 0
        for index, it, n in owners:
            values = scored[k:k + n]
            if score == "options":
                values = [v / max(len(text), 1) for v, text in zip(values, it.options)]
            k += n
            pick = it.letters[max(range(n), key=values.__getitem__)]
            right = pick == it.answer
            result.overall.add(right, n)
            result.subjects.setdefault(it.subject, Tally()).add(right, n)
            rows[index] = {"where": it.where, "subject": it.subject, "answer": it.answer, "pick": pick,
                           "scores": values, "correct": right}
        if progress is not None:
            progress(len(chunk))
    result.rows = [rows[i] for i in sorted(rows)]
    return result


def _fitting_prompt(engine, item: McItem, shots: list[McItem], chat: bool, score: str) -> list[int] | None:
    """The prompt's token ids with as many of the examples as fit the context beside the longest answer."""
    from ..infer.prompts import encode_prompt
    from ..tokenizer.encode import encode_text
    texts = item.letters if score == "letter" else item.options
    answer_tokens = max(len(encode_text(engine.tokenizer, t)) for t in texts)
    for n in range(len(shots), -1, -1):
        ids = encode_prompt(engine.tokenizer, build_prompt(item, shots[:n], chat))
        if len(ids) + answer_tokens <= engine.max_seq_len:
            return ids
    return None
