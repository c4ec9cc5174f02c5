"""Stream records from corpus files (jsonl, json array, parquet, csv, txt; each optionally .gz).

Every reader works in constant memory: line formats are read line by line in binary (so invalid UTF-8 is
a per-line problem, not a crash), JSON arrays are decoded element by element, parquet batch by batch.
Malformed records are data, not a crash (ARCHITECTURE rule 7): they are skipped and counted by reason in a
`ReadStats`, the first few named as `file:line: reason`; with `strict=True` the first one raises a
`ZhllmError` naming file:line.

Work can be split across processes by file, or for plain (uncompressed) `.jsonl`/`.txt` files by byte range
with `plan_slices`: each `FileSlice` starts at a line boundary and knows its first line number, so
`file:line` in reports stays exact.
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Union

from ..errors import ZhllmError

FORMATS = ("jsonl", "json", "parquet", "csv", "txt")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
             ".csv": "csv", ".txt": "txt"}
# Fields tried, in order, when the user names none: the usual names for "the document" in open corpora.
DEFAULT_TEXT_FIELDS = ("text", "content", "completion", "document", "body", "article", "passage", "sentence")
TxtMode = Literal["line", "paragraph"]
# Metadata that zhllm (and HF) output directories carry next to their data: never corpus text, so a
# directory input skips them (`zhllm data clean` writes report.json beside its shards). Name such a file
# explicitly to read it anyway.
METADATA_FILES = frozenset({"report.json", "meta.json", "config.json", "generation_config.json",
                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})

# Reasons a record is skipped (keys of ReadStats.bad).
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty"
UNREADABLE = "unreadable_file"

_CHUNK = 1 << 20


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

    def summary(self) -> str:
        if not self.bad:
            return f"read {self.docs} documents, no bad records"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items()))
        lines = [f"read {self.docs} documents, skipped {self.bad_total} bad records ({reasons})"]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- inputs

def file_format(path: str | Path) -> tuple[str, bool]:
    """('jsonl'|'json'|'parquet'|'csv'|'txt', gzipped) from the file name; ZhllmError if unsupported."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    fmt = _SUFFIXES.get(os.path.splitext(name)[1])
    if fmt is None:
        raise ZhllmError(f"{path}: unsupported file type (expected one of "
                         f"{', '.join(sorted(_SUFFIXES))}, optionally .gz)")
    return fmt, gz


def is_supported(path: str | Path) -> bool:
    try:
        file_format(path)
        return True
    except ZhllmError:
        return False


def expand_inputs(inputs: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files, directories (recursive, supported types, sorted) and globs -> file list, in the order given.

    Hidden files and directories (e.g. the `.name.tmp-*` siblings of atomic writes) and, inside
    directories, METADATA_FILES are skipped.
    An input that matches nothing is a ZhllmError naming it.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        text = str(raw)
        p = Path(text).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_supported(f)
                           and f.name not in METADATA_FILES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            file_format(p)  # a named file of an unknown type is an error, not silently ignored
            found = [p]
        elif glob.has_magic(text):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True)
                           if Path(f).is_file() and is_supported(f))
        else:
            raise ZhllmError(f"input not found: {text}")
        if not found:
            raise ZhllmError(f"no supported input files in {text} (looked for "
                             f"{', '.join(sorted(_SUFFIXES))}, optionally .gz)")
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def plan_slices(path: str | Path, parts: int) -> list[FileSlice]:
    """Cut a plain .jsonl/.txt file into about `parts` line-aligned byte ranges, for parallel readers.

    Other formats (and gzip) cannot be entered mid-file and come back as one whole-file slice.
    Counting newlines to know each slice's first line number costs one sequential read of the file.
    """
    path = Path(path)
    fmt, gz = file_format(path)
    size = path.stat().st_size
    if gz or fmt not in ("jsonl", "txt") or parts <= 1 or size == 0:
        return [FileSlice(path)]
    targets = [size * k // parts for k in range(1, parts)]
    cuts = [0]
    with open(path, "rb") as fh:
        for t in targets:
            if t <= cuts[-1]:
                continue
            fh.seek(t - 1)
            fh.readline()  # move to the start of the next line (a cut at a line start stays there)
            pos = fh.tell()
            if cuts[-1] < pos < size:
                cuts.append(pos)
        cuts.append(size)
        slices, line = [], 1
        fh.seek(0)
        for start, end in zip(cuts, cuts[1:]):
            slices.append(FileSlice(path, start, end, line))
            line += _count_newlines(fh, end - start)
    return slices


def _count_newlines(fh, nbytes: int) -> int:
    count = 0
    while nbytes > 0:
        chunk = fh.read(min(_CHUNK * 8, nbytes))
        if not chunk:
            break
        count += chunk.count(b"\n")
        nbytes -= len(chunk)
    return count


# ---------------------------------------------------------------------------------------------- reading

InputItem = Union[str, Path, FileSlice]


def iter_records(inputs: Iterable[InputItem] | InputItem, strict: bool = False, stats: ReadStats | None = None,
                 txt_mode: TxtMode = "line") -> Iterator[Record]:
    """Records from files, directories, globs or FileSlices; bad records are counted in `stats` and skipped."""
    stats = stats if stats is not None else ReadStats()
    for rec in _iter_all(inputs, strict, stats, txt_mode):
        stats.docs += 1
        yield rec


def iter_text_records(inputs: Iterable[InputItem] | InputItem, field: str | None = None, strict: bool = False,
                      stats: ReadStats | None = None, txt_mode: TxtMode = "line") -> Iterator[tuple[str, Record]]:
    """(text, record) pairs: the text field (`field`, else the first of DEFAULT_TEXT_FIELDS present);
    records without it, with a non-string value or with only whitespace are counted and skipped."""
    stats = stats if stats is not None else ReadStats()
    for rec in _iter_all(inputs, strict, stats, txt_mode):
        text = extract_text(rec, field, strict, stats)
        if text is not None:
            stats.docs += 1
            yield text, rec


def iter_texts(inputs: Iterable[InputItem] | InputItem, field: str | None = None, strict: bool = False,
               stats: ReadStats | None = None, txt_mode: TxtMode = "line") -> Iterator[str]:
    """The text of every good record (see iter_text_records)."""
    for text, _ in iter_text_records(inputs, field, strict, stats, txt_mode):
        yield text


def extract_text(rec: Record, field: str | None, strict: bool, stats: ReadStats) -> str | None:
    """The record's text, or None after counting why there is none."""
    data = rec.data
    if field is not None:
        key = field if field in data else None
    else:
        key = next((k for k in DEFAULT_TEXT_FIELDS if k in data), None)
    if key is None:
        wanted = field or "/".join(DEFAULT_TEXT_FIELDS[:3]) + "/..."
        stats.add_bad(rec.where, MISSING_FIELD, f"no field {wanted}", strict)
        return None
    value = data[key]
    if value is None:  # parquet/csv nulls: the field is there in the schema but not in this record
        stats.add_bad(rec.where, MISSING_FIELD, f"field {key} is null", strict)
        return None
    if not isinstance(value, str):
        stats.add_bad(rec.where, NOT_A_STRING, f"field {key} is {type(value).__name__}", strict)
        return None
    if not value.strip():
        stats.add_bad(rec.where, EMPTY, "", strict)
        return None
    return value


def _iter_all(inputs, strict: bool, stats: ReadStats, txt_mode: TxtMode) -> Iterator[Record]:
    items = [inputs] if isinstance(inputs, (str, Path, FileSlice)) else list(inputs)
    for item in items:
        if isinstance(item, FileSlice):
            yield from iter_file_records(item.path, strict, stats, txt_mode, item)
        else:
            for path in expand_inputs([item]):
                yield from iter_file_records(path, strict, stats, txt_mode)


def iter_file_records(path: str | Path, strict: bool, stats: ReadStats, txt_mode: TxtMode = "line",
                      part: FileSlice | None = None) -> Iterator[Record]:
    """Records of one file (or one slice of it). A file that cannot be read at all counts as one bad record."""
    if txt_mode not in ("line", "paragraph"):
        raise ZhllmError(f"txt mode must be 'line' or 'paragraph', got {txt_mode!r}")
    path = Path(path)
    fmt, gz = file_format(path)
    reader = {"jsonl": _jsonl_records, "json": _json_array_records, "parquet": _parquet_records,
              "csv": _csv_records, "txt": _txt_records}[fmt]
    kwargs = {"txt_mode": txt_mode} if fmt == "txt" else {}
    if part is not None and (part.start or part.end is not None):
        if gz or fmt not in ("jsonl", "txt"):
            raise ZhllmError(f"{path}: byte-range reading needs a plain .jsonl or .txt file")
        kwargs["part"] = part
    try:
        yield from reader(path, gz, strict, stats, **kwargs)
    except ZhllmError:
        raise
    except (OSError, EOFError, ValueError, csv.Error, _ArrowError) as e:  # truncated gzip, bad parquet footer...
        stats.add_bad(f"{path}:0", UNREADABLE, _one_line(e), strict)


def iter_file_lines(path: str | Path, start_byte: int = 0, end_byte: int | None = None,
                    first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line without newline) for lines starting in [start_byte, end_byte).

    `start_byte` must be a line start (as from plan_slices). Gzip files are read whole (no seeking).
    """
    path = Path(path)
    _, gz = file_format(path)
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        if start_byte and not gz:
            fh.seek(start_byte)
        pos = start_byte
        line_no = first_line
        for raw in fh:
            if end_byte is not None and pos >= end_byte:
                break
            pos += len(raw)
            yield line_no, raw.rstrip(b"\r\n")
            line_no += 1


def _decoded_lines(path: Path, gz: bool, strict: bool, stats: ReadStats,
                   part: FileSlice | None) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None if the line is not valid UTF-8 (already counted))."""
    start, end, first = (part.start, part.end, part.first_line) if part else (0, None, 1)
    for line_no, raw in iter_file_lines(path, start, end, first):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            stats.add_bad(f"{path}:{line_no}", INVALID_UTF8, f"byte {e.start}", strict)
            yield line_no, None
            continue
        if line_no == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield line_no, text


def _as_object(value: Any, where: str, strict: bool, stats: ReadStats) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):  # a bare JSON string is a document in its own right
        return {"text": value}
    stats.add_bad(where, NOT_AN_OBJECT, f"got {type(value).__name__}", strict)
    return None


def _jsonl_records(path: Path, gz: bool, strict: bool, stats: ReadStats,
                   part: FileSlice | None = None) -> Iterator[Record]:
    for line_no, text in _decoded_lines(path, gz, strict, stats, part):
        if text is None or not text.strip():
            continue  # blank lines in jsonl are layout, not records
        where = f"{path}:{line_no}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            stats.add_bad(where, INVALID_JSON, e.msg, strict)
            continue
        obj = _as_object(value, where, strict, stats)
        if obj is not None:
            yield Record(obj, path, line_no)


def _txt_records(path: Path, gz: bool, strict: bool, stats: ReadStats, txt_mode: TxtMode = "line",
                 part: FileSlice | None = None) -> Iterator[Record]:
    lines = _decoded_lines(path, gz, strict, stats, part)
    if txt_mode == "line":
        for line_no, text in lines:
            if text is not None:
                yield Record({"text": text}, path, line_no)
        return
    # Paragraph mode: blank lines separate documents; a paragraph with an undecodable line is dropped whole
    # (its line was counted) rather than silently losing a sentence from the middle.
    para: list[str] = []
    first, broken = 0, False
    for line_no, text in lines:
        if text is not None and not text.strip():
            if para and not broken:
                yield Record({"text": "\n".join(para)}, path, first)
            para, broken = [], False
            continue
        if not para and not broken:
            first = line_no
        if text is None:
            broken = True
        else:
            para.append(text)
    if para and not broken:
        yield Record({"text": "\n".join(para)}, path, first)


def _open_text(path: Path, gz: bool) -> io.TextIOWrapper:
    # surrogateescape keeps undecodable bytes as lone surrogates so one bad row is counted, not fatal.
    binary = gzip.open(path, "rb") if gz else open(path, "rb")
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _has_surrogates(values: Iterable[Any]) -> bool:
    for v in values:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _csv_records(path: Path, gz: bool, strict: bool, stats: ReadStats) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KB default
    with _open_text(path, gz) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:  # reads the header row; an empty file has no records
            return
        first_line = reader.line_num + 1
        for row in reader:
            line_no, first_line = first_line, reader.line_num + 1  # a quoted cell may span several lines
            where = f"{path}:{line_no}"
            if _has_surrogates(row.values()):
                stats.add_bad(where, INVALID_UTF8, "", strict)
                continue
            row.pop(None, None)  # extra cells beyond the header have no name to select them by
            yield Record({k: v for k, v in row.items() if v is not None}, path, line_no)


class _JsonArrayReader:
    """Decode the elements of a top-level JSON array one at a time from a text stream (constant memory
    per element: the buffer only ever holds the unread tail of the current element)."""

    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _next_char(self) -> str:
        """Skip whitespace and return the next character without consuming it ('' at EOF)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _expect(self, chars: str, what: str) -> str:
        c = self._next_char()
        if c == "" or c not in chars:
            raise json.JSONDecodeError(f"expected {what}", self.buf, self.pos)
        self.pos += 1
        return c

    def __iter__(self) -> Iterator[Any]:
        if self._next_char() == "\ufeff":
            self.pos += 1
        self._expect("[", "a JSON array")
        if self._next_char() == "]":
            return
        while True:
            yield self._decode_value()
            if self._expect(",]", "',' or ']'") == "]":
                return

    def _decode_value(self) -> Any:
        self._next_char()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # If the element just continues past the buffer, read more (doubling keeps it linear);
                # a real syntax error stops here instead of pulling the rest of a huge file into memory.
                if not self._truncated(e) or not self._grow():
                    raise
                continue
            if end == len(self.buf) and not self.eof and self._grow():
                continue  # a number at the buffer's end may have more digits coming
            self.pos = end
            return value

    def _truncated(self, e: json.JSONDecodeError) -> bool:
        return e.msg.startswith("Unterminated string") or not self.buf[e.pos:].strip()

    def _grow(self) -> bool:
        want = max(len(self.buf) - self.pos, _CHUNK)
        grown = False
        while want > 0 and not self.eof:
            chunk = self.fh.read(min(want, _CHUNK * 16))
            if not chunk:
                self.eof = True
                break
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
            want -= len(chunk)
            grown = True
        return grown


def _json_array_records(path: Path, gz: bool, strict: bool, stats: ReadStats) -> Iterator[Record]:
    """Elements of a top-level array, numbered from 1. A syntax error ends the file: after it the element
    boundaries are unknowable, so the rest is counted as one invalid_json record.

    Many corpora named `.json` are really JSON Lines; a file starting with `{` is read as such."""
    if _first_char(path, gz) == "{":
        yield from _jsonl_records(path, gz, strict, stats)
        return
    with _open_text(path, gz) as fh:
        index = 0
        try:
            for value in _JsonArrayReader(fh, path):
                index += 1
                where = f"{path}:{index}"
                if isinstance(value, dict) and _has_surrogates(v for v in value.values()):
                    stats.add_bad(where, INVALID_UTF8, "", strict)
                    continue
                if isinstance(value, str) and _has_surrogates([value]):
                    stats.add_bad(where, INVALID_UTF8, "", strict)
                    continue
                obj = _as_object(value, where, strict, stats)
                if obj is not None:
                    yield Record(obj, path, index)
        except json.JSONDecodeError as e:
            stats.add_bad(f"{path}:{index + 1}", INVALID_JSON, e.msg, strict)


def _first_char(path: Path, gz: bool) -> str:
    with _open_text(path, gz) as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip(" \t\r\n\ufeff")
            if stripped:
                return stripped[0]


def _parquet_records(path: Path, gz: bool, strict: bool, stats: ReadStats) -> Iterator[Record]:
    import pyarrow.parquet as pq
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        pf = pq.ParquetFile(fh)
        index = 0
        for batch in pf.iter_batches(batch_size=1024):  # one small batch in memory at a time
            for row in batch.to_pylist():
                index += 1
                yield Record(row, path, index)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


try:
    from pyarrow import ArrowException as _ArrowError
except ImportError:  # pragma: no cover - pyarrow is a dependency; keep the reader usable without it
    class _ArrowError(Exception):
        pass
