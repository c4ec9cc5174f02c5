"""Throughput of `zhllm data clean` on the real prose sample, with and without deduplication.

Reference points: the reader alone (the ceiling: JSON decoding of the same file), and for MinHash
signatures, datasketch's documented usage (SHA-1 of every shingle via `update_batch`) against ours
(numpy polynomial hashes of character n-grams fed with an identity hash).

    python benchmarks/bench_clean.py [--input FILE] [--workers 2]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from zhllm.data.clean import CleanConfig, clean_corpus
from zhllm.data.dedup import DedupConfig, minhash_signature
from zhllm.data.readers import iter_texts

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "web_wiki_news_zh.jsonl"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (workers): wall time alone is at the mercy of
    whatever else runs on a shared machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_reader(path: Path) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    n = sum(1 for _ in iter_texts([str(path)]))
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def time_clean(path: Path, cfg: CleanConfig, workers: int) -> tuple[dict, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), cpu_seconds()
        report = clean_corpus([str(path)], Path(tmp) / "out", cfg, workers=workers, progress=False)
        return report, time.perf_counter() - start, cpu_seconds() - cpu


def time_signatures(texts: list[str]) -> tuple[float, float]:
    """docs/s of datasketch's documented SHA-1 shingle hashing vs ours, same shingles and num_perm."""
    from datasketch import MinHash
    cfg = DedupConfig()
    start = time.perf_counter()
    for t in texts:
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        compact = "".join(t.split())
        m.update_batch({compact[i:i + cfg.shingle_size].encode("utf-8")
                        for i in range(max(len(compact) - cfg.shingle_size + 1, 1))})
    reference = time.perf_counter() - start
    start = time.perf_counter()
    for t in texts:
        minhash_signature(t, cfg)
    ours = time.perf_counter() - start
    return len(texts) / reference, len(texts) / ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not args.input.exists():
        raise SystemExit(f"input not found: {args.input}")
    mb = args.input.stat().st_size / 1e6

    rows = []
    n, secs, cpu = time_reader(args.input)
    rows.append(("read only (reference ceiling)", 1, n, secs, cpu, n))
    variants = [
        ("normalise + filters, no dedup", CleanConfig(dedup=DedupConfig(exact=False, near=False)), 1),
        ("+ exact dedup", CleanConfig(dedup=DedupConfig(near=False)), 1),
        ("+ exact + MinHash near dedup (default)", CleanConfig(), 1),
        ("+ exact + MinHash near dedup (default)", CleanConfig(), args.workers),
    ]
    for name, cfg, workers in variants:
        report, secs, cpu = time_clean(args.input, cfg, workers)
        rows.append((name, workers, report["docs_in"], secs, cpu, report["docs_kept"]))

    print(f"\n`zhllm data clean` on {args.input.name} ({mb:.1f} MB)\n")
    print("| pipeline | workers | docs | wall s | docs/s | MB/s | CPU s | docs per CPU-s | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, workers, docs, secs, cpu, kept in rows:
        print(f"| {name} | {workers} | {docs} | {secs:.2f} | {docs / secs:,.0f} | {mb / secs:.2f} | {cpu:.2f} "
              f"| {docs / cpu:,.0f} | {kept} |")

    texts = list(iter_texts([str(args.input)]))[:3000]
    ref, ours = time_signatures(texts)
    print(f"\nMinHash signatures (num_perm=128, 5-char shingles, {len(texts)} docs)\n")
    print("| implementation | docs/s |")
    print("|---|---:|")
    print(f"| datasketch update_batch with SHA-1 per shingle (reference) | {ref:,.0f} |")
    print(f"| zhllm: numpy n-gram hashes, identity hashfunc | {ours:,.0f} ({ours / ref:.1f}x) |")


if __name__ == "__main__":
    main()
