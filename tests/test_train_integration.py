"""Integration (skips without ../shared/data): 200 steps of the `tiny` recipe on real Chinese prose shards,
tokenised with the real MiniMind tokenizer, lower the val loss far below its starting point.
(Micro-batch 4 x 64 tokens instead of the recipe's 8 x 128 keeps it quick on a shared 2-core CPU.)"""
import json
import math

import pytest

from conftest import shared_data
from train_support import make_shards, run_inprocess, train_losses


def test_tiny_recipe_learns_real_prose(tmp_path):
    prose = shared_data("pretrain/web_wiki_news_zh.jsonl")
    tok = shared_data("tokenizers/minimind")
    texts = []
    with open(prose, encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if len(texts) == 400:
                break
    shards = make_shards(tmp_path / "shards", tok, texts, val_every=20)
    summary = run_inprocess("tiny", f"data.path={shards}", f"out_dir={tmp_path / 'run'}", "train.batch_size=4",
                            "train.seq_len=64", "eval.batches=2",
                            "eval.every=100", "checkpoint.every=0", "log.tensorboard=false", "log.plots=false",
                            "log.progress=false")
    assert summary["step"] == 200 and summary["skipped_steps"] == 0
    losses = train_losses(tmp_path / "run")
    assert losses[1] == pytest.approx(math.log(6400), abs=0.5)  # a fresh model is uniform over the vocab
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [100, 200]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(6400) - 1.0
    assert 0 < evals[-1]["val_bpb"] < 4
    assert evals[-1]["samples"][0].startswith("中国的首都是")
