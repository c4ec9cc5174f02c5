"""Throughput of `zhllm data clean` on the real prose sample, with and without deduplication, and its
peak memory at scale: the on-disk dedup (default) against datasketch's in-memory LSH (`dedup.backend: memory`).

Reference points: the reader alone (the ceiling: JSON decoding of the same file), for MinHash signatures
datasketch's documented usage (SHA-1 of every shingle via `update_batch`) against ours (numpy polynomial
hashes of character n-grams fed with an identity hash), and for memory the in-memory LSH on the same inputs.

Scale inputs (`--sizes`, MB) are built in a temporary directory from the shared prose
(pretrain/*.jsonl except poetry, ~60 MB): copy 0 is the documents as they are, copy k >= 1 each document with
its sentences (split after 。！？!? and newlines) in an order shuffled by (k, document) and a "【k】" prefix,
so later copies are mostly near duplicates (long documents) or distinct (short ones), seldom exact ones.
Copies are appended until the size is reached. Each clean runs in a process of its own, which reports its
own peak RSS and its workers' (ru_maxrss); the two backends alternate on each input.

    python benchmarks/bench_clean.py [--input FILE] [--workers 2] [--sizes 25,200]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zhllm.data.clean import CleanConfig, clean_corpus
from zhllm.data.dedup import DedupConfig, minhash_signature
from zhllm.corpus.readers import iter_texts

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "web_wiki_news_zh.jsonl"
_SENTENCE_END = re.compile(r"(?<=[。！？!?\n])")


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


def build_scaled_input(prose_files: list[Path], megabytes: float, out: Path) -> int:
    """Write `megabytes` of jsonl: the prose, then perturbed copies of it (see the module docstring)."""
    texts = [t for f in prose_files for t in iter_texts([str(f)])]
    limit, written, docs, copy = megabytes * 1e6, 0, 0, 0
    with open(out, "w", encoding="utf-8") as fh:
        while written < limit:
            for i, text in enumerate(texts):
                if copy:
                    rng = random.Random(copy * 1_000_003 + i)
                    sentences = [s for s in _SENTENCE_END.split(text) if s]
                    rng.shuffle(sentences)
                    text = f"【{copy}】" + "".join(sentences)
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= limit:
                    break
            copy += 1
    return docs


def run_isolated(path: Path, backend: str, workers: int) -> dict:
    """One clean in a fresh process: its wall time, docs and peak RSS (its own and its workers')."""
    code = (
        "import json, resource, sys, tempfile, time\n"
        "from pathlib import Path\n"
        "from zhllm.data.clean import CleanConfig, clean_corpus\n"
        "from zhllm.data.dedup import DedupConfig\n"
        "path, backend, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    start = time.perf_counter()\n"
        "    r = clean_corpus([path], Path(tmp) / 'out', CleanConfig(dedup=DedupConfig(backend=backend)),\n"
        "                     workers=workers, progress=False)\n"
        "    secs = time.perf_counter() - start\n"
        "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'docs': r['docs_in'], 'kept': r['docs_kept'], 'removed': r['removed'], 'secs': secs,\n"
        "                  'rss_mb': own / 1024, 'worker_rss_mb': kids / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), backend, str(workers)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def scale_table(prose_files: list[Path], sizes: list[float], workers: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            path = Path(tmp) / f"prose-{mb:g}mb.jsonl"
            build_scaled_input(prose_files, mb, path)
            results = {b: run_isolated(path, b, workers) for b in ("memory", "disk")}
            rows.append((mb, results))
            path.unlink()
    print(f"\nPeak memory at scale: on-disk dedup (default) vs datasketch's in-memory LSH, workers={workers}\n")
    print("| input | docs | backend | wall s | docs/s | peak RSS MB (main) | peak RSS MB (workers) | kept | "
          "near dup | exact dup |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for mb, results in rows:
        for backend, r in results.items():
            print(f"| {mb:g} MB | {r['docs']:,} | {backend} | {r['secs']:.1f} | {r['docs'] / r['secs']:,.0f} "
                  f"| {r['rss_mb']:,.0f} | {r['worker_rss_mb']:,.0f} | {r['kept']:,} "
                  f"| {r['removed'].get('near_duplicate', 0):,} | {r['removed'].get('exact_duplicate', 0):,} |")
    print("\n| input | docs/s disk / memory | peak RSS disk / memory | same kept count |")
    print("|---|---:|---:|---|")
    for mb, results in rows:
        d, m = results["disk"], results["memory"]
        print(f"| {mb:g} MB | {(d['docs'] / d['secs']) / (m['docs'] / m['secs']):.2f}x "
              f"| {d['rss_mb'] / m['rss_mb']:.2f}x | {d['kept'] == m['kept'] and d['removed'] == m['removed']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="25,200", help="MB of the scale inputs, comma-separated ('' to skip)")
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

    sizes = [float(x) for x in args.sizes.split(",") if x.strip()]
    if sizes:
        prose = sorted(p for p in args.input.parent.glob("*.jsonl") if "poetry" not in p.name)
        scale_table(prose, sizes, args.workers)


if __name__ == "__main__":
    main()
