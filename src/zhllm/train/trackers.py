"""Experiment trackers that mirror metrics.jsonl: TensorBoard, Weights & Biases, SwanLab.

Each tracker gets the same numeric fields as a metrics.jsonl record, named `{kind}/{field}` ("train/loss",
"eval/val_loss"), at the record's step. wandb and swanlab are optional extras, imported only when enabled. Their
run files live in the run directory (`wandb/`, `swanlog/`); `log.tracker_mode: offline` writes them without any
network (`wandb sync` / `swanlab sync` upload them later). A resumed run continues the same tracker run: its id
is kept in `trackers.json`. Steps a died run logged after its last checkpoint are redone after the resume:
TensorBoard purges the old events (purge_step); the redone steps are bitwise equal to the first time (exact
resume), so a tracker that keeps or drops either copy shows the same curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_text

IDS_FILE = "trackers.json"


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, named the way every tracker shows them."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}


class TensorBoard:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides the events a died run wrote after the checkpoint this run resumes from
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.id = None

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        for i, text in enumerate(record.get("samples", [])):
            self.writer.add_text(f"sample/{i}", text, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, project: str, name: str, run_id: str | None, mode: str | None, config: dict):
        import wandb
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=mode, config=config)
        self.id = self.run.id

    def log(self, record: dict) -> None:
        if values := scalars(record):  # a record may hold only text (samples)
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class SwanLab:
    def __init__(self, run_dir: Path, project: str, name: str, run_id: str | None, mode: str | None, config: dict):
        import swanlab
        self.run = swanlab.init(project=project, name=name, log_dir=str(run_dir / "swanlog"), mode=mode,
                                config=config, **({"id": run_id, "resume": "allow"} if run_id else {}))
        self.id = self.run.id

    def log(self, record: dict) -> None:
        if values := scalars(record):  # a record may hold only text (samples)
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(log_section: Any, run_dir: Path, config: dict, start_step: int = 0) -> list:
    """The trackers `log` enables, started in run_dir; a run resumed from start_step > 0 continues its tracker runs."""
    resumed = start_step > 0
    trackers: list = []
    if log_section.tensorboard:
        try:
            trackers.append(TensorBoard(run_dir, start_step))
        except ImportError:
            pass  # TensorBoard is on by default: without the package the run just has no tb/ files
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if resumed and ids_path.is_file() else {}
    mode = None if log_section.tracker_mode == "auto" else log_section.tracker_mode
    name = log_section.run_name or run_dir.resolve().name
    for option, cls in (("wandb", WandB), ("swanlab", SwanLab)):
        if not getattr(log_section, option):
            continue  # a missing package was a ConfigError when the recipe was checked (StageConfig.validate)
        tracker = cls(run_dir, log_section.project, name, ids.get(option), mode, config)
        trackers.append(tracker)
        if tracker.id:
            ids[option] = tracker.id
    if ids:
        atomic_write_text(ids_path, json.dumps(ids, indent=1) + "\n")
    return trackers
