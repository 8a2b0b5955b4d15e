"""Start-up and logging: a bad configuration gets one line naming the problem and a non-zero
exit, never a traceback; API keys and image bytes never reach the logs."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from scripts.testkit.launch import REPO
from tests.e2e.load import base_cases, chat_body, load_cluster, png

START_TIMEOUT_S = 240


def _bad_configs(model, tmp_path) -> dict[str, tuple[list[str], str]]:
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for item in model.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, no_weights / item.name)
    return {
        "port in use": (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
        "port file in a missing directory": (
            ["--port-file", str(tmp_path / "absent" / "ports.json")],
            "does not exist",
        ),
        "model without weights": (["--model", str(no_weights)], "no model.safetensors"),
        "unknown device": (["--device", "tpu"], "--device 'tpu' is not a device"),
        "KV cache below one block": (["--kv-cache-memory", "1KiB"], "--kv-cache-memory"),
        "KV cache below one sequence": (
            ["--kv-cache-memory", "64KiB", "--max-model-len", "4096"],
            "the longest that fits is --max-model-len",
        ),
    }


# Run as processes, to see the real output; the others run main() in this process (an
# exception escaping it would be the traceback), which is much cheaper than a fresh interpreter
AS_PROCESSES = ("port in use", "unknown device", "KV cache below one block")


def test_bad_configurations_get_one_line_and_a_nonzero_exit(e2e_model, tmp_path, caplog):
    from services.language.server import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    base = ["--model", str(e2e_model.path), "--port", "0", "--log-level", "WARNING"]
    cases = {
        name: ([a.replace("{busy}", port) for a in args], expected.replace("{busy}", port))
        for name, (args, expected) in _bad_configs(e2e_model.path, tmp_path).items()
    }
    procs = {}
    try:
        for name in AS_PROCESSES:
            command = [sys.executable, "-m", "services.language", *base, *cases[name][0]]
            procs[name] = subprocess.Popen(
                command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        for name, (args, expected) in cases.items():
            if name in AS_PROCESSES:
                continue
            caplog.clear()
            assert main([*base, *args]) == 1, name
            errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert len(errors) == 1 and expected in errors[0], f"{name}: {errors}"
            print(f"{name}: exit 1: {errors[0]}")
        for name, proc in procs.items():
            expected = cases[name][1]
            output, _ = proc.communicate(timeout=START_TIMEOUT_S)
            lines = [line for line in output.splitlines() if line.strip()]
            print(f"{name}: exit {proc.returncode}: {lines[-1] if lines else ''}")
            assert proc.returncode != 0, f"{name}: exit 0\n{output}"
            assert "Traceback" not in output, f"{name}:\n{output}"
            assert len(lines) == 1, f"{name}: expected one line, got\n{output}"
            assert "cannot start the language service" in lines[0] and expected in lines[0], (
                f"{name}: {lines[0]!r} does not name {expected!r}"
            )
    finally:
        busy.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


SECRET_KEY = "sk-live-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
WRONG_KEY = "sk-live-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e"


def test_api_keys_and_image_bytes_never_reach_the_logs(e2e_model, tmp_path):
    if not e2e_model.trained:
        pytest.skip("needs the trained shapes model")
    image, question = base_cases(1, seed=11)[0]
    image_bytes = png(image)
    b64 = base64.b64encode(image_bytes).decode()
    debug = ["--log-level", "DEBUG"]
    args = ["--served-model-name", "shapes-vl", "--api-key", SECRET_KEY, *debug]
    with load_cluster(e2e_model.path, tmp_path, 1, args, debug) as cluster:
        url = f"{cluster.base_url}/v1/chat/completions"
        good = {"Authorization": f"Bearer {SECRET_KEY}"}
        body = chat_body("shapes-vl", question, image_bytes, stream=False)
        assert httpx.post(url, json=body, headers=good, timeout=60).status_code == 200
        streamed = chat_body("shapes-vl", question, image_bytes, stream=True)
        assert httpx.post(url, json=streamed, headers=good, timeout=60).status_code == 200
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        assert httpx.post(url, json=body, headers=wrong, timeout=60).status_code == 401
        broken = chat_body("shapes-vl", question, b"not an image" + image_bytes[:200], stream=False)
        assert httpx.post(url, json=broken, headers=good, timeout=60).status_code == 400
        unknown = {**body, "frobnicate": SECRET_KEY}  # named in a warning, value never shown
        assert httpx.post(url, json=unknown, headers=good, timeout=60).status_code == 200
        logs = {proc.name + str(i): proc.log() for i, proc in enumerate(cluster.processes)}
    broken_b64 = base64.b64encode(b"not an image" + image_bytes[:200]).decode()
    for name, log in logs.items():
        assert "POST /v1/chat/completions" in log or name.startswith("encode")
        for secret in (SECRET_KEY, WRONG_KEY, SECRET_KEY[8:24], WRONG_KEY[8:24]):
            assert secret not in log, f"{name} logged an API key"
        for i in range(0, len(b64) - 32, 256):  # any 32-character slice of the image's base64
            assert b64[i : i + 32] not in log, f"{name} logged image bytes"
        assert broken_b64[16:48] not in log and "base64," not in log, f"{name} logged a data URL"
