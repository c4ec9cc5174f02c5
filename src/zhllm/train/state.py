"""Crash-safe checkpoints and exact resume.

A checkpoint is an HF-native model directory (loads in transformers) plus `trainer_state.json` (step, tokens,
data position, RNG states, val losses) and `optimizer.pt`. The whole directory is staged under a temporary
name and renamed when complete (rule 5), and `trainer_state.json` is written last, so a directory named
`step_N` is always complete. `latest` and `best` are symlinks to a checkpoint (`latest -> step_N`), replaced
atomically, so `checkpoints/latest` is a model directory; older runs have text files there (see pointers.py).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ZhllmError
from ..fsutil import atomic_directory
from ..pointers import pointer_target, resolve_model_dir, write_pointer

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Test hook: die in the middle of writing a checkpoint at this step (after the weights, before the state).
FAIL_IN_SAVE_ENV = "ZHLLM_FAIL_IN_SAVE_AT_STEP"


@dataclass
class TrainerState:
    step: int = 0                  # optimizer steps done
    tokens_seen: int = 0
    data_position: int = 0         # windows consumed, global across ranks
    skipped_steps: int = 0         # non-finite steps skipped in total
    val_loss: float | None = None  # last eval
    best_val_loss: float | None = None
    precision: str | None = None   # what the run trains in (train.precision auto is resolved once, at start)
    optimizer: str | None = None   # train.optimizer: its state only loads into the same kind
    rng: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainerState":
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ZhllmError(f"{source}: unreadable trainer state ({e})") from None


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict) -> None:
    if not rng:
        return
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def checkpoint_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = STEP_DIR.match(d.name)
            if m and d.is_dir() and is_complete(d):
                found.append((int(m.group(1)), d))
    return sorted(found)


def is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in (STATE_FILE, OPTIMIZER_FILE, "config.json", "model.safetensors"))


def read_pointer(ckpt_root: Path, name: str) -> Path | None:
    """The complete `ckpt_root/step_N` that pointer `name` names (symlink or old text file), else None.

    Returned as `ckpt_root / step_N`, the same path checkpoint_dirs gives, so the two compare equal."""
    target = pointer_target(ckpt_root / name)
    if target is None or not STEP_DIR.match(target):
        return None
    d = ckpt_root / target
    return d if d.is_dir() and is_complete(d) else None


def resolve_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """`auto`: the newest complete checkpoint (None when there is none); a path: that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(ckpt_root)
        return found[-1][1] if found else None
    path = resolve_model_dir(resume)
    if not path.is_dir() or not is_complete(path):
        raise ZhllmError(f"--resume {resume}: not a complete training checkpoint "
                         f"(needs {STATE_FILE}, {OPTIMIZER_FILE}, config.json, model.safetensors)")
    return path


def save_checkpoint_atomic(ckpt_root: Path, state: TrainerState, model, optimizer_state: dict,
                           tokenizer_dir: str | Path | None, keep: int, extra_writer=None) -> Path:
    """Write checkpoints/step_N atomically, move the `latest`/`best` pointers, prune old ones.
    extra_writer(staging_dir) adds stage-specific files (e.g. a LoRA adapter) before the state is sealed."""
    from ..model.io import save_model
    out = ckpt_root / f"step_{state.step}"
    buf = io.BytesIO()
    torch.save(optimizer_state, buf)
    with atomic_directory(out) as tmp:
        save_model(model, tmp, tokenizer=tokenizer_dir)
        (tmp / OPTIMIZER_FILE).write_bytes(buf.getvalue())
        if extra_writer is not None:
            extra_writer(tmp)
        if os.environ.get(FAIL_IN_SAVE_ENV) == str(state.step):
            os._exit(1)
        (tmp / STATE_FILE).write_text(state.to_json())
    write_pointer(ckpt_root, "latest", out.name)
    best = read_pointer(ckpt_root, "best")
    if state.val_loss is not None and (best is None or _val_loss(best) is None or state.val_loss <= _val_loss(best)):
        write_pointer(ckpt_root, "best", out.name)
    prune_checkpoints(ckpt_root, keep)
    return out


def _val_loss(d: Path) -> float | None:
    return load_trainer_state(d).val_loss


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints plus the ones `best` and `latest` name (a run resumed from an older
    step moves `latest` below the newest); remove stale temp dirs of crashed saves. The pointers themselves
    are never entered: checkpoint_dirs lists `step_N` directories only."""
    found = checkpoint_dirs(ckpt_root)
    protected = {d for _, d in found[-keep:]} if keep > 0 else {found[-1][1]} if found else set()
    for name in ("best", "latest"):
        pointed = read_pointer(ckpt_root, name)
        if pointed is not None:
            protected.add(pointed)
    for _, d in found:
        if d not in protected:
            shutil.rmtree(d, ignore_errors=True)
    # `..step_*`: save_model's own staging, which older versions nested beside the checkpoint's staging dir
    for pattern in (".step_*.tmp-*", ".step_*.old-*", "..step_*.tmp-*"):
        for d in ckpt_root.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)


def load_trainer_state(d: Path) -> TrainerState:
    return TrainerState.from_json((d / STATE_FILE).read_text(), str(d / STATE_FILE))


def load_optimizer_state(d: Path, device: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(d / OPTIMIZER_FILE, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ZhllmError(f"{d / OPTIMIZER_FILE}: cannot read optimizer state ({str(e).splitlines()[0]})") from None
