"""SFT shards: chat records encoded once (`zhllm data tokenize-sft`), so `zhllm sft` starts without encoding.

Encoding conversations through the chat template runs at a few hundred records per second, and the
in-memory path repeats it at every start and resume. A shard directory stores the result, in the spirit of
the pretraining token shards (ARCHITECTURE "Formats"):

    meta.json        format "zhllm-sft-shards", version, dtype, vocab_size, tokenizer_sha256, the encode
                     options (format, max_len, overflow, strict, val_fraction, seed), per-split counts, and
                     the SFTStats / ReadStats of the run (what was skipped, by reason and file:line)
    train.bin        flat token ids of all training conversations (uint16, or uint32 for big vocabularies)
    train.mask       one uint8 per token: 1 where the token is trained (its label is its own id), else 0
    train.idx        int64 start offset of every conversation
    val.*            the same for the validation conversations (absent when there are none)
    tokenizer/       a copy of the tokenizer files, so the directory describes itself

The val split is the same seeded choice the in-memory path makes (`choose_val_examples`), and the
conversations are in input order, so training from shards gives the same batches as training from the
files. Records are encoded in worker processes in ordered units, so the bytes do not depend on --workers.
The directory is written under a temporary name and renamed when complete (rule 5).
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..corpus.read_stats import ReadStats
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_directory
from ..pointers import resolve_model_dir
from .chat import FORMATS, SFTStats, encode_records, tokenizers_single_threaded
from .ordered_pool import imap_ordered
from .sft_batches import SFTDataset, choose_val_examples, examples_to_arrays
from .shard_dir import (META_FILE, SPLITS, TOKENIZER_SUBDIR, ShardDir, copy_tokenizer, meta_header,
                        token_dtype, tokenizer_fingerprint, write_meta)

FORMAT = "zhllm-sft-shards"
VERSION = 1
SFT_COMMAND = "data tokenize-sft"
UNIT_RECORDS = 64  # records per work unit: fixed (never derived from --workers) so the output is too
COPY_EXAMPLES = 1024  # conversations per chunk when splitting the encoded stream into train/val
ENCODE_OPTIONS = ("format", "max_len", "overflow", "strict")  # fixed at tokenisation; see sft_shard_datasets


# ---------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer, options: dict, dtype: str) -> None:
    _WORKER.update(tok=tokenizer, options=options, dtype=np.dtype(dtype))


def encode_unit(records: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, SFTStats]:
    """One unit of records -> (ids, loss mask, lengths, stats), exactly as `encode_records` encodes them."""
    w = _WORKER
    stats = SFTStats()
    examples = encode_records(w["tok"], records, stats=stats, **w["options"])
    ids, mask, lengths = examples_to_arrays(examples)
    return ids.astype(w["dtype"]), mask, lengths, stats


def _units(records: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """Records in units of `size`. When reading fails (--strict at a bad line), the records read before it
    still go out as a last unit before the error: one of them may be a bad conversation that comes first
    in the file, and --strict must name the first bad record in file order."""
    unit: list = []
    try:
        for rec in records:
            unit.append(rec)
            if len(unit) == size:
                yield len(unit), unit
                unit = []
    except Exception:
        if unit:
            yield len(unit), unit
        raise
    if unit:
        yield len(unit), unit


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class SFTShardReport:
    out_dir: Path
    splits: dict
    sft_stats: SFTStats
    read_stats: ReadStats
    seconds: float

    def table(self) -> str:
        s = self.sft_stats
        skipped = ", ".join(f"{reason} {n} (e.g. {', '.join(s.examples.get(reason, []))})"
                            for reason, n in s.skipped.most_common()) or "none"
        rows = [("output", str(self.out_dir)), ("input", self.read_stats.summary().splitlines()[0]),
                ("records", f"{s.records:,} ({_record_kinds(s)})"), ("skipped", skipped),
                ("truncated", f"{s.truncated:,} (earlier turns dropped)")]
        for split, c in self.splits.items():
            rows.append((split, f"{c['examples']:,} examples, {c['tokens']:,} tokens, "
                                f"{c['trained_tokens']:,} trained"))
        rows += [("tokens", f"{s.tokens:,}, trained {s.trained_tokens:,} "
                            f"({100 * s.trained_tokens / max(s.tokens, 1):.1f}%)"),
                 ("time", f"{self.seconds:.1f} s, {s.records / max(self.seconds, 1e-9):,.0f} records/s")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _record_kinds(s: SFTStats) -> str:
    """Records by format plus the ones no format accepted, so the parts add up to the record count (formats
    count valid conversations only; a too-long one is counted there and again under skipped)."""
    parts = [f"{fmt} {n:,}" for fmt, n in s.formats.most_common()]
    invalid = s.records - sum(s.formats.values())
    return ", ".join(parts + ([f"invalid {invalid:,}"] if invalid else [])) or "none"


def tokenize_sft(inputs: list[str], tokenizer_dir: str | Path, out_dir: str | Path, *, max_len: int,
                 fmt: str = "auto", overflow: str = "truncate", val_fraction: float = 0.0, seed: int = 0,
                 strict: bool = False, workers: int | None = None, progress: bool = True,
                 overwrite: bool = False) -> SFTShardReport:
    """Encode chat files into an SFT shard directory (see the module docstring); returns what was done.

    `max_len` must be <= the train.seq_len the shards will be trained with; `val_fraction` and `seed` pick the
    validation conversations exactly as `zhllm sft` would with data.val_fraction and train.seed.
    """
    from ..corpus.readers import expand_inputs, iter_records
    from ..tokenizer.load import load_tokenizer

    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    _check_args(fmt, max_len, overflow, val_fraction, workers)
    out_dir = Path(out_dir)
    files = expand_inputs(inputs)
    _check_out_dir(out_dir, [*inputs, *files, tokenizer_dir], overwrite)
    tokenizer_dir = resolve_model_dir(tokenizer_dir)  # checkpoints/latest: record and copy the step it names
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    options = {"fmt": fmt, "max_len": max_len, "overflow": overflow, "strict": strict}
    stats, read_stats = SFTStats(), ReadStats()
    with atomic_directory(out_dir, marker=SFT_COMMAND) as tmp:
        records = iter_records(files, strict=strict, stats=read_stats)
        lengths = _encode_all(tmp, records, tokenizer, options, dtype, workers, stats, progress)
        if not len(lengths):
            raise ZhllmError(f"no SFT examples in {', '.join(map(str, inputs))} "
                             f"({stats.records} records, all skipped or empty; {read_stats.why_empty()})")
        splits = _write_splits(tmp, lengths, choose_val_examples(len(lengths), val_fraction, seed), dtype)
        copy_tokenizer(tokenizer_dir, tmp)
        meta = {**meta_header(FORMAT, VERSION, vocab_size),
                "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "tokenizer_source": str(tokenizer_dir),
                "tokenizer_dir": TOKENIZER_SUBDIR,
                "options": {"format": fmt, "max_len": max_len, "overflow": overflow, "strict": strict,
                            "val_fraction": val_fraction, "seed": seed},
                "splits": splits, "sft_stats": _stats_dict(stats), "read_stats": read_stats.to_dict(),
                "inputs": [[f.name, f.stat().st_size] for f in files]}
        write_meta(tmp, meta)
    return SFTShardReport(out_dir, splits, stats, read_stats, time.perf_counter() - start)


def _stats_dict(stats: SFTStats) -> dict:
    # asdict alone would rebuild the Counters from (key, value) pairs, counting the pairs
    return {**asdict(stats), "formats": dict(stats.formats), "skipped": dict(stats.skipped)}


def _check_args(fmt: str, max_len: int, overflow: str, val_fraction: float, workers: int) -> None:
    if fmt not in FORMATS:
        raise ZhllmError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ZhllmError(f"--max-len must be an integer of at least 2 tokens, got {max_len!r}")
    if overflow not in ("truncate", "skip"):
        raise ZhllmError(f"--overflow must be 'truncate' or 'skip', not {overflow!r}")
    if not 0 <= val_fraction < 1:
        raise ZhllmError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ZhllmError(f"--workers must be at least 1, got {workers}")


def _check_out_dir(out_dir: Path, inputs: list, overwrite: bool) -> None:
    """The outputs.py policy; SFT shards written before outputs carried a marker count as this command's."""
    from ..outputs import check_output_dir

    def sft_shards(d: Path) -> bool:
        try:
            open_sft_shards(d)
        except ZhllmError:
            return False
        return True

    check_output_dir(out_dir, SFT_COMMAND, inputs=inputs, overwrite=overwrite, recognise=sft_shards)


def _encode_all(tmp: Path, records: Iterable, tokenizer, options: dict, dtype: np.dtype, workers: int,
                stats: SFTStats, progress: bool) -> np.ndarray:
    """Encode every record (in parallel, in input order) into hidden all-examples files; return the lengths."""
    from tqdm.auto import tqdm

    lengths = []
    bar = tqdm(desc="tokenize sft", unit="rec", disable=not progress, dynamic_ncols=True)
    try:
        with open(tmp / ".all.bin", "wb") as fb, open(tmp / ".all.mask", "wb") as fm, tokenizers_single_threaded():
            for n, (ids, mask, lens, unit_stats) in imap_ordered(
                    encode_unit, _units(records, UNIT_RECORDS), workers, _init_worker, (tokenizer, options, dtype.name),
                    died="an SFT encoding worker died (out of memory?); rerun with fewer --workers"):
                fb.write(ids.tobytes())
                fm.write(mask.tobytes())
                lengths.append(lens)
                stats.merge(unit_stats)
                bar.update(n)
                bar.set_postfix_str(f"{stats.tokens:,} tokens, {sum(stats.skipped.values())} skipped", refresh=False)
    finally:
        bar.close()
        _WORKER.clear()  # the serial path ran here: drop its tokenizer reference
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def _write_splits(tmp: Path, lengths: np.ndarray, is_val: np.ndarray, dtype: np.dtype) -> dict:
    """Copy the all-examples stream into train.* and val.* (chunk by chunk: bounded memory), then drop it."""
    ids_all = np.memmap(tmp / ".all.bin", dtype=dtype, mode="r")
    mask_all = np.memmap(tmp / ".all.mask", dtype=np.uint8, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    splits = {}
    for split, wanted in (("train", False), ("val", True)):
        pick = np.flatnonzero(is_val == wanted)
        counts = {"examples": len(pick), "tokens": 0, "trained_tokens": 0}
        if len(pick):
            with open(tmp / f"{split}.bin", "wb") as fb, open(tmp / f"{split}.mask", "wb") as fm, \
                    open(tmp / f"{split}.idx", "wb") as fi:
                for c in range(0, len(pick), COPY_EXAMPLES):
                    sel = pick[c:c + COPY_EXAMPLES]
                    lens = lengths[sel]
                    ends = np.cumsum(lens)
                    # token positions of the chosen conversations: one arange shifted per conversation
                    where = np.arange(int(ends[-1])) + np.repeat(starts[sel] - (ends - lens), lens)
                    fb.write(np.asarray(ids_all[where]).tobytes())
                    mask = np.asarray(mask_all[where])
                    fm.write(mask.tobytes())
                    fi.write((counts["tokens"] + ends - lens).astype(np.int64).tobytes())
                    counts["tokens"] += int(ends[-1])
                    counts["trained_tokens"] += int(mask.sum())
        splits[split] = counts
    del ids_all, mask_all
    for name in (".all.bin", ".all.mask"):
        (tmp / name).unlink()
    return splits


# ----------------------------------------------------------------------------------------------- reading


class SFTShards(ShardDir):
    """A verified SFT shard directory: meta.json checked against the files, arrays memory-mapped."""

    FORMAT, VERSION, KIND, A_KIND = FORMAT, VERSION, "SFT shard", "an SFT shard"

    def no_meta_message(self) -> str:
        return (f"{self.path}: not a complete SFT shard directory (no meta.json; an interrupted "
                "zhllm data tokenize-sft leaves no meta.json: run it again)")

    def check_files(self) -> None:
        for split in SPLITS:
            c = self.meta["splits"][split]
            if c["examples"]:
                sizes = {".bin": c["tokens"] * self.dtype.itemsize, ".mask": c["tokens"], ".idx": c["examples"] * 8}
                for ext, size in sizes.items():
                    self.check_size(f"{split}{ext}", size,
                                    "damaged SFT shard directory; re-run zhllm data tokenize-sft")

    def examples(self, split: str) -> int:
        return int(self.meta["splits"][split]["examples"])

    def dataset(self, split: str, seq_len: int, packing: bool = True, seed: int = 0,
                pad_id: int = 0) -> SFTDataset | None:
        """The split as an SFTDataset over memory maps (None when the split is empty)."""
        if not self.examples(split):
            return None
        ids = np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")
        mask = np.memmap(self.path / f"{split}.mask", dtype=np.uint8, mode="r")
        starts = np.memmap(self.path / f"{split}.idx", dtype=np.int64, mode="r")
        return SFTDataset.from_arrays(ids, mask, np.append(starts, len(ids)), seq_len, packing, seed, pad_id)

    def sft_stats(self) -> SFTStats:
        d = dict(self.meta["sft_stats"])
        return SFTStats(**{**d, "formats": Counter(d["formats"]), "skipped": Counter(d["skipped"])})

    def read_stats(self) -> ReadStats:
        return ReadStats.from_dict(self.meta["read_stats"])


def open_sft_shards(path: str | Path) -> SFTShards:
    return SFTShards(path)


def find_sft_shards(paths: list[str]) -> Path | None:
    """The SFT shard directory named by data.path, or None when it names chat files.

    A directory holding a meta.json (or the .mask files of shards) is meant as shards: it must be the only
    entry, and a broken one is an error rather than a directory of chat files.
    """
    dirs = [Path(p) for p in paths if Path(p).is_dir() and
            ((Path(p) / META_FILE).exists() or any(Path(p).glob("*.mask")) or any(Path(p).glob(".all.*")))]
    if not dirs:
        return None
    if len(paths) > 1:
        raise ConfigError(f"data.path names the SFT shard directory {dirs[0]} together with other inputs; "
                          "give it alone (tokenize all chat files into one shard directory)")
    return dirs[0]


def sft_shard_datasets(path: str | Path, tokenizer, seq_len: int, packing: bool = True, seed: int = 0,
                       val_fraction: float = 0.0, requested: dict | None = None):
    """(train, val or None, SFTStats, ReadStats) from an SFT shard directory, as `build_sft_datasets` gives.

    The encode options (format, max_len, overflow, strict) were fixed at tokenisation: `requested` holds the
    ones the config set to a non-default value, and each must equal the shards' value. The validation set is
    the shards' val split: `val_fraction` 0 takes it as it is, any other value must equal the fraction the
    shards were made with. `tokenizer` must have the vocabulary the shards were encoded with.
    """
    shards = open_sft_shards(path)
    meta, opts = shards.meta, shards.meta["options"]
    mine = tokenizer_fingerprint(tokenizer)
    if mine != meta["tokenizer_sha256"]:
        where = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ZhllmError(f"{path} was tokenized with {meta.get('tokenizer_source')} (vocabulary sha256 "
                         f"{meta['tokenizer_sha256'][:12]}), but the model's tokenizer {where} differs "
                         f"({mine[:12]}); re-run zhllm data tokenize-sft --tokenizer {where}")
    for key, value in (requested or {}).items():
        if value != opts[key]:
            raise ConfigError(f"data.{key}={value} but {path} was tokenized with {key} {opts[key]}; "
                              f"drop data.{key} or re-run zhllm data tokenize-sft")
    if opts["max_len"] > seq_len:
        raise ConfigError(f"{path} holds conversations up to max_len {opts['max_len']} tokens, more than "
                          f"train.seq_len={seq_len}; re-run zhllm data tokenize-sft --max-len {seq_len}")
    if val_fraction and not math.isclose(val_fraction, opts["val_fraction"]):
        raise ConfigError(f"data.val_fraction={val_fraction} but {path} was tokenized with --val-fraction "
                          f"{opts['val_fraction']}; its val split is used as it is: set data.val_fraction=0 "
                          f"(or {opts['val_fraction']}), or re-run zhllm data tokenize-sft")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = shards.dataset("train", seq_len, packing, seed, pad_id)
    val = shards.dataset("val", seq_len, packing, seed, pad_id)
    return train, val, shards.sft_stats(), shards.read_stats()
