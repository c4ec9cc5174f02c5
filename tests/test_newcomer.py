"""A newcomer's path through the README: consistent flags, readable progress, the SentencePiece example
at a small vocabulary, and the sample data found where ZHLLM_SHARED_DATA points."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import CORPUS, shared_data
from zhllm.cli import build_parser, main

# Commands that draw progress (bars or lines) while they work.
PROGRESS_COMMANDS = {"data clean", "data tokenize", "data tokenize-sft", "data preview-sft", "tokenizer train",
                     "tokenizer extend"}


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every runnable command, e.g. ("data tokenize", ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_commands(child, f"{prefix} {name}")


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


# ---- item 17: one flag name, one default

def test_every_progress_command_hides_progress_with_the_same_flag():
    commands = dict(leaf_commands(build_parser()))
    assert PROGRESS_COMMANDS <= set(commands)
    for name, parser in commands.items():
        opts = options(parser)
        if name in PROGRESS_COMMANDS or {"--quiet", "--no-progress"} & set(opts):
            assert "--no-progress" in opts and opts["--no-progress"].help != argparse.SUPPRESS, name
            # the old name still works for old scripts, but is not advertised
            assert "--quiet" not in opts or opts["--quiet"].help == argparse.SUPPRESS, name
    args = build_parser().parse_args(["data", "tokenize", "-i", "x", "--tokenizer", "t", "-o", "o", "--quiet"])
    assert args.no_progress is True


def test_every_workers_flag_has_the_same_default():
    defaults = {name: options(p)["--workers"] for name, p in leaf_commands(build_parser()) if "--workers" in options(p)}
    assert {"data clean", "data tokenize", "data tokenize-sft"} <= set(defaults)
    assert {a.default for a in defaults.values()} == {None}, {n: a.default for n, a in defaults.items()}
    assert all("default: all cores" in a.help for a in defaults.values())


def test_tokenizer_eval_takes_several_inputs(tmp_path, tokenizer_dir, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", CORPUS[:3])
    two = write_jsonl(tmp_path / "two.jsonl", CORPUS[3:8])
    assert main(["tokenizer", "eval", "--tokenizer", str(tokenizer_dir), "--input", str(one), str(two)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.split("|")[3].strip() == "8"  # the docs column counts both files


# ---- item 15: the sample data of a fresh clone

def test_shared_data_honours_the_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "x.jsonl").write_text("{}\n")
    monkeypatch.setenv("ZHLLM_SHARED_DATA", str(tmp_path))
    try:
        found = shared_data("pretrain/x.jsonl")
    except pytest.skip.Exception:
        pytest.fail("shared_data ignored ZHLLM_SHARED_DATA")
    assert found == tmp_path / "pretrain" / "x.jsonl"
    with pytest.raises(pytest.skip.Exception):
        shared_data("pretrain/missing.jsonl")


# ---- item 13: SentencePiece at a vocabulary smaller than the characters need

def test_sentencepiece_small_vocab_with_many_rare_characters():
    import sentencepiece as spm

    from zhllm.tokenizer.spm import sentencepiece_to_tokenizers, train_sentencepiece_model
    from zhllm.tokenizer.encode import encode_text

    common = set("".join(CORPUS))
    rare = [chr(c) for c in range(0x4E00, 0x9FA5) if chr(c) not in common][:2000]  # each seen once
    texts = CORPUS * 40 + ["".join(rare[i:i + 20]) for i in range(0, len(rare), 20)]
    # 600 - 256 bytes - 16 specials - <unk> leaves 327 pieces; coverage 99.95% asks for ~2100 characters
    proto = train_sentencepiece_model(texts, vocab_size=600)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == 600
    learnt = [sp.id_to_piece(i) for i in range(600) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    assert sum(len(p) > 1 for p in learnt) >= 0.2 * len(learnt)  # room was left for merges
    tok = sentencepiece_to_tokenizers(proto)
    text = "长江是中国最长的河流" + "".join(rare[-5:])  # rare characters are spelled in byte pieces
    ids = encode_text(tok, text)
    assert sp.unk_id() not in ids and tok.decode(ids) == text


# ---- item 16: progress a log file can hold

@pytest.mark.parametrize("backend", ["bpe", "sentencepiece"])
def test_tokenizer_train_writes_plain_lines_when_not_a_terminal(tmp_path, capfd, backend):
    from zhllm.tokenizer.train import train_tokenizer

    data = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    train_tokenizer([str(data)], tmp_path / "tok", 500, backend=backend, show_progress=True)
    out, err = capfd.readouterr()  # file descriptors: the `tokenizers` trainer writes from Rust
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert all(line.strip() for line in lines), lines
    assert lines[0] == "sampling up to 10,000,000 characters ..."
    assert lines[1].startswith("sampled ") and lines[2].startswith("training ")
    assert re.fullmatch(r"done in \d+\.\d s", lines[-1])


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_bpe_bars_show_real_totals_on_a_terminal(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    script = ("from zhllm.tokenizer.train import train_tokenizer; "
              f"train_tokenizer([{str(data)!r}], {str(tmp_path / 'tok')!r}, 500)")
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    totals = re.findall(r"Pre-processing sequences\D*(\d+)\s*/\s*(\d+)", screen)
    assert totals, screen[-2000:]
    assert all(int(total) > 0 for _, total in totals), totals
