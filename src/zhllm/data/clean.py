"""`zhllm data clean`: normalise, filter and deduplicate a corpus into jsonl.gz shards plus report.json.

Per document: read (bad records counted by the readers) -> normalise (normalize.py) -> quality filters
(quality.py) -> exact dedup -> MinHash near dedup (dedup.py) -> write. The pure per-document work (including
the dedup keys) runs in `workers` processes; deduplication and writing run in this process in input order,
so the output is the same whatever the worker count. With the default `dedup.backend: disk` the documents
that pass the filters are first spilled, in output form, to a file in the staging directory while their
keys go to the on-disk index; the verdicts then come in input order and the survivors are copied into
the shards. The output directory appears complete or not at all (fsutil), temporary files included.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import shutil
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from ..config import load_config
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_directory, atomic_write_text
from ..outputs import check_output_dir
from .dedup import (REASONS, DedupConfig, Deduplicator, DiskDeduplicator, check_dedup_config, dedup_keys, exact_key,
                    minhash_signature)
from .normalize import normalize_text
from .ordered_pool import guarded_initializer
from .quality import QualityThresholds, quality_reason
from ..corpus.readers import ReadStats, expand_inputs, iter_text_records

STAGES = ("read", "normalize", "quality", "exact_dedup", "near_dedup")
_BATCH = 256


@dataclass
class CleanConfig:
    """Everything `zhllm data clean` does to a document; load with `load_clean_config`."""
    nfkc: bool = True               # NFKC except Chinese punctuation (see normalize.py for why)
    t2s: bool = False               # traditional -> simplified with OpenCC
    opencc_config: str = "t2s"
    join_cjk_spaces: bool = False   # "我 爱 北京" -> "我爱北京" for word-segmented sources
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    docs_per_shard: int = 100_000
    keep_source: bool = True        # copy a string `source` field of the input record to the output


def load_clean_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CleanConfig:
    return check_clean_config(load_config(CleanConfig, path, overrides))


def check_clean_config(cfg: CleanConfig) -> CleanConfig:
    """Values the type system cannot rule out; each mistake is one ConfigError naming the key."""
    q = cfg.quality
    ratios = {"quality.min_cjk_ratio": q.min_cjk_ratio, "quality.max_symbol_ratio": q.max_symbol_ratio,
              "quality.max_dup_line_ratio": q.max_dup_line_ratio, "quality.max_char_run_ratio": q.max_char_run_ratio,
              "quality.max_dup_ngram_ratio": q.max_dup_ngram_ratio}
    for key, value in ratios.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")
    positive = {"docs_per_shard": cfg.docs_per_shard, "quality.dup_ngram_size": q.dup_ngram_size,
                "dedup.shingle_size": cfg.dedup.shingle_size, "dedup.num_perm": cfg.dedup.num_perm}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    check_dedup_config(cfg.dedup)
    if q.min_chars < 0 or q.max_chars < 0:
        raise ConfigError("quality.min_chars and quality.max_chars must not be negative (max_chars 0 = no limit)")
    if cfg.t2s:
        from .normalize import to_simplified
        try:
            to_simplified("測試", cfg.opencc_config)
        except Exception as e:  # opencc raises its own types for unknown configs
            raise ConfigError(f"opencc_config {cfg.opencc_config!r} is not an OpenCC conversion ({e})") from None
    return cfg


@dataclass
class Prepared:
    """A document after the per-document (parallel) work: its text, or the reason it was dropped."""
    text: str | None
    source: str | None
    stage: str | None = None
    reason: str | None = None
    changed: bool = False
    key: bytes | None = None
    signature: object = None
    keys: object = None         # dedup_keys, for the disk backend


def prepare_document(text: str, source: str | None, cfg: CleanConfig) -> Prepared:
    """Normalise and quality-check one document and compute its dedup signatures (a pure function)."""
    cleaned = normalize_text(text, cfg.nfkc, cfg.t2s, cfg.opencc_config, cfg.join_cjk_spaces)
    changed = cleaned != text
    if not cleaned:
        return Prepared(None, source, "normalize", "empty_after_normalize", changed)
    reason = quality_reason(cleaned, cfg.quality)
    if reason:
        return Prepared(None, source, "quality", reason, changed)
    if _on_disk(cfg):
        return Prepared(cleaned, source, changed=changed, keys=dedup_keys(cleaned, cfg.dedup))
    key = exact_key(cleaned) if cfg.dedup.exact else None
    signature = minhash_signature(cleaned, cfg.dedup) if cfg.dedup.near else None
    return Prepared(cleaned, source, changed=changed, key=key, signature=signature)


def _on_disk(cfg: CleanConfig) -> bool:
    # With both kinds off there is nothing to remember: the streaming path is bounded already.
    return cfg.dedup.backend == "disk" and (cfg.dedup.exact or cfg.dedup.near)


_worker_cfg: CleanConfig | None = None


def _init_worker(cfg: CleanConfig) -> None:
    global _worker_cfg
    _worker_cfg = cfg


def _prepare_batch(batch: list[tuple[str, str | None]]) -> list[Prepared]:
    return [prepare_document(text, source, _worker_cfg) for text, source in batch]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


class JsonlShardWriter:
    """`part-00000.jsonl.gz`, ... with at most `docs_per_shard` documents each."""

    def __init__(self, out_dir: Path, docs_per_shard: int):
        self.out_dir, self.docs_per_shard = out_dir, docs_per_shard
        self.shards: list[dict] = []
        self._fh = None
        self._count = 0

    def write_line(self, line: bytes, chars: int) -> None:
        """One document's JSON line (newline included) whose text has `chars` characters."""
        if self._fh is None or self._count >= self.docs_per_shard:
            self._open_next()
        self._fh.write(line)
        self._count += 1
        self.shards[-1]["docs"] += 1
        self.shards[-1]["chars"] += chars

    def _open_next(self) -> None:
        self.close()
        name = f"part-{len(self.shards):05d}.jsonl.gz"
        # Level 3: on Chinese jsonl only 4% larger than level 6 at under half its CPU (measured on the
        # shared prose sample); the shards are an intermediate read once by the tokenizer.
        # mtime 0: the gzip header would otherwise stamp the time, and the shards differ run to run.
        self._fh = gzip.GzipFile(self.out_dir / name, "wb", compresslevel=3, mtime=0)
        self.shards.append({"file": name, "docs": 0, "chars": 0})
        self._count = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


CLEAN_COMMAND = "data clean"


def clean_corpus(inputs: Iterable[str | Path] | str | Path, out_dir: str | Path, config: CleanConfig | None = None,
                 field: str | None = None, strict: bool = False, txt_mode: Literal["line", "paragraph"] = "line",
                 workers: int = 1, progress: bool = True, overwrite: bool = False) -> dict:
    """Clean `inputs` into `out_dir` (jsonl.gz shards + report.json) and return the report.
    `out_dir` follows the output policy of outputs.py (`overwrite`: replace another zhllm command's output)."""
    cfg = check_clean_config(config or CleanConfig())
    if workers < 1:
        raise ZhllmError(f"--workers must be at least 1, got {workers}")
    raw_inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = expand_inputs(raw_inputs)
    check_output_dir(out_dir, CLEAN_COMMAND, inputs=[*raw_inputs, *files], overwrite=overwrite)
    stats = ReadStats()
    records = ((text, _source(rec.data) if cfg.keep_source else None)
               for text, rec in iter_text_records(files, field, strict, stats, txt_mode))
    start = time.perf_counter()
    with atomic_directory(out_dir, marker=CLEAN_COMMAND) as tmp:
        writer = JsonlShardWriter(tmp, cfg.docs_per_shard)
        try:
            counts = _run(records, cfg, workers, writer, progress)
        finally:
            writer.close()
        if stats.docs == 0:
            raise ZhllmError(f"no documents read from {', '.join(map(str, files))} ({stats.summary().splitlines()[0]})")
        report = _report(files, asdict(cfg), stats, counts, writer.shards, time.perf_counter() - start)
        atomic_write_text(tmp / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report


def _source(data: dict) -> str | None:
    value = data.get("source")
    return value if isinstance(value, str) else None


def new_counts() -> dict:
    """What `_run` and the parts of a split run count, before the report adds them up."""
    return {"removed": Counter(), "changed": 0, "chars_in": 0, "chars_out": 0, "kept": 0, "by_source": {}}


def _run(records: Iterator[tuple[str, str | None]], cfg: CleanConfig, workers: int, writer: JsonlShardWriter,
         progress: bool) -> dict:
    from tqdm import tqdm
    counts = new_counts()
    # Inside the staging directory, so a failed or killed run takes it along; removed before the rename.
    work = writer.out_dir / ".dedup-work"
    spill = None
    try:
        if _on_disk(cfg):
            work.mkdir()
            dedup, spill = DiskDeduplicator(cfg.dedup, work), Spill(work / "candidates.jsonl")
        else:
            dedup = Deduplicator(cfg.dedup)
        with prepared_batches(_count_chars(records, counts), cfg, workers) as prepared, \
                tqdm(desc="clean", unit="doc", disable=not progress, smoothing=0.1) as bar:
            for batch in prepared:
                for doc in batch:
                    if spill is not None:
                        spill.add(doc, dedup, counts)
                    else:
                        _keep_or_drop(doc, dedup, writer, counts)
                bar.update(len(batch))
                if spill is not None:
                    bar.set_postfix_str(f"candidates={dedup.docs:,}", refresh=False)
                else:
                    bar.set_postfix_str(f"kept={counts['kept']:,}", refresh=False)
        if spill is not None:
            write_survivors(spill.lines(), dedup.verdicts(), writer, counts, progress, dedup.docs)
    finally:
        if spill is not None:
            spill.close()
        shutil.rmtree(work, ignore_errors=True)
    return counts


@contextmanager
def prepared_batches(records: Iterator[tuple[str, str | None]], cfg: CleanConfig,
                     workers: int) -> Iterator[Iterator[list[Prepared]]]:
    """`prepare_document` of every (text, source) record, in batches, in input order, from `workers` processes."""
    pool = _pool_context().Pool(workers, *guarded_initializer(_init_worker, (cfg,))) if workers > 1 else None
    _init_worker(cfg)
    try:
        batches = _batches(records, _BATCH)
        yield _bounded_imap(pool, batches, 4 * workers) if pool else map(_prepare_batch, batches)
    finally:
        if pool:
            pool.terminate()
            pool.join()


class Spill:
    """Documents that passed the filters, as `chars<TAB>source index<TAB>output JSON line`, awaiting verdicts;
    `sources` maps source names to the indexes written."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")
        self.sources: dict[str, int] = {}
        self.docs = 0

    def add(self, doc: Prepared, dedup: DiskDeduplicator | None, counts: dict) -> bool:
        """Count `doc`; spill it and give `dedup` its keys when it passed the filters (then return True)."""
        counts["changed"] += doc.changed
        if doc.source is not None:
            counts["by_source"].setdefault(doc.source, {"in": 0, "kept": 0})["in"] += 1
        if doc.reason:
            counts["removed"][doc.reason] += 1
            return False
        if dedup is not None:
            dedup.add(doc.keys)
        source = -1 if doc.source is None else self.sources.setdefault(doc.source, len(self.sources))
        self._fh.write(f"{len(doc.text)}\t{source}\t".encode() + _json_line(doc))
        self.docs += 1
        return True

    def lines(self) -> Iterator[tuple[int, str | None, bytes]]:
        """The spilled documents in order, as `parse_spilled` returns them."""
        self._fh.close()
        names = list(self.sources)
        with open(self.path, "rb") as fh:
            for raw in fh:
                yield parse_spilled(raw, names)

    def close(self) -> None:
        self._fh.close()


def parse_spilled(raw: bytes, names: list[str]) -> tuple[int, str | None, bytes]:
    """(characters, source name, output JSON line) of one spilled line; `names` are the spill's sources."""
    chars, source, line = raw.split(b"\t", 2)
    return int(chars), None if source == b"-1" else names[int(source)], line


def write_survivors(lines: Iterator[tuple[int, str | None, bytes]], verdicts: Iterator[np.ndarray],
                    writer: JsonlShardWriter, counts: dict, progress: bool, total: int) -> None:
    """Write the spilled `lines` whose verdict (dedup.KEEP, ...; in chunks, same order) keeps them; count the rest."""
    from tqdm import tqdm
    with tqdm(total=total, desc="dedup", unit="doc", disable=not progress, smoothing=0.1) as bar:
        for chunk in verdicts:
            for verdict in chunk.tolist():
                chars, source, line = next(lines)
                if verdict:
                    counts["removed"][REASONS[verdict]] += 1
                    continue
                writer.write_line(line, chars)
                counts["kept"] += 1
                counts["chars_out"] += chars
                if source is not None:
                    counts["by_source"][source]["kept"] += 1
            bar.update(len(chunk))
            bar.set_postfix_str(f"kept={counts['kept']:,}", refresh=False)


def write_kept_shards(out_dir: Path, docs_per_shard: int, lines: Iterator[tuple[int, str | None, bytes]],
                      verdicts: Iterator[np.ndarray], counts: dict, progress: bool, total: int) -> list[dict]:
    """`write_survivors` into new shards in `out_dir`; returns report.json's `shards` entries."""
    writer = JsonlShardWriter(out_dir, docs_per_shard)
    try:
        write_survivors(lines, verdicts, writer, counts, progress, total)
    finally:
        writer.close()
    return writer.shards


def _pool_context():
    # fork where the OS has it: workers need no torch/datasketch re-import (`import zhllm` costs seconds),
    # and the work here is pure Python/numpy, which forks safely.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _bounded_imap(pool, batches: Iterator[list], max_pending: int) -> Iterator[list[Prepared]]:
    """Like pool.imap, but reads ahead at most `max_pending` batches: imap's feeder thread would pull the
    whole corpus into memory when workers are slower than reading."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_prepare_batch, (batch,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _count_chars(records: Iterable[tuple[str, str | None]], counts: dict) -> Iterator[tuple[str, str | None]]:
    for text, source in records:
        counts["chars_in"] += len(text)
        yield text, source


def _keep_or_drop(doc: Prepared, dedup: Deduplicator, writer: JsonlShardWriter, counts: dict) -> None:
    counts["changed"] += doc.changed
    reason = doc.reason or dedup.check(doc.key, doc.signature)
    if doc.source is not None:  # which sources lose most tells the user where their noise comes from
        per_source = counts["by_source"].setdefault(doc.source, {"in": 0, "kept": 0})
        per_source["in"] += 1
        per_source["kept"] += reason is None
    if reason:
        counts["removed"][reason] += 1
        return
    writer.write_line(_json_line(doc), len(doc.text))
    counts["kept"] += 1
    counts["chars_out"] += len(doc.text)


def _json_line(doc: Prepared) -> bytes:
    out = {"text": doc.text}
    if doc.source is not None:
        out["source"] = doc.source
    return (json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8")


_STAGE_OF = {"empty_after_normalize": "normalize", "exact_duplicate": "exact_dedup", "near_duplicate": "near_dedup"}


def _report(files: list[Path], config: dict, stats: ReadStats, counts: dict, shards: list[dict],
            seconds: float) -> dict:
    removed: Counter = counts["removed"]
    docs_in = stats.docs
    stages, remaining = [], docs_in + stats.bad_total
    for stage in STAGES:
        if stage == "read":
            reasons = dict(stats.bad)
        else:
            reasons = {r: n for r, n in removed.items() if _STAGE_OF.get(r, "quality") == stage}
        n_removed = sum(reasons.values())
        stages.append({"stage": stage, "in": remaining, "removed": n_removed, "out": remaining - n_removed,
                       "reasons": dict(sorted(reasons.items()))})
        remaining -= n_removed
    return {
        "inputs": [str(f) for f in files],
        "config": config,
        "records_read": docs_in + stats.bad_total,
        "docs_in": docs_in,
        "docs_kept": counts["kept"],
        "docs_changed_by_normalize": counts["changed"],
        "chars_in": counts["chars_in"],
        "chars_out": counts["chars_out"],
        "removed": dict(sorted(removed.items())),
        "by_source": dict(sorted(counts["by_source"].items())),
        "stages": stages,
        "read": stats.to_dict(),
        "shards": shards,
        "seconds": round(seconds, 3),
        "docs_per_second": round(docs_in / seconds, 1) if seconds > 0 else None,
    }


def format_clean_report(report: dict) -> str:
    """The summary table printed by `zhllm data clean`."""
    rows = [("stage", "in", "removed", "out", "reasons")]
    for s in report["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
        rows.append((s["stage"], str(s["in"]), str(s["removed"]), str(s["out"]), reasons))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(4)) + "  " + r[4]
             for r in rows]
    kept, docs_in = report["docs_kept"], report["docs_in"]
    share = f"{100 * kept / docs_in:.1f}%" if docs_in else "-"
    lines.append(f"kept {kept} of {docs_in} documents ({share}), {report['chars_out']} of {report['chars_in']} "
                 f"characters, {len(report['shards'])} shard(s), {report['docs_per_second']} docs/s; "
                 f"normalisation changed {report['docs_changed_by_normalize']} documents")
    for example in report["read"]["examples"]:
        lines.append(f"bad record: {example}")
    return "\n".join(lines)
