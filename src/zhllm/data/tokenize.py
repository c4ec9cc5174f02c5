"""`zhllm data tokenize`: pre-tokenise a corpus into token shards, in parallel, resumably, across machines.

The input stream is cut into ordered *work units* (consecutive documents, about `unit_chars` characters
each). Units are tokenised in worker processes and written strictly in unit order, so the bytes on disk do
not depend on the number of workers. Consecutive units form a shard *group* (`train-00000` + `val-00000`)
that closes once it holds `shard_tokens` training tokens; a group becomes real when its `done-*.json`
marker is written after both shards were renamed into place. A rerun keeps the finished groups and restarts
at the first unit after them: same layout, no duplicates, no gaps.

With `num_shards=K`, part I takes units I, I+K, I+2K, ... and names its shards `train-00Iof00K-*`; every
part writes into the same directory and the part that finishes last writes a complete `meta.json` (rerun
any finished part to rewrite it). Each part still *reads* the whole input to find its units, which is cheap
next to tokenising it.

The validation split is a stable hash (blake2b) of each document's text, not a random draw, so a document
lands in the same split on every machine and every rerun.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ZhllmError
from ..fsutil import atomic_write_text
from ..pointers import resolve_model_dir
from ..tokenizer.special import EOS
from .ordered_pool import imap_ordered
from .shard_dir import TOKENIZER_SUBDIR, copy_tokenizer, token_dtype, tokenizer_fingerprint, write_meta
from .shards import VERSION, ShardWriter, build_meta, open_shard_dir

DEFAULT_SHARD_TOKENS = 2 ** 27  # 128 Mi tokens: 256 MB uint16 files, few enough for any file system
DEFAULT_UNIT_CHARS = 262_144  # small enough to balance workers, big enough to amortise the hand-off
TOKENIZE_COMMAND = "data tokenize"


def is_validation(text: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of blake2b(text) as a number in [0, 1)."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2 ** 64 < val_fraction


# ---------------------------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, val_fraction: float, single_threaded: bool):
    if single_threaded:  # one process per core already; rayon threads on top would only contend
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from ..tokenizer.encode import text_backend

    _WORKER.update(backend=text_backend(Tokenizer.from_str(tokenizer_json)), eos_id=eos_id,
                   dtype=np.dtype(dtype), val_fraction=val_fraction)


def _pack(docs: list[list[int]], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by EOS; return (tokens, lengths)."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(docs) else 0, dtype=dtype)
    tokens[ends - 1] = eos_id
    for doc, start in zip(docs, ends - lengths):
        tokens[start:start + len(doc)] = doc
    return tokens, lengths


def tokenize_unit(texts: list[str]) -> dict:
    """One work unit -> packed train/val tokens, document lengths and utf-8 byte counts."""
    from ..tokenizer.encode import encode_batch_texts

    w = _WORKER
    ids = encode_batch_texts(w["backend"], texts)
    out = {}
    val = [is_validation(t, w["val_fraction"]) for t in texts]
    for split, wanted in (("train", False), ("val", True)):
        pick = [k for k, v in enumerate(val) if v is wanted]
        tokens, lengths = _pack([ids[k] for k in pick], w["eos_id"], w["dtype"])
        out[split] = (tokens, lengths, sum(len(texts[k].encode("utf-8")) for k in pick))
    return out


# ----------------------------------------------------------------------------------------------- the job


@dataclass
class TokenizeReport:
    out_dir: Path
    part: str
    units_done: int = 0
    units_resumed: int = 0
    splits: dict = field(default_factory=dict)
    complete: bool = False
    read_summary: str = ""
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("output", str(self.out_dir)), ("part", self.part),
                ("work units", f"{self.units_done} tokenized, {self.units_resumed} kept from an earlier run")]
        for split, s in self.splits.items():
            rows.append((f"{split}", f"{s['documents']:,} docs, {s['tokens']:,} tokens, {s['bytes'] / 1e6:,.1f} MB "
                                     f"text, {s['shards']} shards"))
        rows += [("input", self.read_summary), ("directory", "complete" if self.complete else
                                                 "waiting for other parts"), ("time", f"{self.seconds:.1f} s")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@dataclass
class _Job:
    """Everything that fixes the output layout; a rerun must match it to resume."""
    out_dir: Path
    signature: dict
    num_shards: int
    shard_index: int

    @property
    def part_prefix(self) -> str:
        return "" if self.num_shards == 1 else f"{self.shard_index:03d}of{self.num_shards:03d}-"

    def group_name(self, seq: int) -> str:
        return f"{self.part_prefix}{seq:05d}"

    @property
    def part_marker(self) -> Path:
        return self.out_dir / f"part-{self.shard_index:03d}of{self.num_shards:03d}.json"


def tokenize_corpus(inputs: list[str], tokenizer: str | Path, out_dir: str | Path, field: str | None = None,
                    val_fraction: float = 0.0, workers: int | None = None, num_shards: int = 1,
                    shard_index: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS, strict: bool = False,
                    unit_chars: int = DEFAULT_UNIT_CHARS, progress: bool = True,
                    overwrite: bool = False) -> TokenizeReport:
    """Tokenise `inputs` into a shard directory (see the module docstring); returns what was done.
    `out_dir` follows outputs.py; `overwrite` also restarts an output of a different tokenize job."""
    from ..corpus.readers import ReadStats, expand_inputs, iter_texts

    start_time = time.perf_counter()
    _check_args(val_fraction, workers, num_shards, shard_index, shard_tokens, unit_chars)
    workers = workers or os.cpu_count() or 1
    files = expand_inputs(inputs)
    tokenizer = resolve_model_dir(tokenizer)  # a checkpoints/latest pointer: its files are copied below
    backend, vocab_size, eos_id = read_tokenizer(tokenizer)
    fingerprint = tokenizer_fingerprint(backend)
    out_dir = Path(out_dir)
    job = _Job(out_dir, {"format_version": VERSION, "tokenizer_sha256": fingerprint, "field": field,
                         "val_fraction": val_fraction, "shard_tokens": shard_tokens, "unit_chars": unit_chars,
                         "num_shards": num_shards, "inputs": [[f.name, f.stat().st_size] for f in files]},
               num_shards, shard_index)
    _claim_directory(job, Path(tokenizer), [*inputs, *files], overwrite)

    report = TokenizeReport(out_dir, f"{shard_index + 1} of {num_shards}")
    if job.part_marker.exists():  # this part finished earlier: only refresh meta.json
        stats = ReadStats.from_dict(json.loads(job.part_marker.read_text(encoding="utf-8"))["read_stats"])
    else:
        done = _finished_groups(job)
        resume_unit = done[-1]["units"][1] if done else 0
        stats = ReadStats()
        texts = iter_texts(files, field=field, strict=strict, stats=stats)
        units = ((u, t) for u, t in enumerate(_work_units(texts, unit_chars))
                 if u % num_shards == shard_index and u >= resume_unit)
        worker_args = (backend.to_str(), eos_id, token_dtype(vocab_size).name, val_fraction)
        report.units_resumed = sum(g["unit_count"] for g in done)
        report.units_done = _run_units(job, units, len(done), resume_unit, worker_args, workers,
                                       token_dtype(vocab_size), eos_id, shard_tokens, progress)
        if stats.docs == 0:
            raise ZhllmError(f"no documents found in {', '.join(map(str, inputs))} ({stats.why_empty()})")
        atomic_write_text(job.part_marker, json.dumps({"job": job.signature, "read_stats": stats.to_dict()}) + "\n")
    meta = _refresh_meta(job, vocab_size, eos_id, fingerprint, stats)
    report.splits, report.complete = meta["splits"], meta["complete"]
    report.read_summary = stats.summary().splitlines()[0]
    report.seconds = time.perf_counter() - start_time
    return report


def _check_args(val_fraction, workers, num_shards, shard_index, shard_tokens, unit_chars) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ZhllmError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise ZhllmError(f"--workers must be at least 1, got {workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ZhllmError(f"--shard-index must be in [0, {num_shards}) and --num-shards >= 1, "
                         f"got index {shard_index} of {num_shards}")
    if shard_tokens < 1 or unit_chars < 1:
        raise ZhllmError("--shard-tokens and the unit size must be positive")


def read_tokenizer(path: str | Path):
    """(tokenizers.Tokenizer, vocab size, EOS id) of a tokenizer directory.

    With a tokenizer.json we read it with `tokenizers` alone: importing transformers would cost seconds
    before the first unit starts. Directories without one (vocab.json + merges.txt, ...) go through
    AutoTokenizer, which builds the fast tokenizer for us.
    """
    from tokenizers import Tokenizer

    path = resolve_model_dir(path)
    if (path / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust error types are not importable; any failure means a bad file
            raise ZhllmError(f"{path}/tokenizer.json: cannot load ({str(e).splitlines()[0]})") from None
        eos = _configured_eos(path)
        eos_id = tok.token_to_id(eos) if eos else None
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    else:
        from ..tokenizer.load import load_tokenizer

        hf = load_tokenizer(path)
        tok = getattr(hf, "backend_tokenizer", None)
        if tok is None:
            raise ZhllmError(f"tokenizer {path} has no fast (tokenizers) backend; save it with a tokenizer.json")
        eos_id, vocab_size = hf.eos_token_id, len(hf)
    if eos_id is None:
        eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise ZhllmError(f"tokenizer {path} has no EOS token to end documents with")
    return tok, vocab_size, int(eos_id)


def _configured_eos(path: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                return eos
    return None


def _claim_directory(job: _Job, tokenizer_path: Path, inputs: list, overwrite: bool) -> None:
    """Create the output (job.json + tokenizer copy), or check that an existing one is the same job."""
    from ..outputs import claim_output_dir
    out = job.out_dir
    job_file = out / "job.json"
    # job.json: a tokenize output written before outputs carried a marker
    claim_output_dir(out, TOKENIZE_COMMAND, inputs=[*inputs, tokenizer_path], overwrite=overwrite,
                     recognise=lambda d: (d / "job.json").is_file())
    if job_file.exists():
        old = json.loads(job_file.read_text(encoding="utf-8"))
        diff = [k for k in sorted(set(old) | set(job.signature)) if old.get(k) != job.signature.get(k)]
        if diff and not overwrite:
            raise ZhllmError(f"{out} holds shards of a different tokenize job (different {', '.join(diff)}); "
                             "pass --overwrite to start it afresh, or use another --out")
        if diff:
            shutil.rmtree(out)
            claim_output_dir(out, TOKENIZE_COMMAND)
    if not job_file.exists():
        atomic_write_text(job_file, json.dumps(job.signature, indent=2, ensure_ascii=False) + "\n")
    if not (out / TOKENIZER_SUBDIR).is_dir():
        copy_tokenizer(tokenizer_path, out)


def _work_units(texts: Iterable[str], unit_chars: int) -> Iterator[list[str]]:
    """Texts in units of about `unit_chars`; a reading error (--strict) comes after the texts read before it."""
    unit, size = [], 0
    try:
        for text in texts:
            unit.append(text)
            size += len(text)
            if size >= unit_chars:
                yield unit
                unit, size = [], 0
    except Exception:
        if unit:
            yield unit
        raise
    if unit:
        yield unit


def _finished_groups(job: _Job) -> list[dict]:
    """Markers of this part's groups 0..n-1 (the contiguous finished prefix); clears leftovers of a crash."""
    for stale in job.out_dir.glob(f".*-{job.part_prefix}*.tmp-*"):
        stale.unlink(missing_ok=True)
    done = []
    while (marker := job.out_dir / f"done-{job.group_name(len(done))}.json").exists():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("job") != job.signature:
            break
        done.append(info)
    return done


def _run_units(job: _Job, units: Iterator[tuple[int, list[str]]], seq: int, first_unit: int, worker_args: tuple,
               workers: int, dtype: np.dtype, eos_id: int, shard_tokens: int, progress: bool) -> int:
    """Tokenise units (in parallel) and write them in order into groups of shards; returns units done."""
    bar = _progress_bar(progress)
    group = _Group(job, seq, first_unit, dtype, eos_id)
    done = 0
    try:
        for unit, result in _map_in_order(units, worker_args, workers):
            group.add(unit, result)
            done += 1
            bar.update(sum(r[2] for r in result.values()))
            bar.tokens += sum(len(r[0]) for r in result.values())
            bar.set_postfix_str(f"{bar.tokens / max(bar.format_dict['elapsed'], 1e-9) / 1e3:,.0f}k tok/s",
                                refresh=False)
            if group.train.tokens >= shard_tokens:
                group.commit()
                group = _Group(job, group.seq + 1, unit + 1, dtype, eos_id)
        if group.units:
            group.commit()
        else:
            group.abort()
    except BaseException:
        group.abort()
        raise
    finally:
        bar.close()
    return done


class _Group:
    """The train + val shards being filled from consecutive units of this part."""

    def __init__(self, job: _Job, seq: int, first_unit: int, dtype: np.dtype, eos_id: int):
        self.job, self.seq, self.units, self.count = job, seq, [first_unit, first_unit], 0
        name = job.group_name(seq)
        self.train = ShardWriter(job.out_dir, f"train-{name}", dtype, eos_id)
        self.val = ShardWriter(job.out_dir, f"val-{name}", dtype, eos_id)

    def add(self, unit: int, result: dict) -> None:
        self.units[1] = unit + 1
        self.count += 1
        for split, writer in (("train", self.train), ("val", self.val)):
            tokens, lengths, num_bytes = result[split]
            writer.add_documents(tokens, lengths, num_bytes)

    def commit(self) -> None:
        shards = [w.close() if w.documents else w.abort() for w in (self.train, self.val)]
        marker = {"job": self.job.signature, "units": self.units, "unit_count": self.count,
                  "shards": [s for s in shards if s]}
        atomic_write_text(self.job.out_dir / f"done-{self.job.group_name(self.seq)}.json",
                          json.dumps(marker, indent=1) + "\n")

    def abort(self) -> None:
        for w in (self.train, self.val):
            w.abort()


def _map_in_order(units, worker_args: tuple, workers: int) -> Iterator[tuple[int, dict]]:
    """(unit index, tokenize_unit result) in input order; at most 2*workers units in flight (bounded memory)."""
    return imap_ordered(tokenize_unit, units, workers, _init_worker, (*worker_args, workers > 1),
                        died="a tokenizer worker process died (out of memory?); rerun the same command to resume")


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(desc="tokenize", unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
               dynamic_ncols=True)
    bar.tokens = 0
    return bar


def _refresh_meta(job: _Job, vocab_size: int, eos_id: int, fingerprint: str, stats) -> dict:
    """meta.json from every finished group of every part present; `complete` once all parts are done."""
    out = job.out_dir
    parts_done = sorted(p.name for p in out.glob(f"part-*of{job.num_shards:03d}.json"))
    shards = []
    for marker in sorted(out.glob("done-*.json")):
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("job") == job.signature:
            shards += info["shards"]
    shards.sort(key=lambda s: (s["split"] != "train", s["name"]))
    meta = build_meta(vocab_size, eos_id, fingerprint, shards, complete=len(parts_done) == job.num_shards,
                      progress=f"{len(parts_done)} of {job.num_shards} parts done", job=job.signature,
                      read_stats=stats.to_dict())
    write_meta(out, meta)
    if meta["complete"]:
        open_shard_dir(out)  # verify what we just described
    return meta
