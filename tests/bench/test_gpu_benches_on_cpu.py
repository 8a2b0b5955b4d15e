"""The GPU benchmarks' code paths on a tiny shape on CPU (the numbers mean nothing here)."""

from __future__ import annotations

import json

from bench import decode, prefill


def test_decode_benchmark_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "decode.json"
    args = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batches",
        "1,3",
        "--prompt",
        "16",
        "--new",
        "4",
        "--hf",
        "--out",
        str(out),
    ]
    assert decode.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"engine_tok_s", "hf_tok_s", "graph_capture"}  # no graphs on a CPU
    assert all(v > 0 for v in result["engine_tok_s"].values())
    assert "engine / transformers" in capsys.readouterr().out


def test_prefill_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "prefill.json"
    args = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--side",
        "64",
        "--hf",
        "--out",
        str(out),
    ]
    assert prefill.main(args) == 0
    result = json.loads(out.read_text())
    assert result["engine"]["prompt_tokens"] == 8 + 2 + 4 + 32
    assert result["engine"]["prefill_ms"] > 0 and result["hf"]["vision_ms"] > 0
