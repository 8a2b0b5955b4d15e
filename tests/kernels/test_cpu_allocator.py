"""`keep_freed_memory`: on glibc, the tensors of a repeated "step" (sizes 2-64 MiB, as a
prefill step's temporaries) on a worker thread reuse freed memory without fresh page faults
once the heap has grown; with ``SPLITVL_MALLOC=system`` every step faults tens of thousands
of pages in again (the cost the setting removes). Each case runs in a fresh interpreter:
malloc settings are process-wide and the arena limit only holds for threads that allocate
after it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

_PROBE = """
import json, resource, threading
import torch
from shared.kernels.cpu.allocator import keep_freed_memory
applied = keep_freed_memory()
faults = []
def work():
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.empty(n << 18).fill_(1.0) for n in (8, 24, 48, 64, 16)]  # n MiB
        ys = [torch.empty(n << 18).fill_(1.0) for n in (64, 8)]
        del xs, ys
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(setting: str) -> dict:
    env = dict(os.environ, SPLITVL_MALLOC=setting, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_without_page_faults():
    kept, system = _probe(""), _probe("system")
    assert kept["applied"] is True and system["applied"] is False
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert min(system["faults"]) > pages  # unmapped on free, faulted in again every step
    assert kept["faults"][0] > pages  # the first step grows the heap
    # Then most steps fault nothing; now and then a 64 MiB block lands past the high-water
    # mark (the heap's free blocks are fragmented differently from run to run).
    assert sum(kept["faults"][2:]) < sum(system["faults"][2:]) / 3
