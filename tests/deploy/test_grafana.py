"""deploy/grafana: the dashboard is current and names only metrics the services export."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import yaml

from services.encode.metrics import EncodeMetrics
from services.language.frontend.metrics import LanguageMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "splitvl-dashboard.json"
METRIC = re.compile(r"\bsplitvl_[a-z0-9_]+")
# What the Prometheus client exposes per metric type (counters gain _total and _created).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
}


def exported_names(registry) -> set[str]:
    """Every series name the registry can expose, labelled metrics with no samples included."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def service_metric_names() -> set[str]:
    stats = SimpleNamespace(
        num_running=1,
        num_waiting=0,
        kv_usage=0.5,
        num_free_blocks=3,
        num_total_blocks=6,
        prefix_cache_hits=1,
        prefix_cache_queries=2,
        num_preemptions=0,
    )
    language = LanguageMetrics(engine_stats=lambda: stats)
    return exported_names(language.registry) | exported_names(EncodeMetrics().registry)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_dashboard_matches_its_generator():
    spec = importlib.util.spec_from_file_location("dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run: python deploy/grafana/dashboard.py"


def test_every_metric_in_an_expression_exists():
    known = service_metric_names()
    used = {name for expr in expressions(dashboard()) for name in METRIC.findall(expr)}
    assert used, "no splitvl metric in the dashboard"
    assert not used - known, f"not exported by the services: {sorted(used - known)}"


def test_dashboard_covers_the_headline_metrics():
    used = " ".join(expressions(dashboard()))
    for name in (
        "splitvl_language_time_to_first_token_seconds_bucket",
        "splitvl_language_inter_token_latency_seconds_bucket",
        "splitvl_language_generation_tokens_total",
        "splitvl_language_num_requests_waiting",
        "splitvl_language_kv_cache_usage_ratio",
        "splitvl_encode_cache_hits_total",
        "splitvl_encode_cache_misses_total",
        "splitvl_encode_request_latency_seconds_bucket",
        "splitvl_encode_queue_depth",
    ):
        assert name in used, name


def test_panels_are_importable():
    board = dashboard()
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            assert all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"])


def test_prometheus_config_scrapes_every_compose_service():
    root = GRAFANA.parents[1]
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    expected = set()
    for name, service in services.items():
        command = " ".join(service["command"]) if name == "router" else service["command"]
        port = (
            re.search(r"--prometheus-port (\d+)", command)
            or re.search(r"--metrics-port (\d+)", command)
            or re.search(r"--port (\d+)", command)
        )
        expected.add(f"{name}:{port.group(1)}")
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert targets == expected


# What smg 1.13.0 serves on its Prometheus port (read off a running router; the version is pinned
# by deploy/Dockerfile's SMG_SPEC, so these names hold until it changes)
ROUTER_METRICS = {
    "smg_worker_requests_total",
    "smg_worker_retries_total",
    "smg_worker_retries_exhausted_total",
    "smg_worker_cb_state",
    "smg_worker_health",
}


def test_router_panels_use_the_pinned_routers_metrics():
    used = {n for e in expressions(dashboard()) for n in re.findall(r"\bsmg_[a-z0-9_]+", e)}
    assert used == ROUTER_METRICS
    assert "smg==1.13.0" in (GRAFANA.parents[1] / "deploy" / "Dockerfile").read_text()
