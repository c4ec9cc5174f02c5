"""Tokenizer training: time and peak memory, zhllm byte-level BPE vs SentencePiece BPE; then compression.

Reference: SentencePiece BPE (byte fallback, split digits, coverage 0.9995) trained on exactly the same text.
Each trainer runs in its own subprocess, one at a time; its peak RSS is the child's `ru_maxrss` (per child,
via os.wait4, so one run's peak cannot hide another's). Then chars/token etc. on held-out documents for
both and for the real tokenizers in ../shared/data/tokenizers.

    python benchmarks/bench_tokenizer_train.py            # ~50 MB, 32k vocabulary
    python benchmarks/bench_tokenizer_train.py --quick    # ~5 MB, 8k vocabulary

zhllm trains on all the text like SentencePiece, and once more on the sample its CLI takes by default.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import SHARED

PROSE = ["web_wiki_news_zh.jsonl", "app_desc_abstracts_zh.jsonl", "reviews_zh.jsonl", "weibo_zh.jsonl"]
REAL_TOKENIZERS = ["minimind", "qwen1.5-moe-a2.7b-chat", "chatglm2-6b"]
TRAINERS = {"zhllm bpe (tokenizers)": "bpe", "sentencepiece bpe": "sentencepiece",
            "zhllm bpe, its default sample (--max-chars 10M)": "bpe-sampled"}
HELDOUT_EVERY = 50


def prepare(data_dir: Path, train_mb: float, work: Path) -> tuple[Path, Path, float]:
    """Split the prose sample by a stable hash: ~2% held out, up to `train_mb` MB (UTF-8) for training,
    taken in hash order so every source file contributes."""
    docs = []
    for name in PROSE:
        with open(data_dir / "pretrain" / name, encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                docs.append((hashlib.blake2b(text.encode(), digest_size=8).digest(), text))
    docs.sort()
    train, held, size = [], [], 0
    for h, text in docs:
        if int.from_bytes(h, "big") % HELDOUT_EVERY == 0:
            held.append(text)
        elif size < train_mb * 1e6:
            train.append(text)
            size += len(text.encode("utf-8"))
    train_file, held_file = work / "train.jsonl", work / "heldout.jsonl"
    for path, texts in ((train_file, train), (held_file, held)):
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return train_file, held_file, size / 1e6


def run_trainer(backend: str, train_file: Path, out: Path, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--train-file", str(train_file), "--out", str(out),
           "--vocab", str(vocab)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{backend} trainer failed")
    result = json.loads(output.strip().splitlines()[-1])
    # ru_maxrss is in KiB on Linux; CPU seconds matter on a shared machine where wall time is noisy
    result.update(wall=wall, cpu=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / 1024)
    return result


def worker(backend: str, train_file: str, out: str, vocab: int) -> None:
    from zhllm.tokenizer.train import train_tokenizer

    sampled = backend == "bpe-sampled"  # the CLI's default --max-chars instead of all the text
    report = train_tokenizer([train_file], out, vocab, max_chars=10_000_000 if sampled else 10**12,
                             backend="bpe" if sampled else backend, show_progress=False)
    print(json.dumps({"seconds": report.seconds, "chars": report.chars_trained, "vocab": report.vocab_size}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~5 MB and an 8k vocabulary")
    ap.add_argument("--mb", type=float, default=None, help="training text in MB (default 50, quick 5)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000, quick 8000)")
    ap.add_argument("--data", type=Path, default=SHARED, help="the shared data directory")
    ap.add_argument("--keep", type=Path, default=None, help="keep the trained tokenizers in this directory")
    ap.add_argument("--worker", choices=sorted(set(TRAINERS.values())), help=argparse.SUPPRESS)
    ap.add_argument("--train-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.train_file, args.out, args.vocab)
    mb = args.mb or (5 if args.quick else 50)
    vocab = args.vocab or (8000 if args.quick else 32000)
    if not (args.data / "pretrain").is_dir():
        raise SystemExit(f"shared data not found: {args.data}")

    from zhllm.tokenizer.evaluate import TokenizerStats, measure, open_encoder
    from zhllm.tokenizer.train import read_texts

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_file, held_file, train_mb = prepare(args.data, mb, work)
        print(f"training text: {train_mb:.1f} MB ({train_file}); vocab {vocab}; cores {os.cpu_count()}\n",
              flush=True)
        rows, trained = [], []
        for label, backend in TRAINERS.items():
            out = work / f"{backend}-{vocab}"
            r = run_trainer(backend, train_file, out, vocab)
            rows.append((label, r))
            trained.append((f"{label} {vocab // 1000}k", out))
            print(f"  {label}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        print(f"\n### Training a {vocab:,} vocabulary on {train_mb:.1f} MB of Chinese prose\n")
        print("| trainer | chars trained | train wall (s) | process wall (s) | process CPU (s) | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, r in rows:
            print(f"| {label} | {r['chars']:,} | {r['seconds']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} "
                  f"| {r['peak_rss_mb']:.0f} |")
        print("\n(train wall: read + sample + train + save inside the process; peak RSS includes ~230 MB of "
              "Python/transformers imports)")

        held = list(read_texts([str(held_file)]))
        candidates = trained + [(name, args.data / "tokenizers" / name) for name in REAL_TOKENIZERS]
        stats: list[TokenizerStats] = [measure(open_encoder(path), name, held) for name, path in candidates]
        print(f"\n### Held-out compression ({len(held):,} documents, {stats[0].chars:,} characters)\n")
        print("| tokenizer | vocab | chars/token | bytes/token | byte-fallback |")
        print("|---|---:|---:|---:|---:|")
        for s in stats:
            print(f"| {s.name} | {s.vocab_size:,} | {s.chars_per_token:.3f} | {s.bytes_per_token:.3f} | "
                  f"{100 * s.fallback_rate:.2f}% |")


if __name__ == "__main__":
    main()
