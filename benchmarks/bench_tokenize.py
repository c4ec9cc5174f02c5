"""Pre-tokenisation throughput: `zhllm data tokenize` vs `datasets.map(batched=True)` and the encode_batch ceiling.

All three turn the same documents into token ids with the same tokenizer:
  zhllm     tokenize_corpus(): jsonl -> worker processes -> .bin/.idx shards + meta.json (end to end)
  datasets  Dataset.from_json(...).map(tokenize, batched=True, num_proc=N) (end to end, arrow cache in a tmp dir)
  ceiling   tokenizers.Tokenizer.encode_batch_fast over the texts already in memory, one process
            (the Rust thread pool uses every core): no reading, no writing.
MB/s counts utf-8 bytes of document text. Targets (issue 3): >= 1.5x datasets, >= 80% of the ceiling.
Contenders run in interleaved rounds (`--repeat`), best of each reported; CPU seconds per MB (all
processes) are printed too, as they are less disturbed by other jobs on a shared machine.

    python benchmarks/bench_tokenize.py [--quick] [--workers N] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_support import SHARED



def prose_files() -> list[Path]:
    files = sorted(p for p in (SHARED / "pretrain").glob("*.jsonl") if "poetry" not in p.name)
    if not files:
        sys.exit(f"sample data not found under {SHARED / 'pretrain'}")
    return files


def quick_subset(files: list[Path], fraction: float, tmp: Path) -> list[Path]:
    """The first `fraction` of each file's lines, so every kind of text stays represented."""
    out = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        part = tmp / f.name
        part.write_text("".join(lines[: max(1, int(len(lines) * fraction))]), encoding="utf-8")
        out.append(part)
    return out


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (worker pools are joined per run)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_zhllm(files, tokenizer_dir, workers, tmp: Path) -> float:
    from zhllm.data.tokenize import tokenize_corpus

    out = tmp / f"zhllm-{time.monotonic_ns()}"
    start = time.perf_counter()
    tokenize_corpus([str(f) for f in files], tokenizer_dir, out, workers=workers, progress=False)
    return time.perf_counter() - start


def run_datasets(files, tokenizer_dir, workers, tmp: Path) -> float:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def encode(batch):
        return {"input_ids": tok(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]}

    cache = tmp / f"hf-{time.monotonic_ns()}"
    start = time.perf_counter()
    ds = datasets.Dataset.from_json([str(f) for f in files], cache_dir=str(cache))
    ds.map(encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    return time.perf_counter() - start


def run_ceiling(texts, tokenizer_dir) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.encode_special_tokens = True
    start = time.perf_counter()
    for i in range(0, len(texts), 8192):
        tok.encode_batch_fast(texts[i:i + 8192], add_special_tokens=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a sixth of each file (~10 MB)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for zhllm and datasets")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "minimind"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the best is reported")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = prose_files()
        if args.quick:
            files = quick_subset(files, 1 / 6, tmp)
        from zhllm.corpus.readers import iter_texts
        texts = list(iter_texts([str(f) for f in files]))
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"{len(texts):,} documents, {mb:.1f} MB of text, {args.workers} workers, tokenizer {args.tokenizer}")
        contenders = {"zhllm": lambda: run_zhllm(files, args.tokenizer, args.workers, tmp),
                      "datasets": lambda: run_datasets(files, args.tokenizer, args.workers, tmp),
                      "ceiling": lambda: run_ceiling(texts, args.tokenizer)}
        wall: dict = {k: [] for k in contenders}
        cpu: dict = {k: [] for k in contenders}
        for _ in range(args.repeat):  # interleaved rounds, so a burst of load on a shared machine hits all
            for name, fn in contenders.items():
                before = cpu_seconds()
                wall[name].append(fn())
                cpu[name].append(cpu_seconds() - before)

    t_zhllm, t_hf, t_ceiling = (min(wall[k]) for k in contenders)
    c_zhllm, c_hf, c_ceiling = (min(cpu[k]) / mb for k in contenders)
    z, h, c = mb / t_zhllm, mb / t_hf, mb / t_ceiling
    print()
    print("| figure | zhllm | reference | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| MB/s vs datasets.map(batched, num_proc={args.workers}) | {z:.2f} | {h:.2f} | {z / h:.2f}x | >= 1.5x |")
    print(f"| MB/s vs encode_batch_fast ceiling (in memory, 1 process) | {z:.2f} | {c:.2f} | {z / c:.0%} | >= 80% |")
    print(f"| CPU s/MB vs datasets (all processes) | {c_zhllm:.2f} | {c_hf:.2f} | {c_hf / c_zhllm:.2f}x | |")
    print(f"| CPU s/MB vs ceiling | {c_zhllm:.2f} | {c_ceiling:.2f} | {c_ceiling / c_zhllm:.0%} | |")
    print(f"| best wall seconds (zhllm / datasets / ceiling) | {t_zhllm:.1f} | {t_hf:.1f} / {t_ceiling:.1f} | | |")


if __name__ == "__main__":
    main()
