"""`zhllm data clean` across machines: `clean_part` does one machine's share, `merge_clean_parts` decides.

The input stream is cut into the work units of `data tokenize` (consecutive documents, about `unit_chars`
characters each). With `num_shards=K`, part I takes units I, I+K, I+2K, ... and writes its own directory;
each part still *reads* the whole input to find its units, which is cheap next to normalising, filtering
and hashing them. A part decides nothing about duplicates: it keeps the documents that passed the filters
(`candidates.spill`, clean.py's spill format), their dedup keys as sorted runs numbered by the part's own
document order (`keys/`), how many of them each of its units gave (`units.npy`) and its counts (`part.json`).

The merge lays the parts' documents out in input order again (unit 0 from part 0, unit 1 from part 1, ...),
renumbers each part's key runs into that order and runs the single machine's deduplicator and shard writer:
first occurrence still wins over the whole input, and the output is byte-identical to `clean_corpus` of the
same inputs, report.json included except its timing (`seconds` adds the parts' times to the merge's).
Memory is bounded as in a single run, plus 8 bytes per work unit.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..corpus.readers import ReadStats, expand_inputs, iter_text_records
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_directory, atomic_write_text
from ..outputs import check_output_dir, read_marker
from .clean import (CLEAN_COMMAND, CleanConfig, Spill, _count_chars, _report, _source, check_clean_config,
                    new_counts, parse_spilled, prepared_batches, write_kept_shards)
from .dedup import DedupConfig, DiskDeduplicator, keys_per_doc
from .tokenize import DEFAULT_UNIT_CHARS

PART_COMMAND = "data clean --num-shards"
PART_FILE = "part.json"
CANDIDATES = "candidates.spill"
UNITS = "units.npy"
FORMAT_VERSION = 1


def clean_part(inputs: Iterable[str | Path] | str | Path, out_dir: str | Path, num_shards: int, shard_index: int,
               config: CleanConfig | None = None, field: str | None = None, strict: bool = False,
               txt_mode: Literal["line", "paragraph"] = "line", workers: int = 1, progress: bool = True,
               overwrite: bool = False, unit_chars: int = DEFAULT_UNIT_CHARS) -> dict:
    """Part `shard_index` of `num_shards` of `clean_corpus(inputs, ...)` into `out_dir` (see the module
    docstring); returns part.json's summary. `out_dir` follows outputs.py, as its own kind of output."""
    cfg = check_clean_config(config or CleanConfig())
    _check_part_args(cfg, num_shards, shard_index, workers, unit_chars)
    raw_inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = expand_inputs(raw_inputs)
    check_output_dir(out_dir, PART_COMMAND, inputs=[*raw_inputs, *files], overwrite=overwrite)
    job = {"format_version": FORMAT_VERSION, "num_shards": num_shards, "unit_chars": unit_chars, "field": field,
           "strict": strict, "txt_mode": txt_mode, "config": asdict(cfg),
           "inputs": [[f.name, f.stat().st_size] for f in files]}
    stats = ReadStats()
    records = ((text, _source(rec.data) if cfg.keep_source else None)
               for text, rec in iter_text_records(files, field, strict, stats, txt_mode))
    units = _PartUnits(num_shards, shard_index, unit_chars)
    start = time.perf_counter()
    with atomic_directory(out_dir, marker=PART_COMMAND) as tmp:
        counts = new_counts()
        dedup = DiskDeduplicator(cfg.dedup, tmp / "keys") if keys_per_doc(cfg.dedup) else None
        spill = Spill(tmp / CANDIDATES)
        try:
            _spill_part(units.select(records), cfg, workers, spill, dedup, units, counts, progress)
        finally:
            spill.close()
        if stats.docs == 0:
            raise ZhllmError(f"no documents read from {', '.join(map(str, files))} ({stats.summary().splitlines()[0]})")
        np.save(tmp / UNITS, np.array(units.mine, np.int64).reshape(-1, 3)[:, [0, 2]])
        runs = dedup.sorted_runs() if dedup is not None else []
        info = {"job": job, "shard_index": shard_index, "inputs": [str(f) for f in files],
                "units_total": units.total, "units": len(units.mine), "candidates": spill.docs,
                "candidates_bytes": (tmp / CANDIDATES).stat().st_size,
                "key_runs": [[path.relative_to(tmp).as_posix(), pairs] for path, pairs in runs],
                "sources": list(spill.sources), "changed": counts["changed"], "chars_in": counts["chars_in"],
                "removed": dict(sorted(counts["removed"].items())),
                "sources_in": {name: c["in"] for name, c in sorted(counts["by_source"].items())},
                "read_stats": stats.to_dict(), "seconds": round(time.perf_counter() - start, 3)}
        atomic_write_text(tmp / PART_FILE, json.dumps(info, ensure_ascii=False, indent=1) + "\n")
    return info


def _check_part_args(cfg: CleanConfig, num_shards: int, shard_index: int, workers: int, unit_chars: int) -> None:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ZhllmError(f"--shard-index must be in [0, {num_shards}) and --num-shards >= 1, "
                         f"got index {shard_index} of {num_shards}")
    if workers < 1:
        raise ZhllmError(f"--workers must be at least 1, got {workers}")
    if unit_chars < 1:
        raise ZhllmError(f"the work unit size must be positive, got {unit_chars}")
    if cfg.dedup.backend != "disk" and keys_per_doc(cfg.dedup):
        raise ConfigError("a split data clean needs dedup.backend: disk (the merge decides from the parts' "
                          f"on-disk keys), got {cfg.dedup.backend!r}")


class _PartUnits:
    """Cuts the records into work units, passes on this part's, and notes [unit, documents, candidates]."""

    def __init__(self, num_shards: int, shard_index: int, unit_chars: int):
        self.num_shards, self.shard_index, self.unit_chars = num_shards, shard_index, unit_chars
        self.mine: list[list[int]] = []
        self.total = 0

    def select(self, records: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, str | None]]:
        unit, size = [], 0
        for record in records:
            unit.append(record)
            size += len(record[0])
            if size >= self.unit_chars:
                yield from self._close(unit)
                unit, size = [], 0
        if unit:
            yield from self._close(unit)

    def _close(self, unit: list) -> list:
        number = self.total
        self.total += 1
        if number % self.num_shards != self.shard_index:
            return []
        # Noted before its documents are passed on, so the consumer always finds the unit of a document.
        self.mine.append([number, len(unit), 0])
        return unit


def _spill_part(records: Iterator[tuple[str, str | None]], cfg: CleanConfig, workers: int, spill: Spill,
                dedup: DiskDeduplicator | None, units: _PartUnits, counts: dict, progress: bool) -> None:
    from tqdm import tqdm
    row, left = -1, 0
    with prepared_batches(_count_chars(records, counts), cfg, workers) as prepared, \
            tqdm(desc="clean part", unit="doc", disable=not progress, smoothing=0.1) as bar:
        for batch in prepared:
            for doc in batch:
                while left == 0:
                    row += 1
                    left = units.mine[row][1]
                left -= 1
                if spill.add(doc, dedup, counts):
                    units.mine[row][2] += 1
            bar.update(len(batch))
            bar.set_postfix_str(f"candidates={spill.docs:,}", refresh=False)


# ------------------------------------------------------------------------------------------------- merge


@dataclass
class _Part:
    directory: Path
    info: dict
    units: np.ndarray       # [unit, candidates] rows of this part's units, in order

    def id_map(self, unit_start: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Maps this part's document ids (its candidates in its order) to ids in input order, where unit u's
        first candidate is `unit_start[u]`."""
        counts = self.units[:, 1].astype(np.uint64)
        local_start = np.cumsum(counts) - counts
        shift = unit_start[self.units[:, 0]].astype(np.uint64) - local_start

        def to_input_order(ids: np.ndarray) -> np.ndarray:
            # side="right": a unit without candidates shares its start with the next one and holds none of them
            return ids + shift[np.searchsorted(local_start, ids, side="right") - 1]
        return to_input_order


def merge_clean_parts(part_dirs: Iterable[str | Path], out_dir: str | Path, progress: bool = True,
                      overwrite: bool = False) -> dict:
    """Merge the directories of all `clean_part` parts of one job into `out_dir`: the shards and report.json
    `clean_corpus` writes for the same inputs (see the module docstring); returns the report."""
    part_dirs = [Path(p) for p in part_dirs]
    parts = _load_parts(part_dirs)
    check_output_dir(out_dir, CLEAN_COMMAND, inputs=part_dirs, overwrite=overwrite)
    start = time.perf_counter()
    first = parts[0].info
    config = first["job"]["config"]
    per_unit = np.zeros(first["units_total"], np.int64)
    for part in parts:
        per_unit[part.units[:, 0]] = part.units[:, 1]
    unit_start = np.cumsum(per_unit) - per_unit
    total = int(per_unit.sum())
    counts = _merged_counts(parts)
    with atomic_directory(out_dir, marker=CLEAN_COMMAND) as tmp:
        work = tmp / ".dedup-work"   # as in a single run: inside the staging directory, gone before the rename
        try:
            dedup_cfg = DedupConfig(**config["dedup"])
            if keys_per_doc(dedup_cfg):
                dedup = DiskDeduplicator(dedup_cfg, work)
                dedup.adopt_runs(((part.directory / name, pairs, part.id_map(unit_start))
                                  for part in parts for name, pairs in part.info["key_runs"]), total)
                verdicts = dedup.verdicts()
            else:
                verdicts = (np.zeros(min(1 << 20, total - i), np.uint8) for i in range(0, total, 1 << 20))
            with ExitStack() as stack:
                handles = [stack.enter_context(open(part.directory / CANDIDATES, "rb")) for part in parts]
                lines = _lines_in_input_order(parts, handles, per_unit)
                shards = write_kept_shards(tmp, config["docs_per_shard"], lines, verdicts, counts, progress, total)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - start + sum(part.info["seconds"] for part in parts)
        report = _report([Path(f) for f in first["inputs"]], config, ReadStats.from_dict(first["read_stats"]),
                         counts, shards, seconds)
        atomic_write_text(tmp / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    return report


def _lines_in_input_order(parts: list[_Part], handles: list, per_unit: np.ndarray
                          ) -> Iterator[tuple[int, str | None, bytes]]:
    for unit, n in enumerate(per_unit.tolist()):
        k = unit % len(parts)
        fh, names = handles[k], parts[k].info["sources"]
        for _ in range(n):
            yield parse_spilled(fh.readline(), names)


def _merged_counts(parts: list[_Part]) -> dict:
    counts = new_counts()
    for part in parts:
        info = part.info
        counts["removed"].update(Counter(info["removed"]))
        counts["changed"] += info["changed"]
        counts["chars_in"] += info["chars_in"]
        for name, n in info["sources_in"].items():
            counts["by_source"].setdefault(name, {"in": 0, "kept": 0})["in"] += n
    return counts


def _load_parts(part_dirs: list[Path]) -> list[_Part]:
    """The parts of one job, in shard-index order; anything missing, foreign or mismatched is one error."""
    if not part_dirs:
        raise ZhllmError("no part directories given")
    parts = [_load_part(d) for d in part_dirs]
    parts.sort(key=lambda p: p.info["shard_index"])
    first = parts[0]
    for part in parts[1:]:
        if part.info["job"] != first.info["job"]:
            diff = sorted(k for k in set(first.info["job"]) | set(part.info["job"])
                          if first.info["job"].get(k) != part.info["job"].get(k))
            raise ZhllmError(f"parts {first.directory} and {part.directory} come from different data clean jobs "
                             f"(different {', '.join(diff)}); run every part with the same inputs and settings")
        if part.info["read_stats"] != first.info["read_stats"] or part.info["units_total"] != first.info["units_total"]:
            raise ZhllmError(f"parts {first.directory} and {part.directory} read different documents from inputs of "
                             "the same names and sizes; rerun the parts on identical input files")
    num_shards = first.info["job"]["num_shards"]
    indexes = [p.info["shard_index"] for p in parts]
    if len(set(indexes)) != len(indexes):
        twice = sorted({i for i in indexes if indexes.count(i) > 1})
        raise ZhllmError(f"--shard-index {', '.join(map(str, twice))} given more than once among the parts")
    missing = sorted(set(range(num_shards)) - set(indexes))
    if missing:
        raise ZhllmError(f"got {len(parts)} of {num_shards} parts: --shard-index {', '.join(map(str, missing))} "
                         "missing")
    for part in parts:
        expected = np.arange(part.info["shard_index"], first.info["units_total"], num_shards)
        if not np.array_equal(part.units[:, 0], expected):
            raise ZhllmError(f"{part.directory} is damaged ({UNITS} does not list the part's work units); "
                             "rerun that part")
    return parts


def _load_part(directory: Path) -> _Part:
    marker = read_marker(directory) if directory.is_dir() else None
    if marker is None or marker["command"] != PART_COMMAND:
        what = "is not a directory" if not directory.is_dir() else (
            f"holds the output of `zhllm {marker['command']}`" if marker else "was not written by zhllm")
        raise ZhllmError(f"{directory} {what}, not a part of `zhllm {PART_COMMAND} K --shard-index I`")
    try:
        info = json.loads((directory / PART_FILE).read_text(encoding="utf-8"))
        units = np.load(directory / UNITS).reshape(-1, 2)
        if info["job"]["format_version"] != FORMAT_VERSION:
            raise ZhllmError(f"{directory} was written by another zhllm version (part format "
                             f"{info['job']['format_version']}, this one reads {FORMAT_VERSION}); rerun that part")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZhllmError(f"{directory} is damaged ({e}); rerun that part") from None
    sizes = [(directory / CANDIDATES, info["candidates_bytes"])]
    sizes += [(directory / name, 16 * pairs) for name, pairs in info["key_runs"]]
    for path, size in sizes:
        if not path.is_file() or path.stat().st_size != size:
            raise ZhllmError(f"{directory} is damaged ({path.name} is missing or has the wrong size); rerun that part")
    if int(units[:, 1].sum()) != info["candidates"]:
        raise ZhllmError(f"{directory} is damaged ({UNITS} does not add up to its candidates); rerun that part")
    return _Part(directory, info, units)


def format_part_summary(info: dict, out_dir: str | Path) -> str:
    """What `zhllm data clean --num-shards` prints: this part's counts and the next step."""
    k, n = info["shard_index"], info["job"]["num_shards"]
    docs = info["candidates"] + sum(info["removed"].values())
    removed = ", ".join(f"{reason} {count}" for reason, count in info["removed"].items()) or "none"
    return (f"part {k} of {n} (--shard-index {k}): {info['units']} of {info['units_total']} work units, "
            f"{docs} documents, {info['candidates']} passed the filters (removed: {removed}), "
            f"{info['seconds']} s; duplicates are decided when all parts are merged:\n"
            f"  zhllm data clean-merge --parts PART_DIR... --out OUT   (this part: {out_dir})")
