"""The device check fits its budget (quick <= 180 s, full <= 480 s of step limits), stops a step
at its limit, and writes the table after every step from whatever results exist."""

from __future__ import annotations

import json
import sys

from bench import gpu_check
from bench.gpu_check import Step


def test_the_step_limits_fit_the_device_budget():
    assert gpu_check.budget("quick") <= gpu_check.QUICK_BUDGET_S == 180
    assert gpu_check.budget("full") <= gpu_check.FULL_BUDGET_S == 480
    for plan in gpu_check.PLANS.values():
        assert all(0 < step.limit_s for step in plan)
    names = {step.name for step in gpu_check.PLANS["full"]}
    assert {"gpu_tests", "decode", "prefill", "kernels"} <= names
    decode = next(s for s in gpu_check.PLANS["full"] if s.name == "decode")
    assert "--hf" in decode.argv and "32768" in decode.argv and "1,16,64,128" in decode.argv


def test_the_table_shows_what_exists_with_ratios(tmp_path):
    (tmp_path / "decode.json").write_text(
        json.dumps(
            {
                "engine_tok_s": {"1": 300.0, "64": 3000.0},
                "hf_tok_s": {"1": 12.0},
                "graph_capture": {"seconds": 4.5, "bytes": 3 * 2**30},
            }
        )
    )
    (tmp_path / "prefill.json").write_text(
        json.dumps({"engine": {"vision_ms": 10.0, "prefill_ms": 40.0}, "hf": {"vision_ms": 25.0}})
    )
    text = gpu_check.table(tmp_path)
    assert "| decode B=1 | 300.0 tok/s | 12.0 tok/s | 25.00x |" in text
    assert "| decode B=64 | 3,000.0 tok/s | - | - |" in text
    assert "| vision, 1024-token image | 10.0 ms | 25.0 ms | 2.50x |" in text  # lower is better
    assert "| graph capture | 4.5 s, 3,072 MiB | - | - |" in text
    assert gpu_check.table(tmp_path / "empty").count("| - |") >= 2  # nothing ran: dashes


def test_a_step_past_its_limit_is_stopped_and_the_rest_still_report(tmp_path, monkeypatch):
    write = (
        "import json, sys; json.dump({'engine_tok_s': {'1': 5.0}}, "
        "open(sys.argv[1] + '/decode.json', 'w'))"
    )
    plan = (
        Step("hangs", 1, (sys.executable, "-c", "import time; time.sleep(30)")),
        Step("decode", 20, (sys.executable, "-c", write, "{out}")),
    )
    monkeypatch.setitem(gpu_check.PLANS, "quick", plan)
    assert gpu_check.run("quick", tmp_path) == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "hangs: timeout" in summary and "decode: 0" in summary
    assert "| decode B=1 | 5.0 tok/s |" in (tmp_path / "table.md").read_text()
