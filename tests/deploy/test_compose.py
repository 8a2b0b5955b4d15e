"""docker-compose.yml, deploy/compose.gpu.yml and deploy/Dockerfile agree with the services.

Every service command is parsed by that service's CLI parser; the router fronts every language
replica; healthchecks point at a script the image contains; the image build context keeps what
the Dockerfile copies. Building and starting the cluster is tests/deploy/test_compose_e2e.py's
job (it runs the router for real).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import yaml

from services.encode.__main__ import build_parser as encode_parser
from services.language.cli import build_parser as language_parser

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"services.encode": encode_parser, "services.language": language_parser}
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "deploy" / "compose.gpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _defaults(text: str) -> str:
    """Expand ${VAR:-default} to its default, as compose does with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def _services(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def _splitvl(services: dict) -> dict:
    """The services that run splitvl (every one but the router)."""
    return {name: s for name, s in services.items() if name != "router"}


def _router_argv() -> list[str]:
    router = _services(COMPOSE)["router"]
    assert router["entrypoint"] == ["sh", "-c"]
    (script,) = router["command"]
    return shlex.split(_defaults(script).replace("$$", "$"))


def _parse(name: str, command: str) -> tuple[str, object]:
    argv = shlex.split(_defaults(command))
    assert argv[:2] == ["python", "-m"], name
    module = argv[2]
    return module, PARSERS[module]().parse_args(argv[3:])  # SystemExit on an unknown flag


def test_compose_commands_parse():
    seen = set()
    for name, service in _splitvl(_services(COMPOSE)).items():
        module, _ = _parse(name, service["command"])
        seen.add(module)
    assert seen == set(PARSERS)


def test_gpu_override_names_existing_services():
    assert set(_services(GPU)) <= set(_services(COMPOSE))


def test_gpu_override_commands_parse_and_use_cuda_and_nccl():
    for name, service in _splitvl(_services(GPU)).items():
        module, args = _parse(name, service["command"])
        assert args.device == "cuda", name
        if module == "services.language":
            assert args.transport == "nccl"
        assert service["ipc"] == "host", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia", name


def test_language_replicas_wait_for_healthy_encoders_and_reach_both():
    services = _services(COMPOSE)
    encoders = {n for n, s in services.items() if "services.encode" in s.get("command", "")}
    languages = {n for n, s in services.items() if "services.language" in s.get("command", "")}
    assert len(encoders) == 2 and languages == {"language-0", "language-1"}
    for name in languages:
        language = services[name]
        assert language["depends_on"] == {n: {"condition": "service_healthy"} for n in encoders}
        _, args = _parse(name, language["command"])
        assert set(args.encode.split(",")) == {f"{n}:50051" for n in encoders}
        assert args.port == 8000
    for name in encoders:  # each replica's link store is reachable under its service name
        _, enc = _parse(name, services[name]["command"])
        assert enc.advertise_host == name and enc.host == "0.0.0.0"


def test_the_router_fronts_every_language_replica_with_their_readiness_and_loads():
    argv = _router_argv()
    assert argv[:4] == ["exec", "smg", "launch", "--host"]

    def values(flag: str) -> list[str]:
        start = argv.index(flag) + 1
        end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
        return argv[start:end]

    languages = [
        n for n, s in _services(COMPOSE).items() if "services.language" in s.get("command", "")
    ]
    assert sorted(values("--worker-urls")) == sorted(f"http://{n}:8000" for n in languages)
    assert values("--health-check-endpoint") == ["/ready"]
    assert values("--policy") == ["cache_aware"]
    assert values("--prometheus-port") == ["29000"]
    assert values("--control-plane-api-keys")[0] == "admin:admin:admin:$ROUTER_ADMIN_KEY"
    router = _services(COMPOSE)["router"]
    assert router["build"]["target"] == "router"
    assert "ROUTER_ADMIN_KEY:?" in router["environment"]["ROUTER_ADMIN_KEY"]  # required
    assert re.search(r"^FROM runtime AS router$", DOCKERFILE.read_text(), re.M)
    assert "smg==1.13.0" in DOCKERFILE.read_text()


def test_only_the_http_port_is_fixed_and_user_set():
    for name, service in _services(COMPOSE).items():
        for port in service.get("ports", []):
            # HOST_IP:HOST_PORT:CONTAINER_PORT, HOST_PORT from $HTTP_PORT or empty (a free one).
            match = re.fullmatch(r"\$\{BIND_ADDRESS:-[^}]*\}:(.*):\d+", port)
            assert match and match.group(1) in ("", "${HTTP_PORT:-8000}"), (name, port)


def test_healthchecks_run_the_script_the_image_contains():
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    assert re.search(r"^COPY deploy/healthcheck\.py .*\./deploy/$", dockerfile, re.M)
    for name, service in _services(COMPOSE).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/app/deploy/healthcheck.py"], name
        assert test[3] == ("grpc" if "services.encode" in str(service["command"]) else "http")
    assert _services(COMPOSE)["router"]["healthcheck"]["test"][4].endswith("/readiness")


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


def test_build_context_keeps_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert "deploy/healthcheck.py" in sources and "models" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert _dockerignore_allows(source, patterns), f".dockerignore drops {source}"
    for dropped in (".venv", ".git", "tests/e2e"):
        assert not _dockerignore_allows(dropped, patterns), dropped
