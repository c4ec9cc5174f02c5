"""Crash-safe writes (ARCHITECTURE rule 5): outputs appear complete under their final name, or not at all."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    for f in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# Staging directories this process has open: a write into one of them needs no staging of its own (a
# checkpoint's save_model writes into the checkpoint's staging directory, which is renamed as a whole).
_STAGING: set[Path] = set()
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(out_dir: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings left by a writer on this host that is no longer running.

    The host tag keeps a shared filesystem safe: a process id means nothing on another machine."""
    removed = []
    for kind in ("tmp", "old"):
        for d in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-{_HOST}-*-*"):
            pid = d.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def _sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_directory(out_dir: str | Path, marker: str | None = None):
    """Yield a temporary sibling directory; on success it replaces `out_dir` by rename.

    The staging name carries this host and process id, so the next writer of `out_dir` removes what a killed
    run left behind. `marker` (a command name) writes the MARKER file into the result. Inside another
    staging directory `out_dir` is written directly: the outer rename makes it appear atomically."""
    out_dir = Path(out_dir)
    real = out_dir.resolve()
    if any(real == s or real.is_relative_to(s) for s in _STAGING):
        out_dir.mkdir(parents=True, exist_ok=True)
        yield out_dir
        _write_marker(out_dir, marker)
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()
    staged = tmp.resolve()
    _STAGING.add(staged)
    try:
        yield tmp
        _write_marker(tmp, marker)
        _fsync_tree(tmp)
        if out_dir.exists():
            trash = _sibling(out_dir, "old")
            out_dir.rename(trash)
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _STAGING.discard(staged)


def _write_marker(directory: Path, marker: str | None) -> None:
    if marker is not None:
        write_marker(directory, marker)


# Every zhllm output directory carries this file naming the command that wrote it; outputs.py decides from it
# what a command may replace. No time stamp: outputs stay byte-identical across runs (and --workers).
MARKER = ".zhllm-output.json"


def write_marker(directory: str | Path, command: str) -> None:
    atomic_write_text(Path(directory) / MARKER, json.dumps({"written_by": "zhllm", "command": command}) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path to write a large file into; on success it replaces `path` by rename.

    For outputs too big to hold in memory (atomic_write_bytes): the writer streams into the staging file.
    Its name carries this host and process id, so the next writer of `path` removes what a killed run left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-{_HOST}-*-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if stale.is_file() and pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
