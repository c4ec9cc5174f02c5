"""Learning per CPU-minute: held-out bits per byte of a pretraining recipe against the minutes it took, with
MiniMind's recipe as the reference, on the same text and machine.

The held-out text comes from other sources than the training text: two source tags of the shared prose are
never trained on (`chid`: news and novel passages; `cmrc2018`: Wikipedia passages of a reading-comprehension
exam), and 150 documents of each, cut to 300 characters, are scored (every token after BOS, float32).
Everything else of the four modern-prose files (17.6M characters) is the training text.

The clock of a recipe covers what a user would wait for: tokenizer training (zhllm's recipe trains its own;
MiniMind's ships one), pre-tokenisation of the training text, and pretraining with its compile and checkpoints.
Every checkpoint is then scored, off the clock, which gives the curve.

    python benchmarks/bench_recipe.py                    # both recipes, ~20 minutes each on 2 cores
    python benchmarks/bench_recipe.py --quick            # ~4 minutes each
    python benchmarks/bench_recipe.py --recipes zhllm --set train.max_tokens=2000000   # another budget
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_support import SHARED

ROOT = Path(__file__).resolve().parents[1]
PROSE = ["web_wiki_news_zh.jsonl", "app_desc_abstracts_zh.jsonl", "reviews_zh.jsonl", "weibo_zh.jsonl"]
HELD_OUT_SOURCES = ("chid", "cmrc2018")
HELD_OUT_DOCS, HELD_OUT_CHARS = 150, 300     # per source


@dataclass
class Recipe:
    config: str                               # the pretraining recipe
    sets: list[str] = field(default_factory=list)
    vocab: int | None = None                  # train a tokenizer of this size on the training text ...
    tokenizer: Path | None = None             # ... or use this one
    checkpoint_every: int = 50
    quick_tokens: int = 0                     # --quick: train this many tokens instead (about 4 minutes)


RECIPES = {
    # configs/pretrain/6m.yaml as shipped (its max_tokens fit 2 Zen 4 cores in bf16), two thirds of its windows from
    # the general prose.
    "zhllm": Recipe(config="configs/pretrain/6m.yaml", vocab=6400, checkpoint_every=200, sets=["data.weights=[2,1]"],
                    quick_tokens=800_000),
    # MiniMind's trainer/train_pretrain.py on the same 26M shape (MiniMind2-small: dim 512, 8 layers, GQA 8/2,
    # 6400-token vocabulary, its own tokenizer): AdamW lr 5e-4 (torch's default weight decay 0.01 and betas),
    # no warmup, cosine to lr/10, clip 1.0, rows of 340 tokens, 32 rows per step, and on a CPU fp32 without
    # compile (its autocast is CUDA-only); its data shuffled together. Its 8 accumulation steps (87k tokens a
    # step) are dropped: in 20 CPU-minutes they would leave about a dozen optimizer steps.
    "minimind": Recipe(config="configs/pretrain/26m.yaml", tokenizer=SHARED / "tokenizers" / "minimind",
                       checkpoint_every=10, quick_tokens=200_000,
                       sets=["train.lr=5e-4", "train.warmup_steps=0", "train.weight_decay=0.01", "train.beta1=0.9",
                             "train.beta2=0.999", "train.min_lr_ratio=0.1", "train.schedule=cosine",
                             "train.seq_len=340", "train.batch_size=32", "train.grad_accum=1",
                             "train.optimizer=adamw", "train.precision=fp32", "train.bf16_weights=false",
                             "train.compile=false", "train.max_tokens=1000000"]),
}


def split(work: Path) -> tuple[list[Path], Path]:
    """The training text as two files, general prose (news, encyclopedia, web pages) and the rest (reviews, app
    descriptions, abstracts, weibo), and the held-out file; written once."""
    train = [work / "train_prose.jsonl", work / "train_other.jsonl"]
    held = work / "held_out.jsonl"
    if not held.is_file():
        by_source: dict[str, list[str]] = {s: [] for s in HELD_OUT_SOURCES}
        with open(train[0], "w", encoding="utf-8") as prose, open(train[1], "w", encoding="utf-8") as other:
            for name in PROSE:
                with open(SHARED / "pretrain" / name, encoding="utf-8") as fh:
                    for line in fh:
                        r = json.loads(line)
                        if r["source"] in by_source:
                            by_source[r["source"]].append(r["text"])
                        else:
                            out = prose if name == PROSE[0] else other
                            out.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
        rows = []
        for texts in by_source.values():
            random.Random(0).shuffle(texts)
            rows += [json.dumps({"text": t[:HELD_OUT_CHARS]}, ensure_ascii=False) for t in texts[:HELD_OUT_DOCS]]
        held.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return train, held


def zhllm(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "zhllm", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"zhllm {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run(name: str, recipe: Recipe, work: Path, extra: list[str], quick: bool) -> dict:
    train, held = split(work)
    out = work / time.strftime("%Y%m%d-%H%M%S") / name  # a fresh directory for every run
    phases = {}
    tok = recipe.tokenizer
    if tok is None:
        tok = out / "tokenizer"
        phases["tokenizer"] = zhllm("tokenizer", "train", "--input", *map(str, train), "--vocab-size",
                                    str(recipe.vocab), "--out", str(tok), "--overwrite", "--no-progress")
    shards = [out / f"shards_{f.stem.split('_')[-1]}" for f in train]
    phases["tokenize"] = sum(zhllm("data", "tokenize", "--input", str(f), "--tokenizer", str(tok), "--out", str(d),
                                   "--val-fraction", "0.01", "--no-progress") for f, d in zip(train, shards))
    sets = [f"data.path=[{','.join(map(str, shards))}]", f"out_dir={out / 'run'}", "eval.every=0",
            "checkpoint.keep=1000", f"checkpoint.every={recipe.checkpoint_every // (5 if quick else 1)}",
            "log.progress=false", *recipe.sets, *([f"train.max_tokens={recipe.quick_tokens}"] if quick else []), *extra]
    start = time.time()
    phases["pretrain"] = zhllm("pretrain", "--config", str(ROOT / recipe.config),
                               *[a for s in sets for a in ("--set", s)])
    before = sum(v for k, v in phases.items() if k != "pretrain")
    ckpts = sorted((out / "run" / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    minutes = [(before + (p / "model.safetensors").stat().st_mtime - start) / 60 for p in ckpts]
    zhllm("eval", *map(str, ckpts), "--task", "bpb", "--input", str(held), "--dtype", "float32", "--no-progress",
          "--out", str(out / "held_out_eval"), "--overwrite")
    scores = json.loads((out / "held_out_eval" / "results.json").read_text())["models"]
    bpb = [scores[str(p)]["bpb"] for p in ckpts]
    tokens = [json.loads((p / "trainer_state.json").read_text())["tokens_seen"] for p in ckpts]
    return {"name": name, "phases": phases, "curve": list(zip(minutes, tokens, bpb))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["zhllm", "minimind"])
    ap.add_argument("--set", action="append", default=[], help="override for every recipe's pretraining, KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="about 4 minutes of training per recipe, not 20")
    ap.add_argument("--work", default="/tmp/zhllm-bench-recipe", help="working directory (the split is written "
                    "once; every run gets a new subdirectory, kept)")
    args = ap.parse_args()
    if not (SHARED / "pretrain").is_dir():
        sys.exit(f"needs the shared prose in {SHARED / 'pretrain'}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [run(name, RECIPES[name], work, args.set, args.quick) for name in args.recipes]
    (work / "results.json").write_text(json.dumps(results, indent=1))
    for r in results:
        ph = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["phases"].items())
        print(f"\n### {r['name']} ({ph})\n\n| minutes | tokens | held-out bpb |\n|---:|---:|---:|")
        for m, t, b in r["curve"]:
            print(f"| {m:.1f} | {t:,} | {b:.3f} |")
    if len(results) == 2:
        (ma, _, a), (mb, _, b) = [r["curve"][-1] for r in results]
        print(f"\n| figure | {results[0]['name']} | {results[1]['name']} | ratio | target |\n|---|---:|---:|---:|---|")
        print(f"| held-out bits per byte, whole recipe | {a:.3f} | {b:.3f} | {b / a:.3f}x | "
              "zhllm <= 2.5 in 20 minutes |")
        print(f"| minutes on the clock | {ma:.1f} | {mb:.1f} | {mb / ma:.2f}x | |")

if __name__ == "__main__":
    main()
