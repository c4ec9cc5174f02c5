"""What the readers produce: `Record`s, `FileSlice`s of work, and `ReadStats` bad-record accounting."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZhllmError

# Reasons a record is skipped (keys of ReadStats.bad).
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty"
UNREADABLE = "unreadable_file"


@dataclass(frozen=True)
class Record:
    """One record: `data` is the parsed object ({"text": ...} for txt); `line` is the 1-based line number
    (jsonl, txt, csv) or record index (json arrays, parquet rows)."""
    data: dict
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class FileSlice:
    """Bytes [start, end) of one plain jsonl/txt file, cut at line boundaries; `end=None` means to EOF."""
    path: Path
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass
class ReadStats:
    """How many documents were read and how many records were skipped, by reason."""
    docs: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, where: str, reason: str, detail: str = "", strict: bool = False) -> None:
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if strict:
            raise ZhllmError(message)
        self.bad[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def merge(self, other: "ReadStats") -> "ReadStats":
        """Add `other` into self (e.g. stats from worker processes) and return self."""
        self.docs += other.docs
        self.bad.update(other.bad)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[:max(room, 0)])
        return self

    def to_dict(self) -> dict:
        return {"docs": self.docs, "bad": dict(sorted(self.bad.items())), "bad_total": self.bad_total,
                "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadStats":
        return cls(docs=d.get("docs", 0), bad=Counter(d.get("bad", {})), examples=list(d.get("examples", [])))

    def why_empty(self) -> str:
        """Why no document came out, for a "no documents" error: the counts and the first bad record."""
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return self.summary().splitlines()[0] + first

    def summary(self) -> str:
        if not self.bad:
            return f"read {self.docs} documents, no bad records"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items()))
        lines = [f"read {self.docs} documents, skipped {self.bad_total} bad records ({reasons})"]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)
