"""Where a command may write: the one `--out` policy of every zhllm command that writes a directory.

Commands replace their output directory as a whole (fsutil.atomic_directory), so a wrong `--out` would delete
whatever was there. Every output therefore carries a small marker file naming the command that wrote it, and:
- a missing or empty directory is always fine;
- this command's own output (its marker, or a format it wrote before markers existed) is re-written or resumed;
- another zhllm command's output is replaced only with `--overwrite`;
- a directory without a marker is never replaced, not even with `--overwrite`: zhllm did not make it;
- the working directory, its ancestors, `/` and the home directory are never outputs, and neither is a path
  that is an input, contains one, or lies inside an input directory.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ZhllmError
from .fsutil import MARKER, write_marker

NEW, OWN, REPLACE = "new", "own", "replace"


def read_marker(directory: str | Path) -> dict | None:
    """The marker of a zhllm output directory, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def check_output_dir(out_dir: str | Path, command: str, inputs: Iterable[str | Path | None] = (),
                     overwrite: bool = False, flag: str = "--out",
                     recognise: Callable[[Path], bool] | None = None) -> str:
    """Refuse (ZhllmError, one line) an output directory `command` may not write; else say what it holds.

    Returns NEW (missing or empty), OWN (this command's earlier output: re-write or resume it) or REPLACE
    (another zhllm command's output and `overwrite`: the caller replaces it). `recognise(path)` accepts
    outputs this command wrote before markers existed."""
    out = Path(out_dir).expanduser()
    real = out.resolve()
    name = f"{flag} {out}"
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise ZhllmError(f"{name} is {'the home directory' if real.parts[1:] else '/'}; choose a new directory")
    if cwd == real or cwd.is_relative_to(real):
        what = "the working directory" if cwd == real else "a parent of the working directory"
        raise ZhllmError(f"{name} is {what}; choose a new directory, e.g. {flag} {out / 'out'}")
    _check_inputs(real, name, inputs)
    if not out.exists():
        return NEW
    if not out.is_dir():
        raise ZhllmError(f"{name} is a file, not a directory; choose another {flag}")
    if not any(out.iterdir()):
        return NEW
    marker = read_marker(out)
    if marker is None:
        if recognise is not None and recognise(out):
            return OWN
        raise ZhllmError(f"{name} exists, is not empty and was not written by zhllm; zhllm never replaces such a "
                         f"directory (not even with --overwrite): choose another {flag} or empty it yourself")
    if marker["command"] == command:
        return OWN
    if not overwrite:
        raise ZhllmError(f"{name} holds the output of `zhllm {marker['command']}`; pass --overwrite to replace it "
                         f"with this `zhllm {command}` output, or choose another {flag}")
    return REPLACE


def _check_inputs(real: Path, name: str, inputs: Iterable[str | Path | None]) -> None:
    for inp in _existing_paths(inputs):
        if inp == real:
            raise ZhllmError(f"{name} is an input of this command; choose another directory")
        if inp.is_relative_to(real):
            raise ZhllmError(f"{name} contains the input {inp}; choose a directory that holds no input")
        if inp.is_dir() and real.is_relative_to(inp):
            raise ZhllmError(f"{name} lies inside the input directory {inp}; choose a directory outside it")


def _existing_paths(inputs: Iterable[str | Path | None]) -> list[Path]:
    """Resolved paths of the inputs that exist; a glob counts as each path it matches."""
    found = []
    for raw in inputs:
        if raw is None:
            continue
        text = os.path.expanduser(str(raw))
        found += glob.glob(text, recursive=True) if glob.has_magic(text) else [text]
    return [Path(p).resolve() for p in found if os.path.exists(p)]


def claim_output_dir(out_dir: str | Path, command: str, inputs: Iterable[str | Path | None] = (),
                     overwrite: bool = False, flag: str = "--out",
                     recognise: Callable[[Path], bool] | None = None) -> str:
    """check_output_dir for commands that write into the directory in place (resumable ones): a REPLACE
    empties it first, and the directory is created and marked as this command's."""
    import shutil
    state = check_output_dir(out_dir, command, inputs, overwrite, flag, recognise)
    out = Path(out_dir)
    if state == REPLACE:
        # only reached for a directory with another zhllm command's marker, and --overwrite
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        write_marker(out, command)
    return state
