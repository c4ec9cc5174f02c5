"""`checkpoints/latest` and `checkpoints/best` work as model and tokenizer directories, as the README uses them,
both as the symlinks runs write now and as the text-file pointers of older runs."""
import json
import os
import shutil
from pathlib import Path

import pytest

from train_support import make_shards, run_inprocess, write_recipe
from zhllm.cli import main
from zhllm.data.sft_shards import tokenize_sft
from zhllm.errors import ZhllmError
from zhllm.pointers import resolve_model_dir, write_pointer
from zhllm.train.state import checkpoint_dirs, prune_checkpoints, read_pointer

CHAT = [{"instruction": f"{a}加{b}等于几？", "output": f"答案：{a + b}"} for a in range(1, 6) for b in range(1, 6)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dir, corpus) -> Path:
    """A tiny pretraining run: step_3 and step_6 with latest -> step_6 and best -> the lower val loss."""
    root = tmp_path_factory.mktemp("run")
    shards = make_shards(root / "shards", tokenizer_dir, corpus)
    recipe = write_recipe(root / "r.yaml", shards, root / "run", max_steps=6)
    run_inprocess(recipe, "eval.every=3", "checkpoint.every=3", "checkpoint.keep=2")
    return root / "run"


@pytest.fixture(params=["symlink", "text file"])
def run(request, run_dir, tmp_path) -> Path:
    """The run as written, or with its pointers turned into the text files older zhllm versions wrote."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    ckpts = copy / "checkpoints"
    for name in ("latest", "best"):
        assert (ckpts / name).is_symlink() and (ckpts / name).is_dir()
        if request.param == "text file":
            target = os.readlink(ckpts / name)
            (ckpts / name).unlink()
            (ckpts / name).write_text(target + "\n")
    return copy


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CHAT), encoding="utf-8")
    return path


def cli(capsys, *args) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code in (0, None), err
    return out


def test_readme_commands_take_latest_and_best(run, chat_file, capsys, tmp_path):
    ckpts = run / "checkpoints"
    cli(capsys, "generate", ckpts / "latest", "--prompt", "中国", "--max-new-tokens", "4")  # exit 0: it loaded
    assert "加" in cli(capsys, "data", "preview-sft", "--tokenizer", ckpts / "latest", "--input", chat_file,
                       "--n", "1", "--color", "never")
    assert "vocab" in cli(capsys, "model", "info", ckpts / "best").lower()
    tokenize_sft([str(chat_file)], ckpts / "latest", tmp_path / "sft-shards", max_len=64, workers=1, progress=False)
    meta = json.loads((tmp_path / "sft-shards" / "meta.json").read_text())
    assert meta["tokenizer_source"].endswith("step_6")  # the checkpoint itself, not the moving pointer
    assert "tokens" in cli(capsys, "tokenizer", "eval", "--tokenizer", ckpts / "best", "--input", chat_file,
                           "--field", "instruction")


def test_sft_initialises_from_latest(run, chat_file, tmp_path):
    from zhllm.train.sft import run_sft
    summary = run_sft("tiny", [f"model.init_from={run / 'checkpoints' / 'latest'}", f"data.path={chat_file}",
                               f"out_dir={tmp_path / 'sft'}", "train.max_steps=2", "train.batch_size=2",
                               "train.seq_len=64", "train.warmup_steps=1", "data.val_fraction=0.2", "eval.every=2",
                               "eval.batches=1", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false",
                               "log.plots=false"])
    assert summary["step"] == 2
    assert (tmp_path / "sft" / "checkpoints" / "latest" / "tokenizer.json").is_file()


def test_pointers_are_replaced_atomically_and_old_text_files_upgraded(tmp_path):
    for step in (1, 2):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "latest").write_text("step_1\n")  # an older run's pointer
    assert resolve_model_dir(tmp_path / "latest") == tmp_path / "step_1"
    write_pointer(tmp_path, "latest", "step_2")
    assert os.readlink(tmp_path / "latest") == "step_2"
    assert resolve_model_dir(tmp_path / "latest") == tmp_path / "step_2"
    write_pointer(tmp_path, "latest", "step_1")
    assert os.readlink(tmp_path / "latest") == "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1", "step_2"]  # no temp links left
    assert resolve_model_dir(tmp_path / "step_2") == tmp_path / "step_2"


def test_a_pointer_to_a_deleted_step_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "latest").write_text("step_9\n")
    with pytest.raises(ZhllmError, match="points to step_9, which does not exist"):
        resolve_model_dir(tmp_path / "latest")
    os.symlink("step_9", tmp_path / "best")
    assert main(["model", "info", str(tmp_path / "best")]) == 2
    assert "points to step_9" in capsys.readouterr().err


def _fake_ckpt(root: Path, step: int) -> Path:
    d = root / f"step_{step}"
    d.mkdir()
    for f in ("trainer_state.json", "optimizer.pt", "config.json", "model.safetensors"):
        (d / f).write_text("{}")
    return d


@pytest.mark.parametrize("kind", ["symlink", "text file"])
def test_prune_keeps_what_the_pointers_name_and_never_enters_them(tmp_path, kind):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    if kind == "symlink":
        write_pointer(tmp_path, "best", "step_1")
        write_pointer(tmp_path, "latest", "step_2")  # resumed from an older step
    else:
        (tmp_path / "best").write_text("step_1\n")
        (tmp_path / "latest").write_text("step_2\n")
    assert read_pointer(tmp_path, "best") == tmp_path / "step_1"
    prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1, 2, 4]
    assert (tmp_path / "best").exists() and (tmp_path / "latest").exists()
    assert (tmp_path / "step_1" / "config.json").is_file()
