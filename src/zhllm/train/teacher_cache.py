"""A disk cache of a distillation teacher's top-k next-token logits, per training window.

The loop visits every window once per epoch, and again after a resume; with `teacher.cache` the teacher runs once
per window: the first visit computes the top-k logits at each position and writes them into memory-mapped files,
every later visit reads them. Windows are keyed by where their tokens are (`PackedTokenDataset.window_key`), not by
when they are visited, so the cache serves every epoch and any number of processes.

A cache directory holds `meta.json` (the teacher's, the shards' and the window shape's fingerprints: a cache made
for anything else is an error, never overwritten), and per data source `ids-<n>.bin` (windows, seq_len, k) token
ids, `logits-<n>.bin` (same shape, fp16) and `filled-<n>.bin` (a byte per window, set after its rows are written).
The files are sparse until filled: 4 (vocabularies over 65536: 6) bytes x k per cached token.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import ZhllmError
from ..fsutil import atomic_write_text
from ..pointers import resolve_model_dir

FORMAT = "zhllm-teacher-topk"
CACHE_FILE = re.compile(r"^(ids|logits|filled)-\d+\.bin$")


class KeyedWindows:
    """Training windows with their cache keys: `batch` gives {"tokens": (B, T+1), "windows": (B, 2) (source,
    window)}; everything else is the wrapped PackedTokenDataset's."""

    def __init__(self, data):
        self.data = data

    def batch(self, start: int, count: int) -> dict:
        keys = [self.data.window_key(start + j) for j in range(count)]
        return {"tokens": self.data.batch(start, count), "windows": torch.tensor(keys, dtype=torch.long)}

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name):
        return getattr(self.data, name)


def teacher_fingerprint(path: str | Path) -> str:
    """The teacher checkpoint's identity: its config and its weight files' names, sizes and modification times."""
    path = resolve_model_dir(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class TeacherTopKCache:
    def __init__(self, directory: str | Path, data, k: int, vocab: int, teacher: str):
        self.dir, self.k = Path(directory), k
        meta = {"format": FORMAT, "version": 1, "k": k, "seq_len": data.seq_len, "teacher": teacher,
                "shards": [{"path": str(Path(d.path).resolve()), "tokenizer": d.meta.get("tokenizer_sha256"),
                            "train_tokens": d.meta.get("splits", {}).get("train", {}).get("tokens")}
                           for d in data.dirs],
                "windows": data.windows_per_source()}
        meta_file = self.dir / "meta.json"
        fresh = not meta_file.is_file()
        if not fresh:
            try:
                found = json.loads(meta_file.read_text())
            except json.JSONDecodeError:
                found = None
            if found != meta:
                what = next((key for key in meta if (found or {}).get(key) != meta[key]), "format")
                raise ZhllmError(f"{self.dir}: a teacher cache made for another {what}; remove it or set "
                                 "teacher.cache_dir to a new directory")
        if fresh and self.dir.is_dir():  # files of an unfinished creation may be there, nothing else
            others = sorted(f.name for f in self.dir.iterdir() if not CACHE_FILE.match(f.name))
            if others:
                raise ZhllmError(f"{self.dir} is not a teacher cache (it holds {others[0]}, ...); set "
                                 "teacher.cache_dir to a new or empty directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        id_dtype = np.uint16 if vocab <= 65536 else np.int32
        mode = "w+" if fresh else "r+"
        self.ids, self.logits, self.filled = [], [], []
        for n, windows in enumerate(meta["windows"]):
            shape = (windows, data.seq_len, k)
            self.ids.append(np.memmap(self.dir / f"ids-{n}.bin", dtype=id_dtype, mode=mode, shape=shape))
            self.logits.append(np.memmap(self.dir / f"logits-{n}.bin", dtype=np.float16, mode=mode, shape=shape))
            self.filled.append(np.memmap(self.dir / f"filled-{n}.bin", dtype=np.uint8, mode=mode, shape=(windows,)))
        if fresh:  # written last: a directory without it is an unfinished creation, made again next time
            atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")

    def lookup(self, windows: torch.Tensor) -> tuple[list[bool], torch.Tensor | None, torch.Tensor | None]:
        """(which rows are cached, their ids (B, T, k) long and logits (B, T, k) fp16, with zeros for the others)."""
        keys = windows.tolist()
        hit = [bool(self.filled[s][j]) for s, j in keys]
        if not any(hit):
            return hit, None, None
        ids = np.stack([self.ids[s][j] if h else np.zeros_like(self.ids[s][j]) for (s, j), h in zip(keys, hit)])
        logits = np.stack([self.logits[s][j] if h else np.zeros_like(self.logits[s][j])
                           for (s, j), h in zip(keys, hit)])
        return hit, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(logits)

    def store(self, windows: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> None:
        for (s, j), row_ids, row_logits in zip(windows.tolist(), ids.cpu().numpy(), logits.cpu().numpy()):
            self.ids[s][j] = row_ids
            self.logits[s][j] = row_logits
            self.filled[s][j] = 1  # after the rows: a window is never marked before its values are written
