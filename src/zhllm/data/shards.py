"""Binary token shards: the on-disk format, its writer and reader, and the packed dataset that trains on it.

A shard directory (ARCHITECTURE "Formats") holds `meta.json`, pairs `train-00000.bin` (flat token ids,
uint16 or uint32) + `train-00000.idx` (int64 start offset of every document), the same for `val-*`, and the
tokenizer in `tokenizer/` so the directory is self-describing (what all shard kinds share: shard_dir.py).
Every document ends with EOS.

Writers put each file under a temporary name and rename it when complete; `meta.json` is written last and
only when the whole job is done, so a reader that finds a valid `meta.json` whose sizes match never sees a
half-written shard (rule 5).

`PackedTokenDataset` sees a split as one flat token stream cut into windows of `seq_len + 1` tokens that
overlap by one (every token is a target exactly once per epoch). Window order is a pure function of
(seed, epoch), addressed by ONE global integer: the trainer's data position (rule 6).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ZhllmError
from .shard_dir import SPLITS, TOKENIZER_SUBDIR, ShardDir, check_split, meta_header
from .window_order import EpochOrder, MixSchedule

FORMAT = "zhllm-token-shards"
VERSION = 1


# --------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Append documents to one shard (`<name>.bin` + `<name>.idx`); `close()` renames them into place.

    Until `close()` the data lives under hidden temporary names, so a crash leaves nothing that looks
    like a shard. Use as a context manager: an exception aborts and deletes the temporaries.
    """

    def __init__(self, out_dir: str | Path, name: str, dtype: np.dtype | str, eos_id: int):
        self.out_dir, self.name = Path(out_dir), name
        self.dtype, self.eos_id = np.dtype(dtype), int(eos_id)
        self.tokens = self.documents = self.bytes = 0
        tag = uuid.uuid4().hex[:8]
        self._tmp = {ext: self.out_dir / f".{name}{ext}.tmp-{tag}" for ext in (".bin", ".idx")}
        self._bin = open(self._tmp[".bin"], "wb")
        self._idx = open(self._tmp[".idx"], "wb")

    def add_document(self, ids: Sequence[int], num_bytes: int = 0) -> None:
        """One document's ids (EOS is appended here) and the utf-8 size of its source text."""
        self.add_documents(np.append(np.asarray(ids, dtype=np.int64), self.eos_id),
                           np.array([len(ids) + 1]), num_bytes)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, num_bytes: int = 0) -> None:
        """Many documents at once: `tokens` is their concatenation, each already ending with EOS."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError("document lengths do not add up to the number of tokens")
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ZhllmError(f"token id out of range for {self.dtype.name} shards")
        ends = np.cumsum(lengths)
        if len(lengths) and np.any(np.asarray(tokens)[ends - 1] != self.eos_id):
            raise ValueError("every document must end with EOS")
        starts = self.tokens + ends - lengths
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._idx.write(starts.astype(np.int64).tobytes())
        self.tokens += len(tokens)
        self.documents += len(lengths)
        self.bytes += int(num_bytes)

    def close(self) -> dict:
        """Make the shard visible under its final name and return its meta entry."""
        for fh in (self._bin, self._idx):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        for ext, tmp in self._tmp.items():
            os.replace(tmp, self.out_dir / f"{self.name}{ext}")
        return {"name": self.name, "split": self.name.split("-", 1)[0], "tokens": self.tokens,
                "documents": self.documents, "bytes": self.bytes}

    @property
    def is_open(self) -> bool:
        return not self._bin.closed

    def abort(self) -> None:
        """Drop the temporaries (a no-op once closed or aborted)."""
        if not self.is_open:
            return
        for fh in (self._bin, self._idx):
            fh.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def build_meta(vocab_size: int, eos_id: int, tokenizer_sha256: str, shards: list[dict], **extra) -> dict:
    """The meta.json content: format header, per-shard counts and per-split totals."""
    splits = {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        splits[split] = {k: sum(s[k] for s in mine) for k in ("tokens", "documents", "bytes")}
        splits[split]["shards"] = len(mine)
    return {**meta_header(FORMAT, VERSION, vocab_size), "eos_id": int(eos_id), "tokenizer_sha256": tokenizer_sha256,
            "tokenizer_dir": TOKENIZER_SUBDIR, "splits": splits, "shards": shards, **extra}


# --------------------------------------------------------------------------------------------- reading


class ShardDirectory(ShardDir):
    """A verified token shard directory: meta.json checked against the files, token arrays memory-mapped."""

    FORMAT, VERSION, KIND, A_KIND = FORMAT, VERSION, "token shard", "a token shard"

    def no_meta_message(self) -> str:
        path = self.path
        if any(path.glob("*.bin")) or any(path.glob(".*.tmp-*")) or any(path.glob("done-*.json")):
            return (f"{path}: half-written shard directory (no meta.json yet); "
                    "rerun `zhllm data tokenize` with the same arguments to finish it")
        return super().no_meta_message()

    def check_meta(self, meta: dict) -> None:
        if not meta.get("complete", True):
            raise ZhllmError(f"{self.path}: tokenize job not finished ({meta.get('progress', 'some parts missing')}); "
                             "run the missing parts, then use the directory")

    def check_files(self) -> None:
        for shard in self.meta["shards"]:
            self.check_size(f"{shard['name']}.bin", shard["tokens"] * self.dtype.itemsize,
                            "truncated or half-written shard")
            self.check_size(f"{shard['name']}.idx", shard["documents"] * 8, "truncated or half-written shard")

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def shards(self, split: str) -> list[dict]:
        return [s for s in self.meta["shards"] if s["split"] == split and s["tokens"] > 0]

    def tokens(self, name: str) -> np.ndarray:
        return np.memmap(self.path / f"{name}.bin", dtype=self.dtype, mode="r")

    def doc_starts(self, name: str) -> np.ndarray:
        return np.memmap(self.path / f"{name}.idx", dtype=np.int64, mode="r")

    def document(self, split: str, k: int) -> np.ndarray:
        """The k-th document of a split (ids including its EOS), for inspection and tests."""
        for shard in self.shards(split):
            if k < shard["documents"]:
                starts = self.doc_starts(shard["name"])
                end = starts[k + 1] if k + 1 < len(starts) else shard["tokens"]
                return np.asarray(self.tokens(shard["name"])[starts[k]:end])
            k -= shard["documents"]
        raise IndexError(f"{split} split has fewer documents than requested")


def open_shard_dir(path: str | Path) -> ShardDirectory:
    return ShardDirectory(path)


# --------------------------------------------------------------------------------------------- dataset


class _TokenStream:
    """One split of one or more shard directories, seen as a single flat array of tokens."""

    def __init__(self, dirs: list[ShardDirectory], split: str):
        self.arrays = [d.tokens(s["name"]) for d in dirs for s in d.shards(split)]
        self.num_bytes = sum(s["bytes"] for d in dirs for s in d.shards(split))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries when needed."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self.offsets[k])
            piece = self.arrays[k][local:local + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out


class _WindowSource:
    """Windows of one token stream, visited in a seeded order that changes every epoch."""

    def __init__(self, stream: _TokenStream, seq_len: int, seed: tuple, shuffle: bool):
        self.stream, self.seq_len = stream, seq_len
        self.num_windows = (len(stream) - 1) // seq_len
        self.order = EpochOrder(self.num_windows, seed, shuffle)

    def window(self, k: int) -> np.ndarray:
        """The k-th window this source yields, counting across its own epochs."""
        j = self.order.window_at(k)
        return self.stream.read(j * self.seq_len, self.seq_len + 1)

    def window_index(self, k: int) -> int:
        """Which of the stream's windows the k-th one yielded is (the same window in every epoch)."""
        return self.order.window_at(k)


class PackedTokenDataset:
    """Fixed windows of `seq_len + 1` tokens over one or many shard directories, addressed by one integer.

    `window(i)` takes a GLOBAL index over all epochs (epoch = i // len(self)); `batch(start, count)` stacks
    windows start..start+count-1. The trainer keeps one `position` (windows consumed by all ranks): rank r
    of world w with micro-batch b reads `batch(position + r*b, b)`, then position += w*b, so a resume with
    a different number of processes continues exactly.

    Without `weights` the directories are concatenated and each epoch visits every window exactly once.
    With `weights`, each directory is its own source with its own epochs, and a seeded schedule draws
    from them in those proportions (len(self) is then the windows of the sources with weight > 0).
    """

    def __init__(self, paths: Sequence[str | Path] | str | Path, seq_len: int, split: str = "train",
                 weights: Sequence[float] | None = None, seed: int = 0, shuffle: bool = True):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ZhllmError("PackedTokenDataset needs at least one shard directory")
        if seq_len < 1:
            raise ZhllmError(f"seq_len must be positive, got {seq_len}")
        check_split(split)
        self.dirs = [ShardDirectory(p) for p in paths]
        _check_compatible(self.dirs)
        self.seq_len, self.split, self.seed = int(seq_len), split, int(seed)
        if weights is None:
            streams = [_TokenStream(self.dirs, split)]
            self._schedule = None
        else:
            weights = _check_weights(weights, len(paths))
            streams = [_TokenStream([d], split) for d in self.dirs]
            self._schedule = MixSchedule(weights, self.seed)
        self._sources = [_WindowSource(st, self.seq_len, (self.seed, n), shuffle) for n, st in enumerate(streams)]
        self._weights = weights or [1.0]
        self._streams = streams
        for n, src in enumerate(self._sources):
            if src.num_windows < 1 and (weights is None or weights[n] > 0):
                where = paths[n] if weights is not None else ", ".join(map(str, paths))
                raise ZhllmError(f"seq_len {seq_len} is longer than the {split} data in {where} "
                                 f"({len(src.stream)} tokens)")

    def __len__(self) -> int:
        return sum(src.num_windows for src, w in zip(self._sources, self._weights) if w > 0)

    def window(self, i: int) -> np.ndarray:
        if i < 0:
            raise IndexError(f"window index must be >= 0, got {i}")
        if self._schedule is None:
            return self._sources[0].window(i)
        s, k = self._schedule.locate(i)
        return self._sources[s].window(k)

    def window_key(self, i: int) -> tuple[int, int]:
        """(source, window number within that source's stream) of global window i: what identifies a window's
        tokens across epochs (e.g. to cache a teacher's outputs for it)."""
        if i < 0:
            raise IndexError(f"window index must be >= 0, got {i}")
        if self._schedule is None:
            return 0, self._sources[0].window_index(i)
        s, k = self._schedule.locate(i)
        return s, self._sources[s].window_index(k)

    def windows_per_source(self) -> list[int]:
        return [src.num_windows for src in self._sources]

    def batch(self, start: int, count: int):
        """torch.LongTensor (count, seq_len + 1) of windows start..start+count-1."""
        import torch

        return torch.from_numpy(np.stack([self.window(start + j) for j in range(count)]))

    def rank_batch(self, position: int, rank: int, world_size: int, micro_batch: int):
        """This rank's share of the global batch that begins at `position` (advance position by w*b)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        return self.batch(position + rank * micro_batch, micro_batch)

    @property
    def vocab_size(self) -> int:
        return self.dirs[0].vocab_size

    @property
    def eos_id(self) -> int:
        return self.dirs[0].eos_id

    @property
    def tokenizer_dir(self) -> Path:
        return self.dirs[0].tokenizer_dir

    @cached_property
    def num_tokens(self) -> int:
        return sum(len(st) for st in self._streams)

    @cached_property
    def bytes_per_token(self) -> float:
        """utf-8 bytes of source text per token (EOS included): bits/byte = loss_nats / ln2 / this."""
        return sum(st.num_bytes for st in self._streams) / max(self.num_tokens, 1)


def _check_compatible(dirs: list[ShardDirectory]) -> None:
    first = dirs[0]
    for d in dirs[1:]:
        for key in ("vocab_size", "eos_id", "tokenizer_sha256"):
            if d.meta.get(key) != first.meta.get(key):
                raise ZhllmError(f"cannot mix {first.path} and {d.path}: different {key} "
                                 "(they were tokenized with different tokenizers)")


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ZhllmError(f"got {len(weights)} mixing weights for {n} shard directories")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ZhllmError(f"mixing weights must be non-negative with a positive sum, got {weights}")
    return weights
