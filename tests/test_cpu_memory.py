"""train/cpu_memory.py: freed memory stays in the process, so a step's big buffers do not fault in again."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

# A small training step on 32 MiB activations; report its page faults per step once warmed up.
PROBE = """
import json, resource, torch
from zhllm.train.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if {keep} else False
w = torch.randn(1024, 4096, requires_grad=True)
x = torch.randn(2048, 1024)
def step():
    (x @ w).relu().square().sum().backward()
    w.grad = None
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({{"applied": applied, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5}}))
"""
PAGES_32MIB = (32 << 20) // 4096


def probe(keep: bool, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(keep=keep)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kept_memory_is_not_faulted_in_again():
    default = probe(keep=False)
    kept = probe(keep=True)
    assert default["faults"] > 2 * PAGES_32MIB  # glibc maps and unmaps each big buffer, every step
    assert kept["applied"] and kept["faults"] < default["faults"] / 5


def test_user_malloc_settings_are_left_alone():
    r = probe(keep=True, MALLOC_ARENA_MAX="2")
    assert not r["applied"] and r["faults"] > 2 * PAGES_32MIB
