"""What every shard directory shares: pretraining token shards (shards.py), SFT shards (sft_shards.py) and any
later kind (preference pairs) are one `meta.json` plus binary split files plus a tokenizer copy.

    meta.json    starts with format (names the kind), version, dtype, vocab_size; written last and atomically,
                 so its presence is what makes a directory usable (rule 5)
    tokenizer/   a copy of the tokenizer files, so the directory describes itself; `tokenizer_sha256` in
                 meta.json fingerprints the vocabulary the ids belong to
    train, val   the two splits; each kind names and sizes its own files, and checks them on open
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import ZhllmError
from ..fsutil import atomic_directory, atomic_write_text
from ..tokenizer.load import TOKENIZER_FILES

META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever the vocabulary fits."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included): shard dirs mix only if their ids mean
    the same. Works alike for a transformers tokenizer and a raw `tokenizers.Tokenizer` of the same files."""
    try:
        vocab = tokenizer.get_vocab(with_added_tokens=True)  # tokenizers.Tokenizer
    except TypeError:
        vocab = tokenizer.get_vocab()  # transformers: added tokens are always included
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ZhllmError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    return split


def meta_header(fmt: str, version: int, vocab_size: int) -> dict:
    """The fields every meta.json starts with, in this order (each kind appends its own)."""
    return {"format": fmt, "version": version, "dtype": token_dtype(vocab_size).name, "vocab_size": int(vocab_size)}


def write_meta(out_dir: str | Path, meta: dict) -> None:
    """Written last, atomically: its presence is what makes a directory a usable shard directory."""
    atomic_write_text(Path(out_dir) / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer(src: str | Path, out_dir: str | Path) -> None:
    """Copy the tokenizer files of `src` into `out_dir`/tokenizer, which appears complete or not at all."""
    src = Path(src)
    with atomic_directory(Path(out_dir) / TOKENIZER_SUBDIR) as tmp:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)


class ShardDir:
    """A verified shard directory of one kind: meta.json read and its format and version checked, then
    `check_files` (each kind's) compares the files with the sizes meta.json gives."""

    FORMAT: str
    VERSION: int
    KIND: str  # how messages name the directory: "token shard", "SFT shard"
    A_KIND: str  # the same with its article: "a token shard", "an SFT shard"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = self._read_meta()
        self.dtype = np.dtype(self.meta["dtype"])
        self.check_files()

    def check_files(self) -> None:
        raise NotImplementedError

    def no_meta_message(self) -> str:
        """Why a directory without meta.json cannot be used (each kind knows what leaves one behind)."""
        return f"{self.path} is not {self.A_KIND} directory (no meta.json)"

    def check_meta(self, meta: dict) -> None:
        """Checks beyond format and version (none by default)."""

    def _read_meta(self) -> dict:
        path, meta_file = self.path, self.path / META_FILE
        if not path.is_dir():
            raise ZhllmError(f"{self.KIND} directory not found: {path}")
        if not meta_file.is_file():
            raise ZhllmError(self.no_meta_message())
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ZhllmError(f"{meta_file}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != self.FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ZhllmError(f"{path} is not {self.A_KIND} directory (meta.json format is "
                             f"{found!r}, not {self.FORMAT!r})")
        if meta.get("version") != self.VERSION:
            raise ZhllmError(f"{path}: {self.KIND} format version {meta.get('version')} is not supported "
                             f"(need {self.VERSION})")
        self.check_meta(meta)
        return meta

    def check_size(self, name: str, size: int, damaged: str) -> None:
        """`name` must exist with `size` bytes; `damaged` ends the message (what went wrong, what to do)."""
        f = self.path / name
        if not f.is_file():
            raise ZhllmError(f"{self.path}: {name} listed in meta.json is missing ({damaged})")
        if f.stat().st_size != size:
            raise ZhllmError(f"{self.path}: {name} has {f.stat().st_size} bytes, meta.json says {size} ({damaged})")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.meta.get("tokenizer_dir", TOKENIZER_SUBDIR)
