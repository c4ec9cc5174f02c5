"""`zhllm data tokenize`: exact contents, worker-independent bytes, resume, stable val split, K-way parts."""
import json
import multiprocessing
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data
from zhllm.cli import main
from zhllm.data import tokenize as tk
from zhllm.corpus.readers import iter_texts
from zhllm.data.shard_dir import tokenizer_fingerprint
from zhllm.data.shards import PackedTokenDataset, ShardDirectory
from zhllm.errors import ZhllmError
from zhllm.tokenizer.load import load_tokenizer

SMALL = dict(unit_chars=300, shard_tokens=1500, progress=False)  # many units and several shards


@pytest.fixture(scope="module")
def docs(corpus):
    out = [f"{t} 第{i}条" for i, t in enumerate(corpus)]
    out[7] = "数据里的<|im_end|>只是普通文字"  # rule 8: never a control token
    return out


@pytest.fixture
def inputs(tmp_path, docs):
    """Two input files in different formats; the reader order is a.jsonl then b.txt."""
    d = tmp_path / "in"
    d.mkdir()
    half = len(docs) // 2
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs[:half]),
                               encoding="utf-8")
    (d / "b.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in docs[half:]), encoding="utf-8")
    return d


def read_docs(d: ShardDirectory, split: str) -> list[list[int]]:
    return [d.document(split, k).tolist() for k in range(d.meta["splits"][split]["documents"])]


def file_bytes(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def expected_docs(inputs, tokenizer_dir, val_fraction):
    """What the shards must hold, computed independently with the HF tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    out = {"train": [], "val": []}
    for text in iter_texts([inputs]):
        ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        out["val" if tk.is_validation(text, val_fraction) else "train"].append(ids + [tok.eos_token_id])
    return out


def test_shards_hold_exactly_the_encoded_documents(tmp_path, inputs, tokenizer_dir):
    report = tk.tokenize_corpus([str(inputs)], tokenizer_dir, tmp_path / "out", val_fraction=0.2, workers=1,
                                **SMALL)
    d = ShardDirectory(tmp_path / "out")
    want = expected_docs(inputs, tokenizer_dir, 0.2)
    assert read_docs(d, "train") == want["train"] and read_docs(d, "val") == want["val"]
    assert 10 < len(want["val"]) < 70 and report.complete
    assert d.meta["splits"]["train"]["shards"] > 2 and d.dtype == np.uint16
    assert not set().union(*want["train"]) & {1, 2}  # <|im_start|>/<|im_end|> ids never come from data
    assert load_tokenizer(d.tokenizer_dir).get_vocab() == load_tokenizer(tokenizer_dir).get_vocab()
    # the same fingerprint whether the tokenizer is read by transformers or by tokenizers alone
    assert d.meta["tokenizer_sha256"] == tokenizer_fingerprint(load_tokenizer(tokenizer_dir))
    assert d.meta["splits"]["train"]["bytes"] == sum(
        len(t.encode()) for t in iter_texts([inputs]) if not tk.is_validation(t, 0.2))


def test_worker_count_does_not_change_a_byte(tmp_path, inputs, tokenizer_dir):
    for w in (1, 2):
        tk.tokenize_corpus([str(inputs)], tokenizer_dir, tmp_path / f"w{w}", val_fraction=0.1, workers=w, **SMALL)
    assert file_bytes(tmp_path / "w1") == file_bytes(tmp_path / "w2")


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path, inputs, tokenizer_dir, monkeypatch, workers):
    clean = tmp_path / "clean"
    tk.tokenize_corpus([str(inputs)], tokenizer_dir, clean, val_fraction=0.1, workers=1, **SMALL)
    real_commit, commits = tk._Group.commit, []

    def crash_on_third(group):
        if len(commits) == 2:
            raise KeyboardInterrupt  # as if the machine stopped mid-group
        commits.append(group.seq)
        real_commit(group)

    monkeypatch.setattr(tk._Group, "commit", crash_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=workers, **SMALL)
    assert not (out / "meta.json").exists() and not list(out.glob(".*.tmp-*"))
    assert sorted(p.name for p in out.glob("done-*")) == ["done-00000.json", "done-00001.json"]
    with pytest.raises(ZhllmError, match="half-written"):
        ShardDirectory(out)
    # debris of a harder crash: a renamed shard whose group marker was never written, and a temp file
    (out / "train-00002.bin").write_bytes(b"junk")
    (out / ".train-00002.idx.tmp-dead").write_bytes(b"junk")
    monkeypatch.setattr(tk._Group, "commit", real_commit)
    report = tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=workers, **SMALL)
    assert report.units_resumed > 0 and report.units_done > 0
    assert file_bytes(out) == file_bytes(clean)
    again = tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=workers, **SMALL)
    assert again.units_done == 0 and file_bytes(out) == file_bytes(clean)


_REAL_TOKENIZE_UNIT = tk.tokenize_unit


def _die_on_marked_unit(texts):
    """Stands in for tokenize_unit in a forked worker: the process vanishes as if OOM-killed."""
    if any("第150条" in t for t in texts):
        os._exit(9)
    return _REAL_TOKENIZE_UNIT(texts)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork workers")
def test_killed_worker_is_a_clear_error_and_the_rerun_completes(tmp_path, inputs, tokenizer_dir, monkeypatch):
    clean, out = tmp_path / "clean", tmp_path / "out"
    tk.tokenize_corpus([str(inputs)], tokenizer_dir, clean, val_fraction=0.1, workers=1, **SMALL)
    monkeypatch.setattr(tk, "tokenize_unit", _die_on_marked_unit)
    with pytest.raises(ZhllmError, match="worker process died"):
        tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=2, **SMALL)
    assert list(out.glob("done-*")) and not (out / "meta.json").exists()
    monkeypatch.setattr(tk, "tokenize_unit", _REAL_TOKENIZE_UNIT)
    tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=2, **SMALL)
    assert file_bytes(out) == file_bytes(clean)


def test_val_split_is_a_stable_hash_of_the_text(docs):
    picks = [tk.is_validation(t, 0.3) for t in docs]
    assert picks == [tk.is_validation(t, 0.3) for t in docs]
    assert 0.15 < np.mean(picks) < 0.45
    assert all(tk.is_validation(t, 0.5) for t, p in zip(docs, picks) if p)  # monotone in the fraction
    assert not any(tk.is_validation(t, 0.0) for t in docs)


def test_k_way_parts_cover_every_document_once(tmp_path, inputs, tokenizer_dir):
    out, K = tmp_path / "parts", 3
    for i in range(K):
        report = tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=1,
                                    num_shards=K, shard_index=i, **SMALL)
        assert report.complete == (i == K - 1)
        if i < K - 1:
            with pytest.raises(ZhllmError, match="not finished"):
                ShardDirectory(out)
    d = ShardDirectory(out)
    want = expected_docs(inputs, tokenizer_dir, 0.1)
    for split in ("train", "val"):
        assert Counter(map(tuple, read_docs(d, split))) == Counter(map(tuple, want[split]))
    assert any(n.startswith("train-001of003-") for n in (s["name"] for s in d.meta["shards"]))
    assert PackedTokenDataset([out], seq_len=16).num_tokens == d.meta["splits"]["train"]["tokens"]

    # machines without a shared disk: each part in its own directory, copied together, any part rerun
    merged = tmp_path / "merged"
    for i in range(K):
        tk.tokenize_corpus([str(inputs)], tokenizer_dir, tmp_path / f"m{i}", val_fraction=0.1, workers=1,
                           num_shards=K, shard_index=i, **SMALL)
        shutil.copytree(tmp_path / f"m{i}", merged, dirs_exist_ok=True)
    assert tk.tokenize_corpus([str(inputs)], tokenizer_dir, merged, val_fraction=0.1, workers=1,
                              num_shards=K, shard_index=0, **SMALL).complete
    assert file_bytes(merged) == file_bytes(out)


def test_rerun_with_other_settings_is_refused(tmp_path, inputs, tokenizer_dir):
    out = tmp_path / "out"
    tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.1, workers=1, **SMALL)
    with pytest.raises(ZhllmError, match="different val_fraction"):
        tk.tokenize_corpus([str(inputs)], tokenizer_dir, out, val_fraction=0.2, workers=1, **SMALL)


def test_cli_tokenize_inspect_and_one_line_errors(tmp_path, inputs, tokenizer_dir, capsys):
    out = tmp_path / "out"
    assert main(["data", "tokenize", "-i", str(inputs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--val-fraction", "0.1", "--workers", "1", "--quiet"]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["data", "inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "uint16" in shown and "train document 0" in shown and "今天天气很好" in shown
    bad_runs = [["--input", str(tmp_path / "missing.jsonl")], ["--input", str(inputs), "--val-fraction", "1.5"],
                ["--input", str(inputs), "--num-shards", "2", "--shard-index", "2"]]
    for extra in bad_runs:
        code = main(["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("zhllm: error:") and err.count("\n") == 1, err
    for cmd in (["data", "tokenize", "--help"], ["data", "inspect", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0


def test_real_prose_with_minimind_tokenizer(tmp_path):
    src = shared_data("pretrain/web_wiki_news_zh.jsonl")
    tok_dir = shared_data("tokenizers/minimind")
    sample = tmp_path / "sample.jsonl"
    with open(src, encoding="utf-8") as fh:
        sample.write_text("".join(next(fh) for _ in range(400)), encoding="utf-8")
    tk.tokenize_corpus([str(sample)], tok_dir, tmp_path / "out", val_fraction=0.05, workers=2,
                       unit_chars=20_000, progress=False)
    d = ShardDirectory(tmp_path / "out")
    want = expected_docs(sample, tok_dir, 0.05)
    assert read_docs(d, "train") == want["train"] and read_docs(d, "val") == want["val"]
    assert d.meta["vocab_size"] == 6400 and d.dtype == np.uint16
    ds = PackedTokenDataset([tmp_path / "out"], seq_len=256)
    assert 2.0 < ds.bytes_per_token < 5.0 and len(ds) > 100
