"""`latest` and `best` in a run's checkpoints/: pointers to a sibling `step_N` directory.

They are directory symlinks (`latest -> step_N`), so `runs/x/checkpoints/latest` works as a model or
tokenizer directory anywhere, in zhllm and in other tools. Runs written before that hold small text files
naming the step instead; `resolve_model_dir` reads both, and every loader of a model or tokenizer directory
goes through it. File systems without symlinks get the text file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import ZhllmError
from .fsutil import atomic_write_text

_MAX_POINTER_BYTES = 256  # a pointer file holds one directory name


def pointer_target(path: str | Path) -> str | None:
    """The sibling name a pointer (symlink to a sibling, or text-file pointer) holds, else None."""
    p = Path(path)
    if p.is_symlink():
        name = os.readlink(p)
    elif p.is_file() and p.stat().st_size <= _MAX_POINTER_BYTES:
        try:
            name = p.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            return None
    else:
        return None
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\n" in name:
        return None  # a link elsewhere (or an ordinary file) is not one of our pointers: leave it alone
    return name


def resolve_model_dir(path: str | Path) -> Path:
    """The checkpoint a `latest`/`best` pointer names (as `step_N` beside it); any other path unchanged.

    Resolving once, up front, makes every file of one load come from the same checkpoint even while a
    running training moves `latest` on and prunes the step it pointed to.
    """
    p = Path(path)
    name = pointer_target(p)
    if name is None:
        return p
    target = p.parent / name
    if not target.is_dir():
        raise ZhllmError(f"{p} points to {name}, which does not exist (pruned or deleted); "
                         f"use another checkpoint in {p.parent}")
    return target


def write_pointer(root: Path, name: str, target: str) -> None:
    """Point `root/name` at the sibling directory `target`, atomically (a temp symlink renamed over it)."""
    for stale in root.glob(f".{name}.tmp-*"):  # a crash between symlink and rename
        stale.unlink(missing_ok=True)
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symlinks here (some Windows setups, some network mounts)
        atomic_write_text(root / name, target + "\n")
        return
    try:
        os.replace(tmp, root / name)
    except IsADirectoryError:
        tmp.unlink(missing_ok=True)
        raise ZhllmError(f"{root / name} is a directory, not a checkpoint pointer; move it away") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
