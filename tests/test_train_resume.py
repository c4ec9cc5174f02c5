"""Exact resume, crash-safe checkpoints and HF interop of `zhllm pretrain` (CPU, tiny model).

Crashes need a real process to die (`os._exit`), so those runs are subprocesses; reference runs and
resumes run in-process to keep the suite fast.
"""
import json
import os

import pytest
import torch

from train_support import final_weights, make_shards, run_cli, run_inprocess, train_losses, write_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, corpus):
    return make_shards(tmp_path_factory.mktemp("shards") / "s", tokenizer_dir, corpus)


@pytest.mark.parametrize("setup", [{"precision": "fp32"}, {"precision": "bf16"},
                                   {"precision": "bf16", "bf16_weights": True, "compile": True}],
                         ids=["fp32", "bf16", "26m-recipe-bf16-weights-compiled"])
def test_resume_after_crash_is_bitwise_exact(tmp_path, shards, setup, capsys):
    torch.set_num_threads(1)  # the crashed subprocess runs with one thread too: same kernels, same bits
    straight = write_recipe(tmp_path / "a.yaml", shards, tmp_path / "a", **setup)
    run_inprocess(straight)
    crashed = write_recipe(tmp_path / "b.yaml", shards, tmp_path / "b", **setup)
    died = run_cli(["pretrain", "--config", str(crashed)], env={"ZHLLM_FAIL_AT_STEP": "8"})
    assert died.returncode == 1, died.stderr[-2000:]
    assert sorted(train_losses(tmp_path / "b")) == list(range(1, 9))
    capsys.readouterr()
    run_inprocess(crashed, resume="auto")
    assert "resumed from" in capsys.readouterr().out
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 13))
    assert a == b  # bitwise: JSON floats round-trip exactly
    # The raw file, not read_metrics (which hides repeats): steps 7-8 of the killed run are not kept twice.
    raw = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if r.get("kind", "train") == "train"] == list(range(1, 13))
    assert [r["step"] for r in raw if r.get("kind") == "eval"] == [6, 12]
    wa, wb = final_weights(tmp_path / "a", 12), final_weights(tmp_path / "b", 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_inside_checkpoint_write_keeps_previous(tmp_path, shards, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "r")
    died = run_cli(["pretrain", "--config", str(recipe)], env={"ZHLLM_FAIL_IN_SAVE_AT_STEP": "12"})
    assert died.returncode == 1
    ckpts = tmp_path / "r" / "checkpoints"
    assert (ckpts / "step_6" / "trainer_state.json").is_file()
    assert not (ckpts / "step_12").exists()  # the half-written one stays under a hidden temporary name
    assert list(ckpts.glob(".step_12.tmp-*"))
    assert os.readlink(ckpts / "latest") == "step_6"
    from zhllm.model.io import load_model
    load_model(ckpts / "step_6")
    capsys.readouterr()
    summary = run_inprocess(recipe, resume="auto")
    assert "step_6" in capsys.readouterr().out
    assert summary["step"] == 12 and (ckpts / "step_12").is_dir()
    assert not list(ckpts.glob(".step_*"))  # the crashed save's leftovers were cleaned up


def test_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, shards):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "r", max_steps=6)
    run_inprocess(recipe, "log.plots=true")
    ckpt = tmp_path / "r" / "checkpoints" / "step_6"
    from transformers import AutoModelForCausalLM
    from zhllm.model.io import load_model
    ours = load_model(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data_position"] == 24 and state["tokens_seen"] == 6 * 4 * 32
    assert state["val_loss"] is not None and os.readlink(tmp_path / "r" / "checkpoints" / "best") == "step_6"
    assert (ckpt / "tokenizer.json").is_file()
    for name in ("loss", "lr", "throughput"):
        assert (tmp_path / "r" / "plots" / f"{name}.png").stat().st_size > 1000


def test_existing_run_needs_resume_flag(tmp_path, shards, capsys):
    from zhllm.cli import main
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "r", max_steps=6)
    assert main(["pretrain", "--config", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and len(err.strip().splitlines()) == 1


def test_compiled_layers_train_like_eager_and_save_plain_checkpoints(tmp_path, shards, capsys):
    """train.compile: the same losses as eager to bf16 rounding, HF names in checkpoints, and eval samples
    (generation) run eagerly instead of recompiling the layers for every cache shape."""
    torch.set_num_threads(1)
    common = {"precision": "bf16", "bf16_weights": True, "max_steps": 8}
    eager = write_recipe(tmp_path / "a.yaml", shards, tmp_path / "a", **common)
    compiled = write_recipe(tmp_path / "b.yaml", shards, tmp_path / "b", compile=True, **common)
    run_inprocess(eager)
    run_inprocess(compiled, "eval.prompts=[你好]", "eval.max_new_tokens=4")
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) < 2e-3 * a[s] for s in a), (a, b)
    from zhllm.model.io import load_model
    weights = load_model(tmp_path / "b" / "checkpoints" / "step_6").state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in weights and not any("_orig_mod" in k for k in weights)
    assert "sample" in capsys.readouterr().out.lower()


POISON_SCRIPT = """
import sys, torch
from zhllm.train import trainer
train_step = trainer.Trainer.train_step

def poisoned(self):  # a blown-up update on rank 0 only: the ranks must still agree on what happens
    out = train_step(self)
    if self.state.step == 5 and self.d.rank == 0:
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("inf"))
    return out

trainer.Trainer.train_step = poisoned
from zhllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _assert_no_checkpoint_after_blow_up(run_dir):
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step_6").exists() and not list(ckpts.glob(".step_*"))


def test_nonfinite_weights_end_the_cli_with_one_error_line(tmp_path, shards, monkeypatch, capsys):
    from zhllm.cli import main
    from zhllm.train import trainer
    train_step = trainer.Trainer.train_step

    def poisoned(self):
        out = train_step(self)
        if self.state.step == 5:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", poisoned)
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "r", max_steps=8)
    assert main(["pretrain", "--config", str(recipe), "--set", "checkpoint.every=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zhllm: error: step 6: the weights are not finite") and "\n" not in err, err
    _assert_no_checkpoint_after_blow_up(tmp_path / "r")


def test_nonfinite_weights_under_two_processes_exit_cleanly(tmp_path, shards):
    import socket
    import subprocess
    import sys
    script = tmp_path / "poison.py"
    script.write_text(POISON_SCRIPT)
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "r", max_steps=8, batch_size=2, parallel="ddp")
    # The two ranks are started here with torchrun's environment rather than by torchrun: torchrun SIGTERMs the
    # other worker as soon as one exits, so a rank still shutting down after its error showed up as killed at
    # random. Each rank's own exit code is what is checked, and a rank that hangs fails the timeout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZHLLM_FAIL")}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    cmd = [sys.executable, str(script), "pretrain", "--config", str(recipe), "--set", "checkpoint.every=6"]
    ranks = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for p, out in zip(ranks, outs):
        # Both ranks stop at the same save with the same one-line error and the CLI's error exit, no traceback.
        assert p.returncode == 2, out[-3000:]
        assert out.count("zhllm: error: step 6: the weights are not finite") == 1, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    _assert_no_checkpoint_after_blow_up(tmp_path / "r")
