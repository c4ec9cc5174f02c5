"""`zhllm data clean --num-shards K --shard-index I` + `zhllm data clean-merge`: the same bytes as one run."""
import json
from itertools import islice
from pathlib import Path

import pytest

from conftest import shared_data
from test_clean import synthetic_docs, write_jsonl
from zhllm.cli import main
from zhllm.data.clean import CleanConfig, clean_corpus
from zhllm.data.clean_split import PART_COMMAND, clean_part, merge_clean_parts
from zhllm.data.dedup import DedupConfig
from zhllm.errors import ConfigError, ZhllmError
from zhllm.outputs import read_marker

TIMING = ("seconds", "docs_per_second")


def split_corpus(tmp_path: Path) -> list[Path]:
    """Two files of documents, then copies of some: with one-record work units (unit_chars=1) record r goes to
    part r % K, and each copy is placed so that for K = 2 and 3 it sits in another part than its original."""
    docs = synthetic_docs(40, seed=3)
    rows = [{"text": t, "source": f"s{i % 3}"} for i, t in enumerate(docs)]
    used = set()
    for j in range(13):
        r = len(rows)
        i = next(i for i in range(40) if i not in used and (r - i) % 2 and (r - i) % 3)
        used.add(i)
        if j % 3:   # an exact copy (re-wrapped), else a near copy (one character changed, no source)
            rows.append({"text": docs[i].replace("。", "。\n", 2), "source": "copy"})
        else:
            rows.append({"text": docs[i][:150] + "变" + docs[i][151:]})
    rows += [{"text": "短"}, {"text": "哈" * 200}]                 # too short, repeated characters
    first = write_jsonl(tmp_path / "a.jsonl", rows[:30])
    second = tmp_path / "b.jsonl"
    second.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[30:]) + "not json\n"
                      + json.dumps({"nope": 1}) + "\n", encoding="utf-8")
    return [first, second]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "report.json"}


def report_without_timing(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {k: v for k, v in report.items() if k not in TIMING}


def split_and_merge(inputs, tmp_path: Path, num_shards: int, cfg=None, **part_args) -> dict:
    parts = []
    for index in reversed(range(num_shards)):   # any order: the merge sorts parts by index
        parts.append(tmp_path / f"part{index}of{num_shards}")
        clean_part(inputs, parts[-1], num_shards, index, cfg, progress=False, **part_args)
    return merge_clean_parts(parts, tmp_path / f"merged{num_shards}", progress=False)


@pytest.mark.parametrize("num_shards,unit_chars", [(1, 1), (2, 1), (3, 1), (3, 700), (3, 1 << 20)])
def test_split_then_merge_is_byte_identical_to_one_run(tmp_path, num_shards, unit_chars):
    inputs = split_corpus(tmp_path)
    cfg = CleanConfig(docs_per_shard=9)
    single = clean_corpus(inputs, tmp_path / "single", cfg, progress=False)
    assert single["removed"] == {"exact_duplicate": 8, "near_duplicate": 5, "too_short": 1, "repeated_chars": 1}
    assert len(single["shards"]) == 5 and single["read"]["bad_total"] == 2
    merged = split_and_merge(inputs, tmp_path, num_shards, cfg, unit_chars=unit_chars,
                             workers=2 if unit_chars == 700 else 1)
    out = tmp_path / f"merged{num_shards}"
    assert output_files(out) == output_files(tmp_path / "single")
    assert report_without_timing(out) == report_without_timing(tmp_path / "single")
    assert {k: v for k, v in merged.items() if k not in TIMING} == report_without_timing(out)
    assert read_marker(tmp_path / f"part0of{num_shards}")["command"] == PART_COMMAND


def test_every_planted_copy_is_in_another_part_than_its_original(tmp_path):
    """What makes the byte-identity test meaningful: with one-record units no part sees both copies."""
    inputs = split_corpus(tmp_path)
    rows = [json.loads(line) for path in inputs for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("{") and "text" in line]
    pairs = 0
    for r, row in enumerate(rows):
        for o, other in enumerate(rows[:r]):
            if row["text"].replace("\n", "") == other["text"] or row["text"][:150] == other["text"][:150]:
                assert (r - o) % 2 and (r - o) % 3
                pairs += 1
    assert pairs == 13
    for index in range(2):
        part = clean_part(inputs, tmp_path / f"p{index}", 2, index, progress=False, unit_chars=1)
        assert set(part["removed"]) <= {"too_short", "repeated_chars"}   # a part decides no duplicate


@pytest.mark.parametrize("dedup", [DedupConfig(exact=False, near=False), DedupConfig(near=False)])
def test_merge_matches_one_run_with_dedup_kinds_off(tmp_path, dedup):
    inputs = split_corpus(tmp_path)
    cfg = CleanConfig(dedup=dedup)
    clean_corpus(inputs, tmp_path / "single", cfg, progress=False)
    split_and_merge(inputs, tmp_path, 2, cfg, unit_chars=1)
    assert output_files(tmp_path / "merged2") == output_files(tmp_path / "single")
    assert report_without_timing(tmp_path / "merged2") == report_without_timing(tmp_path / "single")


def test_merge_refuses_incomplete_or_mixed_parts(tmp_path):
    inputs = split_corpus(tmp_path)
    for index in range(3):
        clean_part(inputs, tmp_path / f"p{index}", 3, index, progress=False, unit_chars=1)
    with pytest.raises(ZhllmError, match=r"got 2 of 3 parts: --shard-index 1 missing"):
        merge_clean_parts([tmp_path / "p0", tmp_path / "p2"], tmp_path / "out", progress=False)
    with pytest.raises(ZhllmError, match="--shard-index 2 given more than once"):
        merge_clean_parts([tmp_path / "p0", tmp_path / "p2", tmp_path / "p2"], tmp_path / "out", progress=False)
    clean_part(inputs, tmp_path / "other", 3, 1, CleanConfig(t2s=True), progress=False, unit_chars=1)
    with pytest.raises(ZhllmError, match=r"different data clean jobs \(different config\)"):
        merge_clean_parts([tmp_path / "p0", tmp_path / "other", tmp_path / "p2"], tmp_path / "out", progress=False)
    clean_corpus(inputs, tmp_path / "whole", progress=False)
    with pytest.raises(ZhllmError, match=r"holds the output of `zhllm data clean`, not a part"):
        merge_clean_parts([tmp_path / "whole"], tmp_path / "out", progress=False)
    with pytest.raises(ZhllmError, match="is an input of this command"):
        merge_clean_parts([tmp_path / f"p{i}" for i in range(3)], tmp_path / "p0", progress=False)
    (tmp_path / "p2" / "candidates.spill").write_bytes(b"")
    with pytest.raises(ZhllmError, match="p2 is damaged .candidates.spill is missing or has the wrong size"):
        merge_clean_parts([tmp_path / f"p{i}" for i in range(3)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_part_arguments_and_output_policy(tmp_path):
    inputs = split_corpus(tmp_path)
    with pytest.raises(ZhllmError, match=r"--shard-index must be in \[0, 2\)"):
        clean_part(inputs, tmp_path / "p", 2, 2, progress=False)
    with pytest.raises(ConfigError, match="needs dedup.backend: disk"):
        clean_part(inputs, tmp_path / "p", 2, 0, CleanConfig(dedup=DedupConfig(backend="memory")), progress=False)
    clean_part(inputs, tmp_path / "p", 2, 0, progress=False)
    clean_part(inputs, tmp_path / "p", 2, 0, progress=False)   # its own output: re-written
    with pytest.raises(ZhllmError, match=r"holds the output of `zhllm data clean --num-shards`; pass --overwrite"):
        clean_corpus(inputs, tmp_path / "p", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ZhllmError, match="was not written by zhllm"):
        clean_part(inputs, tmp_path / "mine", 2, 0, progress=False, overwrite=True)


def test_cli_two_machines_then_merge(tmp_path, capsys):
    inputs = split_corpus(tmp_path)
    files = [str(p) for p in inputs]
    assert main(["data", "clean", "-i", *files, "-o", str(tmp_path / "single"), "--no-progress"]) == 0
    for index in range(2):
        code = main(["data", "clean", "-i", *files, "-o", str(tmp_path / f"p{index}"), "--no-progress",
                     "--num-shards", "2", "--shard-index", str(index), "--workers", "1"])
        assert code == 0 and f"part {index} of 2" in capsys.readouterr().out
    code = main(["data", "clean-merge", "--parts", str(tmp_path / "p1"), str(tmp_path / "p0"),
                 "-o", str(tmp_path / "merged"), "--no-progress"])
    assert code == 0 and "near_dedup" in capsys.readouterr().out
    assert output_files(tmp_path / "merged") == output_files(tmp_path / "single")
    assert report_without_timing(tmp_path / "merged") == report_without_timing(tmp_path / "single")


@pytest.mark.parametrize("args,message", [
    (["--num-shards", "2"], "--num-shards needs --shard-index"),
    (["--shard-index", "1"], "--shard-index needs --num-shards"),
    (["--num-shards", "2", "--shard-index", "5"], "--shard-index must be in [0, 2)"),
])
def test_cli_split_errors_are_one_line(tmp_path, capsys, args, message):
    inputs = split_corpus(tmp_path)
    code = main(["data", "clean", "-i", str(inputs[0]), "-o", str(tmp_path / "p"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_real_prose_split_in_two(tmp_path):
    src = shared_data("pretrain/web_wiki_news_zh.jsonl")
    with open(src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, 600)]
    rows += [{"text": r["text"] + "\n", "source": "planted"} for r in rows[:300:10] if len(r["text"]) > 50]
    path = write_jsonl(tmp_path / "sample.jsonl", rows)
    single = clean_corpus([path], tmp_path / "single", progress=False)
    split_and_merge([path], tmp_path, 2, unit_chars=20_000)
    assert single["removed"]["exact_duplicate"] >= 20
    assert output_files(tmp_path / "merged2") == output_files(tmp_path / "single")
    assert report_without_timing(tmp_path / "merged2") == report_without_timing(tmp_path / "single")
