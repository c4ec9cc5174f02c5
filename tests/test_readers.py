"""Corpus readers: every format (plain and .gz), bad-record accounting with file:line, strict mode, slices."""
import csv
import gzip
import json
from pathlib import Path

import pytest

from zhllm.corpus.readers import (FileSlice, ReadStats, expand_inputs, iter_file_lines, iter_records,
                                iter_text_records, iter_texts, plan_slices)
from zhllm.errors import ZhllmError

DOCS = ["今天天气很好。", "北京是中国的首都。", "机器学习是人工智能的一个分支。"]


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def write_jsonl(path: Path, rows) -> Path:
    with _open(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_json(path: Path, rows) -> Path:
    with _open(path, "wt") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with _open(path, "wt") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_txt(path: Path, text: str) -> Path:
    with _open(path, "wt") as f:
        f.write(text)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=2)
    with _open(path, "wb") as f:
        f.write(buf.getvalue().to_pybytes())
    return path


@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "txt", "parquet"])
def test_every_format_reads_all_documents(tmp_path, fmt, gz):
    path = tmp_path / f"docs.{fmt}{gz}"
    rows = [{"id": i, "text": t} for i, t in enumerate(DOCS)]
    {"jsonl": lambda: write_jsonl(path, rows), "json": lambda: write_json(path, rows),
     "csv": lambda: write_csv(path, rows), "txt": lambda: write_txt(path, "\n".join(DOCS) + "\n"),
     "parquet": lambda: write_parquet(path, rows)}[fmt]()
    stats = ReadStats()
    pairs = list(iter_text_records([str(path)], stats=stats))
    assert [t for t, _ in pairs] == DOCS
    assert [r.line for _, r in pairs] == ([2, 3, 4] if fmt == "csv" else [1, 2, 3])  # csv line 1 is the header
    assert stats.docs == 3 and stats.bad_total == 0


def test_jsonl_bad_records_counted_by_reason_with_file_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [b'{"text": "good one"}', b'{"text": "broken', b'[1, 2]', b'{"title": "no text"}',
             b'{"text": 42}', b'{"text": "   "}', b'{"text": "caf\xff\xfe"}', b'', b'{"content": "fallback field"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = ReadStats()
    texts = list(iter_texts(path, stats=stats))
    assert texts == ["good one", "fallback field"]
    assert dict(stats.bad) == {"invalid_json": 1, "not_an_object": 1, "missing_field": 1, "not_a_string": 1,
                               "empty": 1, "invalid_utf8": 1}
    assert stats.docs == 2
    assert stats.examples[:2] == [f"{path}:2: invalid_json (Unterminated string starting at)",
                                  f"{path}:3: not_an_object (got list)"]
    assert len(stats.examples) == stats.max_examples
    assert f"{path}:7: invalid_utf8 (byte 13)" in _all_examples(path)


def _all_examples(path) -> list[str]:
    stats = ReadStats(max_examples=100)
    list(iter_texts(path, stats=stats))
    return stats.examples


@pytest.mark.parametrize("line,expected", [
    ('{"text": "a"', "invalid_json"), ('"just a string is fine"', None), ('{"x": 1}', "missing_field"),
    ('{"text": null}', "missing_field"), ('{"text": ["a"]}', "not_a_string"), ('{"text": "\\t\\n"}', "empty")])
def test_strict_names_file_and_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"text": "ok"}', line])
    if expected is None:
        assert len(list(iter_texts(path, strict=True))) == 2
        return
    with pytest.raises(ZhllmError) as e:
        list(iter_texts(path, strict=True))
    assert str(e.value).startswith(f"{path}:2: {expected}")


def test_invalid_utf8_is_counted_per_line_in_txt_and_csv(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes("第一行\n".encode() + b"bad \xc3\x28 line\n" + "第三行\n\n \n".encode())
    stats = ReadStats()
    assert list(iter_texts(txt, stats=stats)) == ["第一行", "第三行"]
    assert stats.bad == {"invalid_utf8": 1} and stats.examples[0].startswith(f"{txt}:2: invalid_utf8")
    data = tmp_path / "a.csv"
    data.write_bytes(b"id,text\n1,ok\n2,bad \xff\n3,\"two\nlines\"\n4,\n")
    stats = ReadStats()
    pairs = list(iter_text_records(data, stats=stats))
    assert [(t, r.line) for t, r in pairs] == [("ok", 2), ("two\nlines", 4)]
    assert stats.bad == {"invalid_utf8": 1, "empty": 1}
    assert stats.examples == [f"{data}:3: invalid_utf8", f"{data}:6: empty"]


def test_txt_paragraph_mode(tmp_path):
    path = write_txt(tmp_path / "p.txt.gz", "第一段第一行\n第一段第二行\n\n\n第二段\n  \n第三段\n")
    records = list(iter_records(path, txt_mode="paragraph"))
    assert [(r.data["text"], r.line) for r in records] == [("第一段第一行\n第一段第二行", 1), ("第二段", 5),
                                                           ("第三段", 7)]


def test_json_array_streams_and_stops_at_syntax_error(tmp_path, monkeypatch):
    import zhllm.corpus.json_stream as json_stream
    monkeypatch.setattr(json_stream, "CHUNK_CHARS", 5)  # force refills in the middle of strings and numbers
    good = write_json(tmp_path / "a.json", [{"text": "长" * 40, "n": 1234567890123}, "bare string", 3.5,
                                           {"text": 'quote " and \\ backslash'}])
    stats = ReadStats()
    assert list(iter_texts(good, stats=stats)) == ["长" * 40, "bare string", 'quote " and \\ backslash']
    assert stats.bad == {"not_an_object": 1} and stats.examples == [f"{good}:3: not_an_object (got float)"]
    bad = tmp_path / "b.json"
    bad.write_text('[{"text": "a"}, {"text": "b" oops}, {"text": "c"}]')
    stats = ReadStats()
    assert list(iter_texts(bad, stats=stats)) == ["a"]
    assert stats.bad == {"invalid_json": 1} and stats.examples[0].startswith(f"{bad}:2: invalid_json")


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"text": d} for d in DOCS])
    assert list(iter_texts(path)) == DOCS


def test_field_selection_and_parquet_nulls(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"body": "甲", "text": "x"}, {"body": None, "text": "y"},
                                                  {"body": "丙", "text": "z"}])
    stats = ReadStats()
    assert list(iter_texts(path, field="body", stats=stats)) == ["甲", "丙"]
    assert stats.examples == [f"{path}:2: missing_field (field body is null)"]


def test_unreadable_file_is_counted_not_a_traceback(tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])  # truncated gzip stream
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "b"}])
    stats = ReadStats()
    assert list(iter_texts([broken, garbage, good], stats=stats))[-1] == "b"
    assert stats.bad["unreadable_file"] == 2
    assert stats.examples[-1].startswith(f"{garbage}: unreadable_file (ArrowInvalid")  # no record was read
    with pytest.raises(ZhllmError, match="broken.jsonl.gz"):
        list(iter_texts([broken], strict=True))


def test_expand_inputs_dirs_globs_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    a = write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    b = write_txt(tmp_path / "sub" / "a.txt.gz", "y\n")
    write_txt(tmp_path / ".hidden" / "c.txt", "z\n")
    (tmp_path / "notes.md").write_text("ignored in directories")
    (tmp_path / "report.json").write_text('{"docs": 1}')  # metadata of a zhllm output directory
    assert expand_inputs([str(tmp_path)]) == [a, b]
    assert expand_inputs([str(tmp_path / "*.json*")]) == [a]
    assert expand_inputs([str(tmp_path / "report.json")]) == [tmp_path / "report.json"]
    assert expand_inputs([str(tmp_path / "**" / "*.gz"), str(a), str(a)]) == [b, a]
    with pytest.raises(ZhllmError, match="input not found: .*missing.jsonl"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ZhllmError, match=r"no supported input files in .*\*.parquet"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(ZhllmError, match="unsupported file type"):
        expand_inputs([str(tmp_path / "notes.md")])


def test_slices_cover_every_line_exactly_once(tmp_path):
    rows = [{"text": f"文档{i}" * (i % 7 + 1)} for i in range(500)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    slices = plan_slices(path, 4)
    assert len(slices) == 4 and slices[0].start == 0 and slices[-1].end == path.stat().st_size
    records = [r for s in slices for r in iter_records(s)]
    assert [r.data for r in records] == rows
    assert [r.line for r in records] == list(range(1, 501))
    lines = list(iter_file_lines(path, slices[1].start, slices[1].end, slices[1].first_line))
    assert lines[0][0] == slices[1].first_line and json.loads(lines[0][1]) == rows[slices[1].first_line - 1]
    assert plan_slices(write_json(tmp_path / "a.json", rows), 4) == [FileSlice(tmp_path / "a.json")]


def test_stats_merge_and_round_trip():
    a, b = ReadStats(docs=3), ReadStats(docs=2)
    a.add_bad("f:1", "empty")
    for i in range(6):
        b.add_bad(f"g:{i}", "invalid_json", "x")
    merged = a.merge(b)
    assert merged.docs == 5 and merged.bad == {"empty": 1, "invalid_json": 6}
    assert len(merged.examples) == merged.max_examples and merged.examples[0] == "f:1: empty"
    assert ReadStats.from_dict(merged.to_dict()).to_dict() == merged.to_dict()
    assert "skipped 7 bad records (empty 1, invalid_json 6)" in merged.summary()
