"""The glibc malloc tuning: a large buffer freed and allocated again is not page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from unisd_components.cpu_memory import keep_freed_memory
on = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    x = torch.ones(16_000_000); del x          # 64 MB, above glibc's largest dynamic mmap threshold
before = faults()
for _ in range(5):
    x = torch.ones(16_000_000); del x
print(on, faults() - before)
"""


def _probe(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, "UNISD_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning: Linux only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    on, faults = _probe("1")
    off, faults_off = _probe("0")
    assert on and not off
    # 5 x 64 MB = 78k pages: every one faults again without the tuning. With it, none do, or once in a
    # while one buffer's worth (15.6k) when the heap grows past a fragment instead of reusing it.
    assert faults_off > 70_000, faults_off
    assert faults < 20_000, faults
