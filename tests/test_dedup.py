"""On-disk dedup (dedup.DiskDeduplicator, band_index.SortedRuns): same verdicts as datasketch's in-memory LSH,
deterministic output whatever the workers, and memory that does not grow with the number of documents."""
import random
import tracemalloc

import numpy as np
import pytest

from test_clean import POOL, read_shards, synthetic_docs, write_jsonl
from zhllm.data.band_index import SortedRuns, shared_key_groups
from zhllm.data.clean import CleanConfig, clean_corpus
from zhllm.data.dedup import (EXACT_DUPLICATE, KEEP, NEAR_DUPLICATE, REASONS, DedupConfig, Deduplicator,
                              DiskDeduplicator, dedup_keys, exact_key, minhash_signature)


def edited(text: str, n_edits: int, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(n_edits):
        chars[rng.randrange(len(chars))] = rng.choice(POOL)
    return "".join(chars)


def planted_near_duplicates(seed: int = 0) -> list[str]:
    """Distinct documents, chains of successive edits (each close to the previous one, the far end not close
    to the start), exact and re-spaced copies and Latin case variants, in shuffled order."""
    rng = random.Random(seed)
    docs = []
    for base in synthetic_docs(40, length=300, seed=seed):
        docs.append(base)
        current = base
        for _ in range(rng.randint(0, 6)):
            current = edited(current, rng.choice([2, 4, 8, 16]), rng)
            docs.append(current)
        if rng.random() < 0.4:
            docs.append(rng.choice(docs[-3:]))
        if rng.random() < 0.3:
            docs.append(base[:100] + "  " + base[100:] + "ABC")
            docs.append(base[:100] + base[100:] + "abc")
    rng.shuffle(docs)
    return docs


def memory_verdicts(docs: list[str], cfg: DedupConfig) -> list[str | None]:
    dedup = Deduplicator(cfg)
    return [dedup.check(exact_key(d), minhash_signature(d, cfg)) for d in docs]


def disk_verdicts(docs: list[str], cfg: DedupConfig, work, run_pairs: int) -> list[str | None]:
    dedup = DiskDeduplicator(cfg, work, run_pairs=run_pairs)
    for d in docs:
        dedup.add(dedup_keys(d, cfg))
    return [REASONS.get(v) for chunk in dedup.verdicts() for v in chunk.tolist()]


@pytest.mark.parametrize("threshold", [0.8, 0.5])
def test_disk_backend_finds_the_same_duplicates_as_datasketch(tmp_path, threshold):
    cfg = DedupConfig(threshold=threshold)
    docs = planted_near_duplicates()
    expected = memory_verdicts(docs, cfg)
    # 37 pairs per run and per range: dozens of runs and ranges, so the external merge really merges.
    got = disk_verdicts(docs, cfg, tmp_path / "work", run_pairs=37)
    assert got == expected
    assert expected.count("near_duplicate") >= 20 and expected.count("exact_duplicate") >= 5
    assert expected.count(None) >= 40
    assert list((tmp_path / "work").iterdir()) == []   # each generation of runs is deleted once merged


def test_a_duplicate_of_a_dropped_document_is_kept():
    """First occurrence wins against *kept* documents only: a chain A ~ B ~ C with C not close to A keeps C."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        dedup = DiskDeduplicator(DedupConfig(), tmp, run_pairs=4)
        even = [np.array(k, np.uint64) for k in ([10, 20], [10, 30], [30, 40], [41, 40], [41, 50], [20, 60])]
        for keys in even:
            dedup.add(keys)
        verdicts = np.concatenate(list(dedup.verdicts())).tolist()
    # doc 3: exact digest 41 (odd) first seen, but band 40 is in kept doc 2 -> near; doc 4: 41 again, but
    # doc 3 was dropped, so no kept document holds it -> kept.
    assert verdicts == [KEEP, NEAR_DUPLICATE, KEEP, NEAR_DUPLICATE, KEEP, NEAR_DUPLICATE]
    assert dedup.buckets == 5   # 10, 20, 30, 40, 41: one bit each; the unique 50 and 60 cost nothing


def test_exact_wins_over_near_as_the_reason(tmp_path):
    dedup = DiskDeduplicator(DedupConfig(), tmp_path, run_pairs=3)
    dedup.add(np.array([7, 8], np.uint64))
    dedup.add(np.array([7, 8], np.uint64))
    assert np.concatenate(list(dedup.verdicts())).tolist() == [KEEP, EXACT_DUPLICATE]


def test_sorted_runs_merge_ranges_keep_insertion_order(tmp_path):
    rng = np.random.default_rng(0)
    runs = SortedRuns(tmp_path, "t", buffer_pairs=50)
    keys = rng.integers(0, 40, 1000).astype(np.uint64) << np.uint64(58)   # few distinct, spread keys
    for doc, k in enumerate(keys):
        runs.add(np.array([k], np.uint64), doc)
    parts = list(runs.ranges(7))
    assert len(runs.runs) == 20 and len(parts) == 7
    merged_keys = np.concatenate([k for *_, k, _ in parts])
    merged_values = np.concatenate([v for *_, v in parts])
    order = np.argsort(keys, kind="stable")
    assert merged_keys.tolist() == keys[order].tolist() and merged_values.tolist() == order.tolist()
    mask, group = shared_key_groups(np.array([1, 2, 2, 3, 4, 4, 4], np.uint64))
    assert mask.tolist() == [False, True, True, False, True, True, True] and group.tolist() == [0, 0, 1, 1, 1]


def test_adopted_runs_of_interleaved_parts_give_the_same_verdicts(tmp_path):
    """A split clean: two deduplicators each see every other document (ids 0, 1, 2, ... of their own), a third
    adopts their runs with the ids mapped back to input order and decides as one run over all would."""
    cfg = DedupConfig()
    docs = planted_near_duplicates(seed=1)
    expected = disk_verdicts(docs, cfg, tmp_path / "one", run_pairs=37)
    parts = [DiskDeduplicator(cfg, tmp_path / f"part{k}", run_pairs=37) for k in range(2)]
    for i, d in enumerate(docs):
        parts[i % 2].add(dedup_keys(d, cfg))
    merged = DiskDeduplicator(cfg, tmp_path / "merged", run_pairs=37)
    runs = [(path, pairs, lambda ids, k=k: ids * np.uint64(2) + np.uint64(k))
            for k in (1, 0) for path, pairs in parts[k].sorted_runs()]
    assert len(runs) > 10
    merged.adopt_runs(runs, len(docs))
    assert [REASONS.get(v) for chunk in merged.verdicts() for v in chunk.tolist()] == expected
    copy = SortedRuns(tmp_path / "copy", "c", buffer_pairs=8)
    path, pairs = parts[0].sorted_runs()[0]
    copy.adopt(path, pairs, lambda v: v + np.uint64(5), chunk=3)   # copied in pieces smaller than the run
    original = np.fromfile(path, np.uint64)
    assert np.fromfile(copy.runs[0][0], np.uint64).tolist() == [*original[:pairs], *(original[pairs:] + 5)]


def _peak_traced_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _random_keys(n_docs: int, seed: int) -> list[np.ndarray]:
    """10 keys per document like the defaults (1 exact + 9 bands); every 10th document copies an earlier one."""
    rng = np.random.default_rng(seed)
    keys = [rng.integers(0, 2 ** 63, 10, dtype=np.uint64) for _ in range(n_docs)]
    for i in range(10, n_docs, 10):
        keys[i] = keys[int(rng.integers(0, i))]
    return keys


def test_disk_dedup_memory_does_not_grow_with_documents(tmp_path):
    """Peak traced allocations (numpy buffers included) of add + verdicts for 4x the documents stay the
    same; datasketch's index, measured the same way, grows with them."""
    def disk_run(keys, work):
        def run():
            dedup = DiskDeduplicator(DedupConfig(), work, run_pairs=4096)
            for k in keys:
                dedup.add(k)
            for _ in dedup.verdicts():
                pass
        return run

    def memory_run(keys):
        def run():
            dedup = Deduplicator(DedupConfig())
            for k in keys:
                dedup.check(k[:1].tobytes(), np.resize(k & np.uint64(0xFFFFFFFF), 128))
        return run

    small, large = _random_keys(2_000, 0), _random_keys(8_000, 1)
    disk_small = _peak_traced_bytes(disk_run(small, tmp_path / "a"))
    disk_large = _peak_traced_bytes(disk_run(large, tmp_path / "b"))
    assert disk_large < 1.25 * disk_small + 50_000
    mem_small, mem_large = _peak_traced_bytes(memory_run(small)), _peak_traced_bytes(memory_run(large))
    assert mem_large > 3 * mem_small   # the measurement does see per-document growth


def test_clean_backends_and_workers_give_the_same_output(tmp_path):
    docs = planted_near_duplicates(seed=3)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d, "source": f"s{i % 4}"} for i, d in enumerate(docs)])
    reports, outputs = [], []
    for name, backend, workers in [("disk1", "disk", 1), ("disk2", "disk", 2), ("mem1", "memory", 1)]:
        cfg = CleanConfig(dedup=DedupConfig(backend=backend), docs_per_shard=50)
        reports.append(clean_corpus([str(path)], tmp_path / name, cfg, workers=workers, progress=False))
        outputs.append(read_shards(tmp_path / name))
        assert not (tmp_path / name / ".dedup-work").exists()   # removed from the staging directory before the rename
    assert outputs[0] == outputs[1] == outputs[2]
    for key in ("removed", "by_source", "shards", "stages", "chars_out"):
        assert reports[0][key] == reports[1][key] == reports[2][key]
    assert reports[0]["removed"]["near_duplicate"] >= 20
    assert list(tmp_path.glob(".disk*")) == []
