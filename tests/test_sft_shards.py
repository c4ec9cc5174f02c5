"""`zhllm data tokenize-sft` and training from SFT shards: same batches and losses as from the chat files,
worker-independent bytes, one-line errors, atomic output, and the real SFT sample."""
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS, shared_data
from zhllm.cli import main
from zhllm.data import chat
from zhllm.data.chat import IGNORE
from zhllm.data.sft_batches import build_sft_datasets
from zhllm.data.sft_shards import UNIT_RECORDS, open_sft_shards, sft_shard_datasets, tokenize_sft
from zhllm.tokenizer.load import load_tokenizer
from zhllm.train.sft import run_sft

SEQ = 64


def _chat(k: int) -> list[dict]:
    turns = [{"role": "user", "content": f"{k % 9}加{k % 7}等于几？"},
             {"role": "assistant", "content": f"答案：{k % 9 + k % 7}"}]
    if k % 5 == 0:  # multi-turn, some too long for SEQ tokens: earlier turns get dropped
        turns = [{"role": "user", "content": "你好" * (1 + k % 4)},
                 {"role": "assistant", "content": "你好！有什么可以帮你？"}] * 3 + turns
    return ([{"role": "system", "content": "你是一个助手。"}] if k % 3 == 0 else []) + turns


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """Good conversations in two formats plus bad records (counted with file:line); > 2 units per worker."""
    lines = []
    for k in range(5 * UNIT_RECORDS):
        m = _chat(k)
        lines.append({"messages": m} if k % 2 else {"conversations": [{"from": x["role"], "value": x["content"]}
                                                                      for x in m]})
    lines[10] = {"messages": [{"role": "user", "content": "只有问题"}]}  # no assistant turn
    lines[200] = {"messages": [{"role": "user", "content": "长" * 300}, {"role": "assistant", "content": "好"}]}
    text = [json.dumps(x, ensure_ascii=False) for x in lines]
    text[77] = "{broken"
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def file_bytes(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_batches(a, b, rows: int) -> None:
    assert len(a) == len(b) and a.rows == b.rows
    for start, count in ((0, 5), (5, rows - 5), (len(a) - 2, 4)):  # the last window wraps into epoch 2
        x, y = a.batch(start, count), b.batch(start, count)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("packing", [True, False])
def test_shard_batches_equal_the_in_memory_batches(tmp_path, tokenizer_dir, tok, chat_file, packing):
    out = tmp_path / "shards"
    report = tokenize_sft([str(chat_file)], tokenizer_dir, out, max_len=SEQ, val_fraction=0.1, seed=3,
                          workers=1, progress=False)
    train, val, stats, read_stats = build_sft_datasets(tok, [chat_file], SEQ, packing=packing, val_fraction=0.1,
                                                       seed=3, progress=False)
    s_train, s_val, s_stats, s_read = sft_shard_datasets(out, tok, SEQ, packing=packing, seed=3, val_fraction=0.1)
    assert isinstance(s_train.flat_ids, np.memmap) and s_train.flat_ids.dtype == np.uint16  # not materialised
    assert_same_batches(train, s_train, 40)
    assert_same_batches(val, s_val, 8)
    assert s_stats.summary() == stats.summary() and s_read.summary() == read_stats.summary()
    assert stats.truncated > 0 and stats.skipped["too long"] == 1 and stats.skipped["no assistant turn"] == 1
    assert read_stats.bad["invalid_json"] == 1
    assert report.splits["val"]["examples"] == len(val.offsets) - 1
    # the stored mask says exactly which tokens chat.py labels
    examples = chat.encode_records(tok, [{"messages": _chat(k)} for k in range(3)], max_len=SEQ)
    shards = tokenize_sft([str(write_jsonl(tmp_path / "three.jsonl", [{"messages": _chat(k)} for k in range(3)]))],
                          tokenizer_dir, tmp_path / "three", max_len=SEQ, workers=1, progress=False).out_dir
    d = open_sft_shards(shards)
    ids = np.fromfile(shards / "train.bin", dtype=d.dtype).astype(np.int64)
    mask = np.fromfile(shards / "train.mask", dtype=np.uint8)
    assert ids.tolist() == [t for x, _ in examples for t in x]
    assert np.where(mask, ids, IGNORE).tolist() == [t for _, y in examples for t in y]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork workers")
def test_worker_count_does_not_change_the_bytes(tmp_path, tokenizer_dir, chat_file, capsys):
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert main(["data", "tokenize-sft", "--tokenizer", str(tokenizer_dir), "--input", str(chat_file), "--out",
                 str(one), "--max-len", str(SEQ), "--val-fraction", "0.1", "--workers", "1", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"{chat_file}:11" in summary and "records/s" in summary and "trained" in summary
    tokenize_sft([str(chat_file)], tokenizer_dir, two, max_len=SEQ, val_fraction=0.1, workers=2, progress=False)
    assert file_bytes(one) == file_bytes(two)
    assert {"meta.json", "train.bin", "train.mask", "train.idx", "val.bin"} <= set(file_bytes(one))


def _train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"] + [r["val_loss"] for r in rows if "val_loss" in r]


def _sets(model_dir, data, out, *extra) -> list[str]:
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=4",
            "train.batch_size=4", f"train.seq_len={SEQ}", "train.warmup_steps=1", "train.lr=3e-3", "eval.every=4",
            "eval.batches=2", "checkpoint.every=4", "log.every=1", "log.progress=false", "log.tensorboard=false",
            "log.plots=false", "data.val_fraction=0.1", *extra]


def test_sft_from_shards_gives_the_same_losses_without_encoding(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    ref = run_sft("tiny", _sets(tiny_model_dir, chat_file, tmp_path / "ref"))
    shards = tmp_path / "shards"
    tokenize_sft([str(chat_file)], tiny_model_dir, shards, max_len=SEQ, val_fraction=0.1, workers=1, progress=False)

    def no_encoding(*a, **k):
        raise AssertionError("training from shards must not encode")
    monkeypatch.setattr(chat, "encode_records", no_encoding)
    got = run_sft("tiny", _sets(tiny_model_dir, shards, tmp_path / "got", "data.format=auto"))
    assert got["step"] == ref["step"] == 4
    assert len(_train_losses(tmp_path / "ref")) == 5
    assert _train_losses(tmp_path / "got") == _train_losses(tmp_path / "ref")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer_dir, chat_file) -> Path:
    out = tmp_path_factory.mktemp("sh") / "shards"
    tokenize_sft([str(chat_file)], tokenizer_dir, out, max_len=SEQ, val_fraction=0.1, workers=1, progress=False)
    return out


def _sft_cli(tiny_model_dir, data, out, *extra) -> list[str]:
    args = ["sft", "--config", "tiny"]
    for s in _sets(tiny_model_dir, data, out, *extra):
        args += ["--set", s]
    return args


def _one_line_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_tokenizer_mismatch_is_a_one_line_error_naming_both(tmp_path, tiny_model_dir, chat_file, capsys):
    from zhllm.tokenizer.train import train_tokenizer_from_texts
    other = train_tokenizer_from_texts(CORPUS, vocab_size=350, out_dir=tmp_path / "other_tok")
    shards = tmp_path / "shards"
    tokenize_sft([str(chat_file)], other, shards, max_len=SEQ, val_fraction=0.1, workers=1, progress=False)
    err = _one_line_error(capsys, _sft_cli(tiny_model_dir, shards, tmp_path / "run"))
    assert str(other) in err and str(tiny_model_dir) in err


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").unlink(), "no meta.json"),
    (lambda d: (d / "meta.json").write_text("{broken"), "not valid JSON"),
    (lambda d: (d / "meta.json").write_text('{"format": "zhllm-token-shards", "version": 1}'), "not an SFT shard"),
    (lambda d: (d / "train.mask").write_bytes(b"\x01" * 10), "train.mask"),
])
def test_missing_or_invalid_meta_is_a_one_line_error(tmp_path, shard_dir, tiny_model_dir, capsys, damage, message):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    damage(broken)
    assert message in _one_line_error(capsys, _sft_cli(tiny_model_dir, broken, tmp_path / "run"))


@pytest.mark.parametrize("extra, message", [
    (["data.val_fraction=0.2"], "data.val_fraction=0.2"),
    (["data.max_len=32"], "data.max_len=32"),
    (["data.overflow=skip"], "data.overflow=skip"),
    (["train.seq_len=32"], "more than train.seq_len=32"),
])
def test_options_fixed_by_the_shards_are_checked(tmp_path, shard_dir, tiny_model_dir, capsys, extra, message):
    assert message in _one_line_error(capsys, _sft_cli(tiny_model_dir, shard_dir, tmp_path / "run", *extra))


def test_val_fraction_zero_takes_the_stored_split(shard_dir, tok):
    train, val, _, _ = sft_shard_datasets(shard_dir, tok, SEQ, val_fraction=0.0)
    assert val is not None and len(val.offsets) - 1 == open_sft_shards(shard_dir).examples("val") > 0


_KILL_MID_WRITE = """
import os, signal, sys
import zhllm.data.sft_shards as s
real = s.encode_unit
calls = []
def encode_then_die(records):
    calls.append(1)
    if len(calls) == 5:  # four units are already written into the temporary directory
        os.kill(os.getpid(), signal.SIGKILL)
    return real(records)
s.encode_unit = encode_then_die
s.tokenize_sft([sys.argv[1]], sys.argv[2], sys.argv[3], max_len=64, workers=1, progress=False)
"""


def test_interrupted_write_leaves_no_valid_looking_directory(tmp_path, tokenizer_dir, tiny_model_dir, chat_file,
                                                             shard_dir, capsys):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(chat_file), str(tokenizer_dir), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    [debris] = tmp_path.glob(".out.tmp-*")
    assert (debris / ".all.bin").stat().st_size > 0  # it really died mid-write
    assert "no meta.json" in _one_line_error(capsys, _sft_cli(tiny_model_dir, debris, tmp_path / "run"))
    # a killed rewrite keeps the previous complete directory, untouched
    import shutil
    shutil.copytree(shard_dir, out)
    before = file_bytes(out)
    r = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(chat_file), str(tokenizer_dir), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == -9 and file_bytes(out) == before
    # an error (strict mode, bad record) cleans up after itself and names file:line
    strict = tmp_path / "strict"
    err = _one_line_error(capsys, ["data", "tokenize-sft", "--tokenizer", str(tokenizer_dir), "--input",
                                   str(chat_file), "--out", str(strict), "--max-len", str(SEQ), "--strict",
                                   "--workers", "2", "--no-progress"])
    assert f"{chat_file}:11" in err and not strict.exists() and not list(tmp_path.glob(".strict.tmp-*"))


def test_refuses_to_replace_a_directory_that_is_not_shards(tmp_path, tokenizer_dir, chat_file, capsys):
    keep = tmp_path / "mydata"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    err = _one_line_error(capsys, ["data", "tokenize-sft", "--tokenizer", str(tokenizer_dir), "--input",
                                   str(chat_file), "--out", str(keep), "--max-len", "64", "--no-progress"])
    assert "not written by zhllm" in err and (keep / "notes.txt").read_text() == "precious"


def test_real_sft_sample_shards_match_the_in_memory_path(tmp_path):
    """Real alpaca (with history) and multi-turn ShareGPT data, real tokenizer, two workers."""
    tok_dir = shared_data("tokenizers/minimind")
    files = [str(shared_data("sft/oasst1_zh_sft.json")), str(shared_data("sft/sharegpt_zh_multiturn_1k.jsonl"))]
    t0 = time.perf_counter()
    report = tokenize_sft(files, tok_dir, tmp_path / "real", max_len=512, val_fraction=0.05, workers=2,
                          progress=False)
    print(report.table())
    tok = load_tokenizer(tok_dir)
    t1 = time.perf_counter()
    train, val, stats, _ = build_sft_datasets(tok, files, 512, val_fraction=0.05, progress=False)
    print(f"shards {t1 - t0:.1f} s, in memory {time.perf_counter() - t1:.1f} s")
    s_train, s_val, s_stats, _ = sft_shard_datasets(tmp_path / "real", tok, 512, val_fraction=0.05)
    assert stats.summary() == s_stats.summary() and stats.truncated > 100 and stats.formats["sharegpt"] > 900
    assert_same_batches(train, s_train, 64)
    assert_same_batches(val, s_val, 16)
