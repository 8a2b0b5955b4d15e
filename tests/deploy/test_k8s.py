"""deploy/k8s: the base (GPU) and the CPU overlay render to valid Kubernetes objects.

The kustomizations use only `resources`, `images` and JSON 6902 `patches`, which `render` below
applies as kustomize does, so no kustomize binary or cluster is needed; kubernetes-validate
checks every object against the API's OpenAPI schemas (shipped with the package, offline).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from services.encode.__main__ import build_parser as encode_parser
from services.language.cli import build_parser as language_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonpatch = pytest.importorskip("jsonpatch")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
PROFILES = {"gpu": K8S / "base", "cpu": K8S / "overlays" / "cpu"}
# A release well past gRPC probes' GA (1.27), and the newest the installed package knows.
VERSIONS = ("1.29", kubernetes_validate.latest_version())
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _set_image(objects: list[dict], rule: dict) -> None:
    for obj in objects:
        for container in _containers(obj):
            name = container["image"].split(":")[0].split("@")[0]
            if name == rule["name"]:
                tag = rule.get("newTag")
                container["image"] = rule.get("newName", name) + (f":{tag}" if tag else "")


def _containers(obj: dict) -> list[dict]:
    return obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def render(directory: Path) -> list[dict]:
    """The objects a kustomization directory stands for (the subset of kustomize used here)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    assert not unknown, f"{directory}: render() does not know {unknown}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for rule in kustomization.get("images", []):
        _set_image(objects, rule)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [
            o
            for o in objects
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        assert matches, f"{directory}: patch target {target} matches nothing"
        ops = yaml.safe_load(patch["patch"])
        for i, obj in enumerate(objects):
            if obj in matches:
                objects[i] = jsonpatch.apply_patch(copy.deepcopy(obj), ops)
    return objects


def by_kind(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module", params=sorted(PROFILES))
def profile(request) -> tuple[str, list[dict]]:
    return request.param, render(PROFILES[request.param])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates(profile, version):
    _, objects = profile
    kinds = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"}
    assert {o["kind"] for o in objects} == kinds
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_services_select_their_deployments_ports(profile):
    _, objects = profile
    for name in ("splitvl-encode", "splitvl-language", "splitvl-router"):
        deployment = by_kind(objects, "Deployment", name)
        service = by_kind(objects, "Service", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        port_names = {p["name"] for c in _containers(deployment) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def _argv(container: dict, env: dict[str, str]) -> list[str]:
    """The container's command line with $(VAR) expanded as the kubelet expands it."""
    words = container["command"] + container["args"]
    missing = {v for w in words for v in VAR.findall(w)} - set(env)
    assert not missing, f"{container['name']}: $(...) of undefined variables {missing}"
    return [VAR.sub(lambda m: env[m.group(1)], w) for w in words]


def test_commands_parse_with_the_configmap(profile):
    _, objects = profile
    config = by_kind(objects, "ConfigMap", "splitvl-config")["data"]
    parsers = {"services.encode": encode_parser, "services.language": language_parser}
    for name in ("splitvl-encode", "splitvl-language"):
        (container,) = _containers(by_kind(objects, "Deployment", name))
        assert container["envFrom"] == [{"configMapRef": {"name": "splitvl-config"}}]
        env = {**config, **{e["name"]: "10.0.0.7" for e in container.get("env", [])}}
        argv = _argv(container, env)
        assert argv[:2] == ["python", "-m"]
        parsers[argv[2]]().parse_args(argv[3:])  # SystemExit on an unknown flag or bad value


def test_probes_use_grpc_health_and_http_health(profile):
    _, objects = profile
    (encode,) = _containers(by_kind(objects, "Deployment", "splitvl-encode"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert encode[probe]["grpc"]["port"] == 50051
    (language,) = _containers(by_kind(objects, "Deployment", "splitvl-language"))
    assert language["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # Ready (and so routed to) only when loaded, not draining, with an encode replica serving
    assert language["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert language["livenessProbe"]["grpc"]["port"] == 50052


def test_gpu_profile_requests_gpus_and_cpu_profile_none():
    for name, objects in ((n, render(d)) for n, d in PROFILES.items()):
        for deployment in ("splitvl-encode", "splitvl-language"):
            (container,) = _containers(by_kind(objects, "Deployment", deployment))
            resources = container["resources"]
            gpus = [r.get("nvidia.com/gpu") for r in (resources["requests"], resources["limits"])]
            assert gpus == ([1, 1] if name == "gpu" else [None, None]), (name, deployment)
            assert container["image"] == f"splitvl:{'cuda' if name == 'gpu' else 'cpu'}"
        config = by_kind(objects, "ConfigMap", "splitvl-config")["data"]
        expected = {"gpu": ("cuda", "nccl"), "cpu": ("cpu", "grpc")}[name]
        assert (config["DEVICE"], config["TRANSPORT"]) == expected
    cpu = by_kind(render(PROFILES["cpu"]), "ConfigMap", "splitvl-config")["data"]
    assert cpu["MODEL"] == "/app/models/shapes-vl"  # baked into the image by deploy/Dockerfile


def test_encode_scales_by_replicas_behind_one_service():
    objects = render(PROFILES["gpu"])
    assert by_kind(objects, "Deployment", "splitvl-encode")["spec"]["replicas"] == 2
    (language,) = _containers(by_kind(objects, "Deployment", "splitvl-language"))
    assert "--encode=splitvl-encode:50051" in language["args"]


def _router(objects: list[dict]) -> dict:
    (router,) = _containers(by_kind(objects, "Deployment", "splitvl-router"))
    return router


def _flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_the_router_discovers_the_language_pods_with_the_rbac_it_needs(profile):
    _, objects = profile
    router = _router(objects)
    args = router["args"]
    assert router["command"] == ["smg", "launch"] and "--service-discovery" in args
    key, value = _flag(args, "--selector").split("=")
    language = by_kind(objects, "Deployment", "splitvl-language")
    assert language["spec"]["template"]["metadata"]["labels"][key] == value
    assert _flag(args, "--service-discovery-port") == "8000"
    assert _flag(args, "--health-check-endpoint") == "/ready"
    assert _flag(args, "--control-plane-api-keys").endswith("$(ROUTER_ADMIN_KEY)")
    env = {e["name"]: e["valueFrom"] for e in router["env"]}
    assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["ROUTER_ADMIN_KEY"]["secretKeyRef"]["name"] == "splitvl-router-admin"
    assert "$(POD_NAMESPACE)" in _flag(args, "--service-discovery-namespace")
    deployment = by_kind(objects, "Deployment", "splitvl-router")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    binding = by_kind(objects, "RoleBinding", "splitvl-router")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    role = by_kind(objects, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert router["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert router["image"].startswith("splitvl-router:")


def test_language_replicas_scale_behind_the_router():
    objects = render(PROFILES["gpu"])
    assert by_kind(objects, "Deployment", "splitvl-language")["spec"]["replicas"] == 2
