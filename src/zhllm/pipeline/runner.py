"""Cached, resumable stages: the mechanism under `zhllm pipeline`, knowing nothing of which stages there are.

A stage's fingerprint hashes its own config and the fingerprints of what it reads (upstream stages or input
files), so a changed config or input re-runs that stage and everything after it, and nothing else.
A stage that was interrupted keeps its directory when re-run with the same fingerprint (so `pretrain` resumes
from its last checkpoint); a stage whose fingerprint changed starts from an empty directory. The runner only
ever deletes a stage directory it made (one holding its STARTED_FILE): anything else there is refused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZhllmError
from ..fsutil import atomic_write_text

DONE_FILE = "stage.json"
STARTED_FILE = ".stage-started"


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap identity of input files: path, size and modification time of each."""
    return fingerprint([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)])


@dataclass
class StageOutcome:
    name: str
    fingerprint: str
    skipped: bool
    seconds: float
    summary: dict


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class StageRunner:
    def __init__(self, run_dir: str | Path, force: bool = False, log: Callable[[str], None] = print,
                 plan: list[str] | None = None):
        """`plan`: the names of the stages this run will go through, for `[stage k/n name]` log lines."""
        self.run_dir = Path(run_dir)
        self.force = force
        self.log = log
        self.plan = plan or []
        self.started = time.time()
        self.outcomes: list[StageOutcome] = []

    def _say(self, name: str, text: str) -> None:
        label = f"stage {self.plan.index(name) + 1}/{len(self.plan)} {name}" if name in self.plan else name
        self.log(f"[{label}] {text} (elapsed {format_elapsed(time.time() - self.started)})")

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def run(self, name: str, config, upstream: list[str], fn: Callable[[Path], dict]) -> StageOutcome:
        """Run `fn(stage_dir) -> summary` unless a finished run with the same fingerprint exists."""
        fp = fingerprint(name, config, upstream)
        d = self.stage_dir(name)
        done = d / DONE_FILE
        if not self.force and done.is_file():
            record = json.loads(done.read_text(encoding="utf-8"))
            if record.get("fingerprint") == fp:
                self._say(name, "up to date, skipped")
                outcome = StageOutcome(name, fp, True, record.get("seconds", 0.0), record.get("summary", {}))
                self.outcomes.append(outcome)
                return outcome
        started = d / STARTED_FILE
        resuming = not self.force and started.is_file() and started.read_text().strip() == fp
        if not resuming and d.exists():
            if not started.is_file() and (not d.is_dir() or any(d.iterdir())):
                raise ZhllmError(f"{d} exists and was not made by `zhllm pipeline` (no {STARTED_FILE} in it); "
                                 "move it away or choose another out_dir")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(started, fp)
        self._say(name, "resuming" if resuming else "running")
        t0 = time.time()
        summary = fn(d) or {}
        seconds = time.time() - t0
        atomic_write_text(done, json.dumps({"fingerprint": fp, "seconds": seconds, "summary": summary},
                                           indent=2, ensure_ascii=False, default=str))
        self._say(name, f"done in {seconds:.1f}s")
        outcome = StageOutcome(name, fp, False, seconds, summary)
        self.outcomes.append(outcome)
        return outcome
