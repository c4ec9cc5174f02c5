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
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

from ..errors import ZhllmError
from .formats import (FORMATS, RECORD_READERS, SUPPORTED_SUFFIXES, TxtMode, file_format, is_supported,
                      iter_file_lines)
from .read_stats import (EMPTY, INVALID_JSON, INVALID_UTF8, MISSING_FIELD, NOT_A_STRING,  # noqa: F401 (API)
                         NOT_AN_OBJECT, UNREADABLE, FileSlice, ReadStats, Record)

__all__ = ["Record", "FileSlice", "ReadStats", "expand_inputs", "plan_slices", "iter_records", "iter_text_records",
           "iter_texts", "iter_file_records", "iter_file_lines", "extract_text", "file_format", "is_supported",
           "FORMATS", "DEFAULT_TEXT_FIELDS", "METADATA_FILES", "TxtMode"]

# Fields tried, in order, when the user names none: the usual names for "the document" in open corpora.
DEFAULT_TEXT_FIELDS = ("text", "content", "completion", "document", "body", "article", "passage", "sentence")
# Metadata that zhllm (and HF) output directories carry next to their data: never corpus text, so a
# directory or glob input skips them (`zhllm data clean` writes report.json beside its shards). Name such
# a file exactly to read it anyway.
METADATA_FILES = frozenset({"report.json", "meta.json", "config.json", "generation_config.json",
                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})

_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------- inputs

def expand_inputs(inputs: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files, directories (recursive, supported types, sorted) and globs -> file list, in the order given.

    Hidden files and directories (e.g. the `.name.tmp-*` siblings of atomic writes) are skipped, and so
    are METADATA_FILES unless named exactly.
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
                           if Path(f).is_file() and is_supported(f) and Path(f).name not in METADATA_FILES)
        else:
            raise ZhllmError(f"input not found: {text}")
        if not found:
            raise ZhllmError(f"no supported input files in {text} (looked for "
                             f"{', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)")
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
        names = list(data)
        has = ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "") if names else "none"
        # the fields it does have: a parquet or csv with other column names then says which --field to give
        stats.add_bad(rec.where, MISSING_FIELD, f"no field {wanted}; it has {has}", strict)
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
    reader = RECORD_READERS[fmt]
    kwargs = {"txt_mode": txt_mode} if fmt == "txt" else {}
    if part is not None and (part.start or part.end is not None):
        if gz or fmt not in ("jsonl", "txt"):
            raise ZhllmError(f"{path}: byte-range reading needs a plain .jsonl or .txt file")
        kwargs["part"] = part
    last = 0  # line (or record) of the last record read, to say where a truncated file stops
    try:
        for rec in reader(path, gz, strict, stats, **kwargs):
            last = rec.line
            yield rec
    except ZhllmError:
        raise
    except (OSError, EOFError, ValueError, csv.Error, _ArrowError) as e:  # truncated gzip, bad parquet footer...
        unit = "record" if fmt in ("json", "parquet") else "line"
        where, after = (f"{path}:{last + 1}", f"; stops after {unit} {last}") if last else (str(path), "")
        stats.add_bad(where, UNREADABLE, _one_line(e) + after, strict)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


try:
    from pyarrow import ArrowException as _ArrowError
except ImportError:  # pragma: no cover - pyarrow is a dependency; keep the reader usable without it
    class _ArrowError(Exception):
        pass
