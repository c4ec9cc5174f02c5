"""The one `--out` policy (zhllm/outputs.py) on every command that writes a directory, driven through the CLI.

Each command must: refuse a user's non-empty directory (and leave it untouched), refuse the working directory,
its parents and any path that is, contains or lies inside an input, re-run into its own output, replace another
zhllm command's output only with --overwrite, and clear the staging directories of a killed earlier run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zhllm.cli import main
from zhllm.outputs import MARKER, read_marker

CHAT = [{"messages": [{"role": "user", "content": f"第{i}个问题：今天天气怎么样？"},
                      {"role": "assistant", "content": "今天天气很好，适合去公园散步。"}]} for i in range(8)]


def zhllm(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of `zhllm ARGS`; argparse errors (e.g. an unknown --overwrite) count as exit 2."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def user_dir(path: Path) -> Path:
    """A directory of the user's own: zhllm must never delete it."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "sub" / "notes.txt").write_text("more work")
    return path


def untouched(path: Path) -> bool:
    return ((path / "thesis.txt").read_text() == "four years of work"
            and (path / "sub" / "notes.txt").read_text() == "more work")


def write_corpus(path: Path, texts) -> Path:
    from conftest import CORPUS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts or CORPUS),
                    encoding="utf-8")
    return path


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    from conftest import CORPUS
    return write_corpus(tmp_path / "ud" / "corpus.jsonl", [t * 3 for t in CORPUS[:9]] * 3)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The working directory, holding files of its own."""
    d = tmp_path / "work"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    monkeypatch.chdir(d)
    return d


def killed_writer(out: Path) -> Path:
    """Run atomic_directory(out) in a process that dies mid-write, as a kill would; return what it left."""
    code = ("import os, sys\nfrom zhllm.fsutil import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n"
            "    (tmp / 'part-00000.jsonl.gz').write_bytes(b'half')\n    os._exit(1)\n")
    subprocess.run([sys.executable, "-c", code, str(out)], check=False)
    left = list(out.parent.glob(f".{out.name}.tmp-*"))
    assert len(left) == 1
    return left[0]


def test_data_clean_refuses_user_dirs_inputs_and_the_working_directory(capsys, tmp_path, corpus_file, work):
    ud = corpus_file.parent
    user_dir(ud)
    for inp, out, needle in [(corpus_file, ud, "contains the input"), (corpus_file, ud / "sub", "not written by"),
                             (corpus_file, corpus_file, "is an input"), (ud, ud, "is an input"),
                             (ud, ud / "new", "inside the input directory")]:
        code, err = zhllm(capsys, "data", "clean", "--input", inp, "--out", out, "--no-progress")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    code, err = zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", ud, "--overwrite", "--no-progress")
    assert code == 2 and "contains the input" in err
    code, err = zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", ud / "sub", "--overwrite")
    assert code == 2 and "not even with --overwrite" in err
    for out in (".", work, tmp_path):
        code, err = zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", out, "--no-progress")
        assert code == 2 and "working directory" in err, err
    assert untouched(ud) and corpus_file.is_file() and (work / "keep.txt").read_text() == "mine"


def test_data_clean_reruns_its_own_output_and_removes_a_killed_runs_staging(capsys, tmp_path, corpus_file):
    out = tmp_path / "clean"
    assert zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", out, "--no-progress")[0] == 0
    assert read_marker(out)["command"] == "data clean"
    stale = killed_writer(out)
    assert zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", out, "--no-progress")[0] == 0
    assert not stale.exists() and (out / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_another_commands_output_but_never_a_users(capsys, tmp_path, corpus_file):
    out = tmp_path / "clean"
    assert zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", out, "--no-progress")[0] == 0
    train = ["tokenizer", "train", "--input", corpus_file, "--vocab-size", 300, "--no-progress", "--out"]
    code, err = zhllm(capsys, *train, out)
    assert code == 2 and "holds the output of `zhllm data clean`; pass --overwrite" in err
    assert (out / "report.json").is_file()
    assert zhllm(capsys, *train, out, "--overwrite")[0] == 0
    assert read_marker(out)["command"] == "tokenizer train" and (out / "tokenizer.json").is_file()
    assert not (out / "report.json").exists()
    assert zhllm(capsys, *train, out)[0] == 0  # its own output: re-written without --overwrite
    mine = user_dir(tmp_path / "mine")
    code, err = zhllm(capsys, *train, mine, "--overwrite")
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *train, corpus_file.parent)
    assert code == 2 and "contains the input" in err and corpus_file.is_file()


def test_tokenizer_extend_checks_both_outputs_before_working(capsys, tmp_path, corpus_file, tokenizer_dir,
                                                              tiny_model_dir):
    mine = user_dir(tmp_path / "mine")
    base = ["tokenizer", "extend", "--base", tokenizer_dir, "--input", corpus_file, "--add", 8, "--no-progress"]
    code, err = zhllm(capsys, *base, "--out", mine)
    assert code == 2 and "--out" in err and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *base, "--out", tmp_path / "tok", "--model", tiny_model_dir, "--model-out", mine)
    assert code == 2 and "--model-out" in err and untouched(mine)
    assert not (tmp_path / "tok").exists()  # refused before the extension ran
    code, err = zhllm(capsys, *base, "--out", tmp_path / "tok", "--model", tiny_model_dir,
                      "--model-out", tmp_path / "tok" / "model")
    assert code == 2 and "separate directories" in err
    code, err = zhllm(capsys, *base, "--out", tokenizer_dir.parent)
    assert code == 2 and "contains the input" in err and (tokenizer_dir / "tokenizer.json").is_file()


def test_model_init_reruns_its_own_output_and_refuses_others(capsys, tmp_path, tokenizer_dir, work):
    init = ["model", "init", "--preset", "tiny", "--tokenizer", tokenizer_dir, "--out"]
    mine = user_dir(tmp_path / "mine")
    code, err = zhllm(capsys, *init, mine)
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *init, ".")
    assert code == 2 and "working directory" in err
    out = tmp_path / "m"
    assert zhllm(capsys, *init, out)[0] == 0 and zhllm(capsys, *init, out)[0] == 0
    assert read_marker(out)["command"] == "model init" and (out / "model.safetensors").is_file()


def test_model_resize_and_lora_merge_follow_the_policy(capsys, tmp_path, tiny_model_dir, tokenizer_dir):
    from zhllm.model.io import load_model
    from zhllm.train.lora import apply_lora, save_adapter

    mine = user_dir(tmp_path / "mine")
    resize = ["model", "resize", tiny_model_dir, "--tokenizer", tokenizer_dir, "--out"]
    code, err = zhllm(capsys, *resize, mine)
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *resize, tiny_model_dir.parent)
    assert code == 2 and "contains the input" in err and (tiny_model_dir / "model.safetensors").is_file()
    out = tmp_path / "resized"
    assert zhllm(capsys, *resize, out)[0] == 0 and read_marker(out)["command"] == "model resize"

    adapter = save_adapter(apply_lora(load_model(tiny_model_dir), r=2, alpha=4), tmp_path / "adapter")
    merge = ["lora", "merge", "--base", tiny_model_dir, "--adapter", adapter, "--out"]
    code, err = zhllm(capsys, *merge, mine)
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *merge, adapter / "merged")
    assert code == 2 and "inside the input directory" in err
    code, err = zhllm(capsys, *merge, out)
    assert code == 2 and "`zhllm model resize`" in err
    assert zhllm(capsys, *merge, out, "--overwrite")[0] == 0 and read_marker(out)["command"] == "lora merge"


def test_data_tokenize_claims_resumes_and_overwrites(capsys, tmp_path, corpus_file, tokenizer_dir, work):
    tok = ["data", "tokenize", "--input", corpus_file, "--tokenizer", tokenizer_dir, "--workers", 1,
           "--no-progress", "--out"]
    mine = user_dir(tmp_path / "mine")
    code, err = zhllm(capsys, *tok, mine, "--overwrite")
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *tok, ".")  # an empty-looking output would have been filled in place
    assert code == 2 and "working directory" in err and sorted(os.listdir(work)) == ["keep.txt"]
    out = tmp_path / "shards"
    assert zhllm(capsys, *tok, out)[0] == 0 and read_marker(out)["command"] == "data tokenize"
    (out / MARKER).unlink()  # an output written before markers existed is still recognised
    assert zhllm(capsys, *tok, out)[0] == 0
    clean = tmp_path / "clean"
    assert zhllm(capsys, "data", "clean", "--input", corpus_file, "--out", clean, "--no-progress")[0] == 0
    code, err = zhllm(capsys, *tok, clean)
    assert code == 2 and "pass --overwrite" in err
    assert zhllm(capsys, *tok, clean, "--overwrite")[0] == 0
    assert (clean / "meta.json").is_file() and not (clean / "report.json").exists()


def test_tokenize_sft_policy_and_killed_run(capsys, tmp_path, tokenizer_dir):
    chat = tmp_path / "chat" / "sft.jsonl"
    chat.parent.mkdir()
    chat.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CHAT), encoding="utf-8")
    sft = ["data", "tokenize-sft", "--tokenizer", tokenizer_dir, "--input", chat, "--max-len", 512,
           "--workers", 1, "--no-progress", "--out"]
    mine = user_dir(tmp_path / "mine")
    code, err = zhllm(capsys, *sft, mine)
    assert code == 2 and "not written by zhllm" in err and untouched(mine)
    code, err = zhllm(capsys, *sft, chat.parent)
    assert code == 2 and "contains the input" in err and chat.is_file()
    out = tmp_path / "sft"
    assert zhllm(capsys, *sft, out)[0] == 0 and read_marker(out)["command"] == "data tokenize-sft"
    stale = killed_writer(out)
    (out / MARKER).unlink()  # shards written before markers existed are still this command's
    assert zhllm(capsys, *sft, out)[0] == 0
    assert not stale.exists() and read_marker(out)["command"] == "data tokenize-sft"


def test_checkpoint_staging_is_not_nested_and_pruning_clears_killed_saves(tmp_path):
    from zhllm.train.state import prune_checkpoints

    root = tmp_path / "checkpoints"
    (root / "step_3").mkdir(parents=True)
    (root / "..step_2.tmp-0a1b2c3d.tmp-4e5f6a7b").mkdir()  # left by older versions' nested staging
    code = ("import os, sys\nfrom pathlib import Path\nfrom zhllm.fsutil import atomic_directory\n"
            "with atomic_directory(Path(sys.argv[1]) / 'step_48') as tmp:\n"
            "    with atomic_directory(tmp) as inner:\n"  # what save_model does inside a checkpoint's staging
            "        assert inner == tmp\n        (inner / 'model.safetensors').write_bytes(b'half')\n"
            "        os._exit(1)\n")
    subprocess.run([sys.executable, "-c", code, str(root)], check=False)
    assert [p.name.split(".tmp-")[0] for p in root.iterdir() if p.name.startswith(".")].count("..step_48") == 0
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_3"]


def test_pipeline_never_deletes_a_users_directory(capsys, tmp_path):
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    run = tmp_path / "run"
    user_dir(run / "clean")  # a directory named like a stage, in an out_dir that is not a pipeline run
    code, err = zhllm(capsys, "pipeline", demo, "--until", "clean", "--set", f"out_dir={run}",
                      "--set", "corpus.task_docs=10")
    assert code == 2 and "not written by zhllm" in err and untouched(run / "clean")
    assert sorted(p.name for p in run.iterdir()) == ["clean"]
