"""One reader per file format: jsonl, json (array), parquet, csv, txt, each optionally gzipped.

Each `*_records(path, gz, strict, stats, ...)` yields `Record`s and counts what it must skip in `stats`.
Line formats are read in binary and decoded line by line, so invalid UTF-8 costs one record, not the file.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from ..errors import ZhllmError
from .json_stream import JsonArrayReader
from .read_stats import INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT, FileSlice, ReadStats, Record

FORMATS = ("jsonl", "json", "parquet", "csv", "txt")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
             ".csv": "csv", ".txt": "txt"}
SUPPORTED_SUFFIXES = tuple(sorted(_SUFFIXES))  # each also with .gz
TxtMode = Literal["line", "paragraph"]


def file_format(path: str | Path) -> tuple[str, bool]:
    """('jsonl'|'json'|'parquet'|'csv'|'txt', gzipped) from the file name; ZhllmError if unsupported."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    fmt = _SUFFIXES.get(os.path.splitext(name)[1])
    if fmt is None:
        raise ZhllmError(f"{path}: unsupported file type (expected one of "
                         f"{', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)")
    return fmt, gz


def is_supported(path: str | Path) -> bool:
    try:
        file_format(path)
        return True
    except ZhllmError:
        return False


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
            if text is not None and text.strip():  # blank lines are layout, as in jsonl
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
            for value in JsonArrayReader(fh):
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


RECORD_READERS = {"jsonl": _jsonl_records, "json": _json_array_records, "parquet": _parquet_records,
                  "csv": _csv_records, "txt": _txt_records}
