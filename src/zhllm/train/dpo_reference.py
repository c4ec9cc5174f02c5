"""The DPO stage's references, set up once the Trainer has placed the model (`prepare(trainer)`).

- `CopyReference`: a second, frozen model loaded from the starting checkpoint (not from a resumed one: the
  reference is the policy before any DPO step), moved to the policy's device and dtype.
- `adapter_reference` (dpo_loss.py): the LoRA policy with its adapters off; nothing to set up.
- `PrecomputedReference`: the reference's summed log-probs of every pair, computed once before the first
  step by the policy itself (still equal to the reference then; with LoRA, adapters off), stored in the
  run directory as `reference_logps.npz` and read back on resume, when the policy has moved on. A stored file
  made from other pairs or another starting model is refused rather than silently reused.
"""
from __future__ import annotations

import hashlib
import io
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..device import to_device
from ..errors import ZhllmError
from ..fsutil import atomic_write_bytes
from . import parallel as par
from .dpo_loss import forward_logps, precomputed_reference
from .lora import adapters_disabled

REFERENCE_FILE = "reference_logps.npz"


class CopyReference:
    """A frozen copy of the starting model; called on a batch, its summed response log-probs (2B,)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    def prepare(self, trainer) -> None:
        policy = next(trainer.model.parameters())
        self.model.to(device=trainer.d.device, dtype=policy.dtype)

    def __call__(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return forward_logps(self.model, batch)[0]


class PrecomputedReference:
    """Reads `ref_logps` from the batch; `prepare` fills them into the datasets (computed, or loaded on resume)."""

    def __init__(self, identity: dict, lora: bool):
        self.identity, self.lora = identity, lora

    def __call__(self, batch: dict) -> torch.Tensor:
        return precomputed_reference(batch)

    def prepare(self, trainer) -> None:
        datasets = {"train": trainer.train_data, "val": trainer.val_data}
        datasets = {k: v for k, v in datasets.items() if v is not None}
        fp = fingerprint(datasets, {**self.identity, "precision": trainer.cfg.train.precision})
        path = Path(trainer.run_dir) / REFERENCE_FILE
        if path.is_file():
            stored = load_reference_logps(path)
            if stored.get("fingerprint") != fp:
                raise ZhllmError(f"{path} holds reference log-probs of other pairs or another starting model; "
                                 "train into a new out_dir")
            for name, data in datasets.items():
                data.ref_logps = stored[name]
            trainer.echo(f"reference log-probs: loaded from {path}")
            return
        if trainer.state.step > 0:
            raise ZhllmError(f"{path} is missing, and the policy at step {trainer.state.step} is no longer the "
                             "reference; the run cannot resume with dpo.reference=precomputed")
        arrays = {name: compute_reference_logps(trainer.model, data, trainer.cfg.train.batch_size,
                                                trainer.d.device, trainer.autocast, self.lora)
                  for name, data in datasets.items()}
        for name, data in datasets.items():
            data.ref_logps = arrays[name]
        if trainer.d.is_main:
            buf = io.BytesIO()
            np.savez(buf, fingerprint=np.array(fp), **arrays)
            atomic_write_bytes(path, buf.getvalue())
        par.barrier(trainer.d)
        trainer.echo(f"reference log-probs: {sum(len(a) for a in arrays.values())} pairs computed, stored in {path}")


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, data, batch_size: int, device, autocast=None,
                            lora: bool = False) -> np.ndarray:
    """(pairs, 2) summed log-probs of chosen and rejected replies under `model` (adapters off with LoRA), in the
    pairs' stored order, batched as training batches them (chosen rows, then rejected rows, one forward)."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(data), 2), dtype=np.float32)
    try:
        with adapters_disabled(model) if lora else nullcontext():
            for start in range(0, len(data), batch_size):
                idx = list(range(start, min(start + batch_size, len(data))))
                batch = {k: v for k, v in data.collate(idx).items() if k != "ref_logps"}
                with autocast if autocast is not None else nullcontext():
                    logps = forward_logps(model, to_device(batch, device))[0].float().cpu().numpy()
                out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
    finally:
        model.train(was_training)
    return out


def fingerprint(datasets: dict, identity: dict) -> str:
    """Hash of every pair's token ids and labels per split, and of what the reference model is."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name in sorted(datasets):
        h.update(name.encode())
        for chosen, rejected in datasets[name].pairs:
            for ids, labels in (chosen, rejected):
                h.update(np.asarray(ids, dtype=np.int64).tobytes())
                h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def load_reference_logps(path: Path) -> dict:
    try:
        with np.load(path) as z:
            return {k: (str(z[k]) if k == "fingerprint" else z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ZhllmError(f"{path}: unreadable reference log-probs ({e})") from None
