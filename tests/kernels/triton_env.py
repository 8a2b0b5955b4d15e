"""Import this before triton in a kernel test module: without a GPU it sets TRITON_INTERPRET.

``triton.jit`` chooses interpreter or compiler when a function is defined, Triton's own library
included, so without a GPU TRITON_INTERPRET must be set before triton is first imported (torch's
own modules import it when it is installed). If something in this process imported it earlier,
`IN_PROCESS` is False: the kernel tests then skip and one test per module reruns the module in a
fresh process (`rerun_in_fresh_process`). The variable stays set: Triton reads it again when
kernels first launch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
IN_PROCESS = DEVICE.type == "cuda" or "triton" not in sys.modules or _PREVIOUS == "1"
if DEVICE.type == "cpu" and IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"


def rerun_in_fresh_process(path: str) -> subprocess.CompletedProcess:
    """The module's non-gpu tests in a new interpreter with TRITON_INTERPRET=1 from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # --noconftest: these tests use no shared fixture, and transformers would cost seconds.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest"]
    cmd += ["-m", "not gpu", path]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
