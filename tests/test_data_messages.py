"""Data command messages that tell the user what happened: empty results say why, summaries add up, and a
truncated file names where it stops."""
import gzip
import json
import re

import pytest

from zhllm.corpus.readers import ReadStats, iter_texts
from zhllm.data.sft_shards import tokenize_sft
from zhllm.data.tokenize import tokenize_corpus
from zhllm.errors import ZhllmError


def test_tokenize_of_a_parquet_with_other_columns_says_which_columns_it_has(tmp_path, tokenizer_dir):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"title": ["一", "二"], "body_text": ["你好", "世界"]}), tmp_path / "docs.parquet")
    with pytest.raises(ZhllmError) as e:
        tokenize_corpus([str(tmp_path / "docs.parquet")], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    message = str(e.value)
    assert "no documents found" in message and "missing_field 2" in message
    assert "docs.parquet:1: missing_field (no field text/content/completion/...; it has title, body_text)" in message


def test_tokenize_sft_summary_record_kinds_add_up(tmp_path, tokenizer_dir):
    rows = [json.dumps({"instruction": f"问题{i}", "output": f"回答{i}"}, ensure_ascii=False) for i in range(10)]
    rows += [json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
                        ensure_ascii=False)]
    rows += ['{"instruction": "", "output": ""}', '{"foo": 1}', json.dumps({"instruction": "长" * 400, "output": "短"})]
    (tmp_path / "chat.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = tokenize_sft([str(tmp_path / "chat.jsonl")], tokenizer_dir, tmp_path / "out", max_len=32,
                          overflow="skip", workers=1, progress=False)
    line = next(r for r in report.table().splitlines() if r.startswith("records"))
    total, parts = re.match(r"records\s+(\d+) \((.*)\)$", line).groups()
    counts = dict((k, int(v)) for k, v in (p.rsplit(" ", 1) for p in parts.split(", ")))
    assert int(total) == 14 and sum(counts.values()) == 14, line
    assert counts["invalid"] == 2 and counts["alpaca"] == 11 and counts["sharegpt"] == 1


@pytest.mark.parametrize("strict", [False, True])
def test_a_truncated_gzip_names_the_line_where_it_stops(tmp_path, strict):
    data = "".join(json.dumps({"text": f"第{i}篇文档"}, ensure_ascii=False) + "\n" for i in range(3000)).encode()
    packed = gzip.compress(data)
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(packed[:len(packed) // 2])
    stats = ReadStats()
    if strict:
        with pytest.raises(ZhllmError, match=r"docs\.jsonl\.gz:(\d+): unreadable_file .*stops after line \d+\)"):
            list(iter_texts([path], strict=True))
        return
    n = sum(1 for _ in iter_texts([path], stats=stats))
    assert 0 < n < 3000 and stats.bad == {"unreadable_file": 1}
    assert stats.examples[0].startswith(f"{path}:{n + 1}: unreadable_file (EOFError")
    assert stats.examples[0].endswith(f"stops after line {n})")
    assert ":0:" not in stats.examples[0]


def test_an_unreadable_file_is_named_without_a_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file at all")
    stats = ReadStats()
    assert list(iter_texts([path], stats=stats)) == []
    assert stats.examples[0].startswith(f"{path}: unreadable_file")
