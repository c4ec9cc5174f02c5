"""Helpers for the training tests: tiny token shards written with the real shard writer, and a runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zhllm.data.shard_dir import token_dtype, tokenizer_fingerprint, write_meta
from zhllm.data.shards import ShardWriter, build_meta
from zhllm.model.io import copy_tokenizer
from zhllm.tokenizer.load import load_tokenizer


def make_shards(out: Path, tokenizer_dir: Path, texts: list[str], val_every: int = 10) -> Path:
    """Every `val_every`-th text goes to the val split, the rest to train."""
    tok = load_tokenizer(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    dtype = token_dtype(len(tok))
    entries = []
    for split, keep in (("train", lambda i: i % val_every != 0), ("val", lambda i: i % val_every == 0)):
        with ShardWriter(out, f"{split}-00000", dtype, eos) as w:
            for i, text in enumerate(texts):
                if keep(i):
                    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                    w.add_document(ids, len(text.encode("utf-8")))
            entries.append(w.close())
    (out / "tokenizer").mkdir(exist_ok=True)
    copy_tokenizer(tokenizer_dir, out / "tokenizer")
    write_meta(out, build_meta(len(tok), eos, tokenizer_fingerprint(tok), entries))
    return out


def write_recipe(path: Path, shards: Path, out_dir: Path, **train) -> Path:
    """A tiny-model recipe: dim 32, 2 layers, seq 32, quick eval and checkpoints."""
    recipe = {
        "model": {"preset": "tiny", "dim": 32, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
        "data": {"path": [str(shards)]},
        "train": {"max_steps": 12, "batch_size": 4, "grad_accum": 1, "seq_len": 32, "lr": 3e-3,
                  "warmup_steps": 3, "precision": "fp32", "threads": 1, **train},
        "eval": {"every": 6, "batches": 2, "prompts": []},
        "checkpoint": {"every": 6, "keep": 2},
        "log": {"every": 1, "tensorboard": False, "progress": False, "plots": False},
        "out_dir": str(out_dir),
    }
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def run_cli(args: list[str], env: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`zhllm ARGS` in a fresh process (or under torchrun with N processes)."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "zhllm", *args]
    else:
        cmd = [sys.executable, "-m", "zhllm", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("ZHLLM_FAIL_AT_STEP", "ZHLLM_FAIL_IN_SAVE_AT_STEP"):
        if k not in (env or {}):
            full_env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def set_args(settings: list[str]) -> list[str]:
    """`--set KEY=VALUE` for each setting: the CLI arguments of a recipe's overrides."""
    return [arg for setting in settings for arg in ("--set", setting)]


def run_on_two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    """`zhllm ARGS` under torchrun with 2 processes, which must succeed; skips the test where this torch build's
    gloo lacks FSDP2's collectives."""
    proc = run_cli(args, torchrun=2)
    if proc.returncode != 0 and "gloo" in proc.stderr.lower() and "not supported" in proc.stderr.lower():
        pytest.skip("FSDP2 collectives are not supported by gloo in this torch build")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    from zhllm.train.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind", "train") == "train"}


def final_weights(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


def run_inprocess(recipe: Path, *sets: str, resume: str | None = None) -> dict:
    from zhllm.train.pretrain import run_pretrain
    return run_pretrain(recipe, list(sets), resume)
