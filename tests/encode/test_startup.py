"""Bad start-up configuration: the real process exits non-zero with one line naming the problem,
never a traceback. All cases start at once (each process spends most of its life importing);
other bad security files are checked in-process in test_config.py, a checkpoint without weights
in test_lifecycle.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.testkit.launch import REPO
from tests.encode.pki import make_pki

TIMEOUT_S = 120


def _cases(work: Path, busy_port: int) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a regex the error line must match)."""
    pki = make_pki(work / "pki")
    not_pem = work / "not.pem"
    not_pem.write_text("hello\n")
    return {
        "port_in_use": (["--port", str(busy_port)], rf"cannot listen on 127\.0\.0\.1:{busy_port}"),
        "port_file_dir_missing": (
            ["--port-file", str(work / "missing" / "ports.json")],
            r"directory of --port-file .*missing.* does not exist",
        ),
        "unknown_device": (["--device", "tpu"], r"unsupported device 'tpu'|unknown device"),
        "tls_cert_not_pem": (
            ["--tls-cert", str(not_pem), "--tls-key", str(pki.server_key)],
            r"--tls-cert\) .*not\.pem is not a PEM file",
        ),
    }


@pytest.fixture(scope="module")
def outcomes(tiny_vl_dir, tmp_path_factory):
    """name -> (exit status, combined output), every case run in parallel."""
    work = tmp_path_factory.mktemp("startup")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = _cases(work, busy.getsockname()[1])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs = {}
        for name, (args, _) in cases.items():
            command = [
                sys.executable,
                "-m",
                "services.encode",
                "--model",
                str(tiny_vl_dir),
                "--host",
                "127.0.0.1",
                *args,
            ]
            procs[name] = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        results = {}
        try:
            for name, proc in procs.items():
                output, _ = proc.communicate(timeout=TIMEOUT_S)
                results[name] = (proc.returncode, output, cases[name][1])
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return results


CASES = [
    "port_in_use",
    "port_file_dir_missing",
    "unknown_device",
    "tls_cert_not_pem",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_configuration_is_one_line_and_a_non_zero_exit(outcomes, case):
    status, output, pattern = outcomes[case]
    assert status != 0, output
    assert "Traceback" not in output, output
    problems = [line for line in output.splitlines() if re.search(r"ERROR|error:", line)]
    assert len(problems) == 1, output
    assert re.search(pattern, problems[0]), problems[0]


def test_every_case_is_checked(outcomes):
    assert sorted(outcomes) == sorted(CASES)
