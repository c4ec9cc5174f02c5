"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match one process with the same global batch,
and a checkpoint written by 2 processes resumes exactly-enough in 1 (the data position is global)."""
import pytest
import torch

from train_support import make_shards, run_cli, run_inprocess, run_on_two_ranks, train_losses, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, corpus):
    root = tmp_path_factory.mktemp("dist")
    shards = make_shards(root / "shards", tokenizer_dir, corpus)
    # One process, micro-batch 2 x 2 accumulation steps = the global batch of 2 processes x 2.
    ref = write_recipe(root / "ref.yaml", shards, root / "ref", batch_size=2, grad_accum=2)
    torch.set_num_threads(1)
    run_inprocess(ref)
    return root, shards, train_losses(root / "ref")


def _close(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-4), (s, a[s], b[s])


def test_ddp_matches_single_process_and_resumes_in_one(setup):
    root, shards, ref = setup
    recipe = write_recipe(root / "ddp.yaml", shards, root / "ddp", batch_size=2, parallel="ddp")
    proc = run_cli(["pretrain", "--config", str(recipe)], env={"ZHLLM_FAIL_AT_STEP": "8"}, torchrun=2)
    assert proc.returncode != 0  # died on purpose after step 8
    assert "step 8/12" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    _close(train_losses(root / "ddp"), ref, range(1, 9))
    # Resume the 2-process checkpoint (step 6) with 1 process and 2 accumulation steps.
    summary = run_inprocess(recipe, "train.grad_accum=2", resume="auto")
    assert summary["step"] == 12
    _close(train_losses(root / "ddp"), ref, range(1, 13))


def test_fsdp2_matches_single_process(setup):
    root, shards, ref = setup
    recipe = write_recipe(root / "fsdp.yaml", shards, root / "fsdp", batch_size=2, parallel="fsdp")
    run_on_two_ranks(["pretrain", "--config", str(recipe)])
    _close(train_losses(root / "fsdp"), ref, range(1, 13))
    from zhllm.model.io import load_model
    load_model(root / "fsdp" / "checkpoints" / "step_12")  # gathered full weights, HF-native
