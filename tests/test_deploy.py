"""The deployment files, checked offline: no Docker daemon, no cluster, none of the running-stack fixtures.

- docker-compose.yml against the Compose Specification schema (check-jsonschema's vendored copy), then
  what a schema cannot see: depends_on targets, the worker's GPU reservation and drain time, Prometheus
  scraping the services and ports that exist, Grafana's provisioning.
- deploy/k8s rendered by a small kustomize renderer (only the fields used there; any other fails), every
  object validated against the Kubernetes JSON schemas (kubernetes-validate, strict) and the KEDA
  ScaledObject against deploy/schemas/, then the invariants: GPU per worker pod, grace period >= drain,
  preStop hooks, KEDA scaling the worker Deployment to zero, the HPA on the API, references that resolve.
- The Dockerfile parsed into stages: api without torch, worker on a CUDA image with torch from a CUDA
  index, non-root users, a /readyz HEALTHCHECK.
Where every schema comes from: deploy/schemas/README.md.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from shared.capabilities import vllm_engine
from shared.settings import Settings
from worker.engines.vllm_server import VLLM_VERSION

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
K8S_TREES = {
    "base": K8S / "base",
    "overlay": K8S / "overlays" / "example",
    "vllm": K8S / "overlays" / "vllm",  # the example with vLLM as each worker's sidecar
}
KEDA_SCHEMA = REPO / "deploy" / "schemas" / "keda-scaledobject-v1alpha1.schema.json"
# The oldest Kubernetes release the manifests aim at, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def _load_requirements_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "image_requirements", REPO / "deploy/docker/requirements.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = _load_requirements_script()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def seconds(duration: str | int | float) -> float:
    """A Compose duration (`75s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def check_inferq_variable(name: str) -> None:
    """`INFERQ_X` or `INFERQ_GROUP__X` must name a field of shared.settings.Settings (pydantic-settings
    ignores unknown variables, so a typo would silently do nothing)."""
    assert name.startswith("INFERQ_"), name
    path = name.removeprefix("INFERQ_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        assert part in model.model_fields, f"{name}: no setting {part!r} in {model.__name__}"
        annotation = model.model_fields[part].annotation
        if i < len(path) - 1:
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), f"{name}: not a group"
            model = annotation


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a process would build from this environment (values are validated, names checked)."""
    for name in env:
        if name.startswith("INFERQ_"):
            check_inferq_variable(name)
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("INFERQ_")]:
            mp.delenv(name)  # only what the file sets
        for name, value in env.items():
            mp.setenv(name, str(value))
        return Settings()


# ---------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)  # PyYAML resolves the anchors and `<<` merges as Compose does


def test_compose_matches_the_compose_specification() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_dependencies_exist_and_wait_for_the_right_state(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for target, condition in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            cond = condition["condition"]
            if cond == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no check"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["inferq", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert int(services["postgres"]["image"].split(":")[1].split(".")[0]) >= 16
    assert int(services["redis"]["image"].split(":")[1].split(".")[0]) == 7


def test_compose_images_build_dockerfile_targets(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, f"{name} builds an unknown target"
    assert compose["services"]["api"]["build"]["target"] == "api"
    assert compose["services"]["worker"]["build"]["target"] == "worker"


def test_compose_api_has_a_readiness_healthcheck(compose: dict[str, Any]) -> None:
    test = compose["services"]["api"]["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "/readyz" in command and "curl" not in command


def _metrics_port(command: list[str]) -> int:
    assert "--metrics-port" in command, f"no --metrics-port in {command}"
    return int(command[command.index("--metrics-port") + 1])


def test_compose_worker_reserves_a_gpu_and_drains_before_it_is_killed(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    ), devices
    drain = float(worker["environment"].get("INFERQ_WORKER__DRAIN_SECONDS", Settings().worker.drain_seconds))
    assert seconds(worker["stop_grace_period"]) >= drain + 5, "stop_grace_period must cover the drain"
    assert _metrics_port(worker["command"]) > 0


def test_compose_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        env = service.get("environment") or {}
        assert isinstance(env, dict), "use the mapping form of environment"
        # Compose's `${VAR:-default}`, as Compose would fill it in with nothing set.
        env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
        settings = settings_from(env)
        if "INFERQ_REDIS_URL" in env:
            assert settings.require_urls()


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def _mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, mount = volume.split(":")[:2]
        if mount == target:
            return REPO / source
    raise AssertionError(f"nothing mounted at {target}")


def test_prometheus_scrapes_the_api_and_the_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    config = load_yaml(_mounted(prometheus, "/etc/prometheus/prometheus.yml"))
    api_port = int(services["api"]["command"][services["api"]["command"].index("--port") + 1])
    expected = {"api": api_port}
    for name, service in services.items():
        if service.get("command", [])[:2] == ["inferq", "worker"]:
            expected[name] = _metrics_port(service["command"])
    assert {"worker", "worker-vllm"} <= expected.keys()
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = int(sd["port"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped[host] = int(port)
    for host in scraped:
        assert host in services, f"Prometheus scrapes {host}, which is no service"
    assert scraped == expected


def test_grafana_is_optional_and_provisioned(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["grafana"]
    provisioning = _mounted(grafana, "/etc/grafana/provisioning")
    sources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    (source,) = (s for s in sources if s["type"] == "prometheus")
    assert source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = load_yaml(provisioning / "dashboards" / "inferq.yml")["providers"]
    folder = provider["options"]["path"]
    dashboard = REPO / "deploy" / "grafana" / "inferq-dashboard.json"
    assert _mounted(grafana, f"{folder}/{dashboard.name}") == dashboard
    assert json.loads(dashboard.read_text())["uid"]


# ---------------------------------------------------------------------------------------------------
# deploy/k8s: a kustomize renderer for the fields used there

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
MERGED_BY_NAME = {"containers", "initContainers", "env", "volumes"}  # strategic-merge keys we rely on


def _strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kubernetes strategic merge, as far as these patches need it: maps merge, `null` deletes, the
    pod-spec lists above merge by `name`, every other list (a CRD's, tolerations) is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            assert not k.startswith("$"), f"unsupported patch directive {k}"
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _strategic_merge(out[k], v, k) if k in out else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGED_BY_NAME:
        out_list = list(base)
        for item in patch:
            names = [i["name"] for i in out_list]
            if item["name"] in names:
                at = names.index(item["name"])
                out_list[at] = _strategic_merge(out_list[at], item)
            else:
                out_list.append(item)
        return out_list
    return patch


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag` -> (`registry:5000/name`, `:tag`); digests kept likewise."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    head, _, last = image.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (f"{head}/{last}" if head else last), ":" + tag
    return image, ""


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = load_yaml(directory / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not support {unknown}: extend it"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_all_yaml(path)
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate objects {ids}"
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only `patches: - path:` is supported, not {patch}"
        for body in load_all_yaml(directory / patch["path"]):
            target = (body["kind"], body["metadata"]["name"])
            assert target in ids, f"{patch['path']} patches {target}, which is not in {directory}"
            at = ids.index(target)
            assert body["apiVersion"] == objects[at]["apiVersion"], f"{patch['path']}: apiVersion"
            objects[at] = _strategic_merge(objects[at], body)
    objects = copy.deepcopy(objects)
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for container in _containers(obj):
            name, suffix = _split_image(container["image"])
            for image in kustomization.get("images", []):
                if image["name"] == name:
                    assert set(image) <= {"name", "newName", "newTag", "digest"}, image
                    if "digest" in image:
                        suffix = "@" + image["digest"]
                    elif "newTag" in image:
                        suffix = ":" + str(image["newTag"])
                    container["image"] = image.get("newName", name) + suffix
    return objects


@dataclass
class Tree:
    objects: list[dict[str, Any]]
    by_kind: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for obj in self.objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    def get(self, kind: str, name: str) -> dict[str, Any]:
        assert name in self.by_kind.get(kind, {}), f"no {kind} {name}"
        return self.by_kind[kind][name]


@cache
def tree(which: str) -> Tree:
    return Tree(render(K8S_TREES[which]))


TREES = pytest.mark.parametrize("which", list(K8S_TREES))


def _worker(t: Tree) -> dict[str, Any]:
    (so,) = t.by_kind["ScaledObject"].values()
    return t.get("Deployment", so["spec"]["scaleTargetRef"]["name"])


def _api(t: Tree) -> dict[str, Any]:
    (hpa,) = t.by_kind["HorizontalPodAutoscaler"].values()
    return t.get("Deployment", hpa["spec"]["scaleTargetRef"]["name"])


def _env(container: dict[str, Any], t: Tree) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps and Secrets, then env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(t.get("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(t.get("Secret", source["secretRef"]["name"])["stringData"])
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[e["name"]] = t.get("ConfigMap", ref["name"])["data"][ref["key"]] if ref else e["value"]
    return env


def _settings_of(container: dict[str, Any], t: Tree) -> Settings:
    return _with_command(settings_from(_env(container, t)), container["command"])


def _with_command(settings: Settings, command: list[str]) -> Settings:
    """The settings `inferq worker` runs with: its environment's, then its --engine option."""
    if "--engine" in command:
        settings.worker.engine = command[command.index("--engine") + 1]  # type: ignore[assignment]
    return settings


def _runs_inferq(container: dict[str, Any]) -> bool:
    return container.get("command", [])[:1] == ["inferq"]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@TREES
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_objects_match_the_kubernetes_schemas(which: str, version: str) -> None:
    for obj in tree(which).objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: the next test
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {where}: {e.message}")


@TREES
def test_k8s_scaledobject_matches_the_keda_schema(which: str) -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    objects = tree(which).by_kind["ScaledObject"].values()
    assert objects
    for so in objects:
        jsonschema.Draft202012Validator(schema).validate(so)
        # advanced.horizontalPodAutoscalerConfig.behavior is the HPA's own type: let Kubernetes judge it.
        behavior = so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": 1,
                    "behavior": behavior,
                },
            }
            kubernetes_validate.validate(hpa, K8S_VERSIONS[0], strict=True)


def test_keda_schema_refuses_what_keda_would_not_take() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    so = copy.deepcopy(tree("base").get("ScaledObject", "inferq-worker"))
    assert validator.is_valid(so)
    for breakage in (
        lambda s: s["spec"].update(minReplicas=0),  # HPA's name, not KEDA's
        lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=24),  # metadata is map[string]string
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("query"),
        lambda s: s["spec"]["scaleTargetRef"].pop("name"),
    ):
        broken = copy.deepcopy(so)
        breakage(broken)
        assert not validator.is_valid(broken)


@TREES
def test_k8s_worker_gets_one_gpu_drains_and_has_a_prestop_hook(which: str) -> None:
    t = tree(which)
    worker = _worker(t)
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # One GPU per pod: the worker's, or its vLLM sidecar's when the worker relays to one.
    (holder,) = [c for c in pod.get("initContainers", []) + [container] if _gpus(c)]
    assert holder is container or _settings_of(container, t).worker.upstream_sidecar
    resources = holder["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1  # extended resources: requests == limits
    pre_stop = container["lifecycle"]["preStop"]
    sleep = (
        float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else float(pre_stop["sleep"]["seconds"])
    )
    env = _env(container, t)
    drain = float(env.get("INFERQ_WORKER__DRAIN_SECONDS", Settings().worker.drain_seconds))
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5, "the kubelet would kill it mid-drain"
    port = _metrics_port(container["command"])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert container["readinessProbe"]["httpGet"]["port"] in ("metrics", port)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"


@TREES
def test_k8s_keda_scales_the_worker_to_zero_on_queue_depth(which: str) -> None:
    t = tree(which)
    (so,) = t.by_kind["ScaledObject"].values()
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert (
        target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    )
    worker = t.get("Deployment", target["name"])
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "inferq:num_requests_waiting" in query
    # The trigger counts the jobs of the model this Deployment serves (its served name).
    env = _env(worker["spec"]["template"]["spec"]["containers"][0], t)
    served = env.get("INFERQ_MODEL__SERVED_NAME") or Path(env["INFERQ_MODEL__NAME"].rstrip("/")).name
    assert set(re.findall(r'model_name="([^"]*)"', query)) == {served}


@TREES
def test_k8s_hpa_scales_the_api_on_cpu(which: str) -> None:
    t = tree(which)
    (hpa,) = t.by_kind["HorizontalPodAutoscaler"].values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
    api = _api(t)
    assert api is not _worker(t)
    assert "replicas" not in api["spec"], "the HPA owns the API's replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    for container in api["spec"]["template"]["spec"]["containers"]:
        assert container["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@TREES
def test_k8s_api_probes_service_and_shutdown(which: str) -> None:
    t = tree(which)
    api = _api(t)
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = [s for s in t.by_kind["Service"].values() if s["spec"]["selector"].items() <= labels.items()]
    assert services, "no Service selects the API pods"
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names or port["targetPort"] in port_names.values()
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in port_names.values()


@TREES
def test_k8s_migration_job(which: str) -> None:
    t = tree(which)
    (job,) = t.by_kind["Job"].values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["inferq", "migrate"]
    assert container["image"] == _api(t)["spec"]["template"]["spec"]["containers"][0]["image"]
    env = _env(container, t)
    assert {"INFERQ_DATABASE_URL", "INFERQ_REDIS_URL"} <= env.keys()


@TREES
def test_k8s_references_resolve_and_settings_exist(which: str) -> None:
    t = tree(which)
    (secret,) = t.by_kind["Secret"].values()
    assert {"INFERQ_DATABASE_URL", "INFERQ_REDIS_URL"} <= secret["stringData"].keys()
    for obj in t.objects:
        for container in _containers(obj):
            for source in container.get("envFrom", []):
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        t.get(kind, source[ref]["name"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in t.get("Secret", ref["name"])["stringData"]
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in t.get("ConfigMap", ref["name"])["data"]
            if not _runs_inferq(container):
                continue  # a sidecar (vLLM): its own wiring is checked by the vllm tests below
            settings = settings_from(_env(container, t))
            assert settings.require_urls()
            if obj["kind"] == "Deployment" or obj["kind"] == "Job":
                pod = _pod_spec(obj)
                assert pod is not None and pod["securityContext"]["runAsNonRoot"] is True
                volumes = {v["name"] for v in pod.get("volumes", [])}
                assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_overlay_sets_namespace_and_images() -> None:
    overlay = load_yaml(K8S_TREES["overlay"] / "kustomization.yaml")
    namespace = overlay["namespace"]
    t = tree("overlay")
    assert t.get("Namespace", namespace)
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in overlay["images"]}
    seen = set()
    for obj in t.objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == namespace
        for container in _containers(obj):
            assert container["image"] in images.values(), f"{obj['kind']}/{obj['metadata']['name']}"
            seen.add(container["image"])
    assert seen == set(images.values())
    base_worker, worker = _worker(tree("base")), _worker(t)
    assert worker["spec"]["template"]["spec"] != base_worker["spec"]["template"]["spec"], "patches applied"


def _arg(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} once in {args}"
    return args[args.index(flag) + 1]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` in command and args, from the container's environment."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def _check_vllm_wiring(worker: Settings, host: str, vllm_args: list[str], image: str, model: str) -> None:
    """A worker relaying to a vLLM beside it: at that vLLM's port, for the model vLLM serves."""
    assert worker.worker.engine == "vllm" and worker.worker.upstream_sidecar
    url = urlsplit(worker.worker.upstream_url or "")
    assert url.hostname == host and url.path == "/v1"
    assert url.port == int(_arg(vllm_args, "--port")), "the worker's URL is not vLLM's port"
    # vLLM serves the model under its --model value (no --served-model-name): what the worker asks for.
    assert "--served-model-name" not in vllm_args
    assert _arg(vllm_args, "--model") == model == worker.worker.upstream_model
    # What the worker declares for vLLM (top_logprobs up to 20) is what this server returns.
    assert int(_arg(vllm_args, "--max-logprobs")) >= vllm_engine().max_top_logprobs
    assert image == f"vllm/vllm-openai:v{VLLM_VERSION}", "the image and the supervised install differ"


def test_k8s_vllm_runs_as_a_sidecar_of_each_worker() -> None:
    t = tree("vllm")
    worker = _worker(t)
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (vllm,) = pod["initContainers"]
    # A native sidecar: started before the worker, restarted when it dies, stopped after the worker drained.
    assert vllm["restartPolicy"] == "Always"
    env = _env(vllm, t)
    args = [_expand(a, env) for a in vllm["command"] + vllm["args"]]
    assert args[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    settings = _settings_of(container, t)
    # The same model: vLLM's --model is the worker's INFERQ_MODEL__NAME (one ConfigMap key for both).
    assert _arg(args, "--model") == settings.model.name
    _check_vllm_wiring(settings, "127.0.0.1", args, vllm["image"], settings.model.name)
    ports = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    assert int(_arg(args, "--port")) in ports.values()
    for probe in ("startupProbe", "livenessProbe"):
        get = vllm[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == int(_arg(args, "--port"))
    # The kubelet probes the pod's address, not its loopback.
    assert _arg(args, "--host") == "0.0.0.0"
    assert vllm["startupProbe"]["periodSeconds"] * vllm["startupProbe"]["failureThreshold"] >= 600
    # The GPU and the memory are vLLM's; the worker only relays.
    assert _gpus(vllm) == 1 and _gpus(container) == 0
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
    assert set(mounts.values()) <= volumes and mounts["/dev/shm"] == "dshm"
    assert env["HF_HOME"].startswith(next(p for p, n in mounts.items() if n == "data"))
    # The rest of the example overlay holds (namespace, images, KEDA on the same Deployment).
    assert (
        worker["metadata"]["namespace"]
        == tree("overlay").get("Deployment", "inferq-worker")["metadata"]["namespace"]
    )


def test_compose_vllm_profile_runs_vllm_beside_a_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    vllm, worker = services["vllm"], services["worker-vllm"]
    assert vllm["profiles"] == worker["profiles"] == ["vllm"]
    assert "profiles" not in services["worker"], "the default `up` still runs the transformers worker"
    args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(a)) for a in vllm["entrypoint"] + vllm["command"]]
    assert args[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in worker["environment"].items()}
    settings = _with_command(settings_from(env), worker["command"])
    # With INFERQ_MODEL__NAME unset, vLLM loads the demo model the `model` service fetched, the worker's.
    assert _arg(args, "--model") == settings.model_path
    assert (
        vllm["command"][vllm["command"].index("--model") + 1]
        == worker["environment"]["INFERQ_WORKER__UPSTREAM_MODEL"]
    )
    _check_vllm_wiring(settings, "vllm", args, vllm["image"], settings.model_path)
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert seconds(vllm["healthcheck"]["start_period"]) >= 600
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("count") == 1 and "gpu" in d.get("capabilities", []) for d in devices)
    assert "deploy" not in worker, "the GPU is vLLM's"
    assert worker["depends_on"]["vllm"]["condition"] == "service_started"  # it waits for /health itself
    # `--scale worker=0` leaves nothing waiting for the transformers worker.
    assert all("worker" not in (s.get("depends_on") or {}) for s in services.values())
    drain = float(worker["environment"]["INFERQ_WORKER__DRAIN_SECONDS"])
    assert seconds(worker["stop_grace_period"]) >= drain + 5


# ---------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    name: str
    image: str  # the FROM argument, build args substituted
    parent: Stage | None
    instructions: list[tuple[str, str]]

    def chain(self) -> Iterator[tuple[str, str]]:
        """This stage's instructions, with those of the stages it is built FROM first."""
        if self.parent:
            yield from self.parent.chain()
        yield from self.instructions


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.strip().partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""
    assert not logical, "a dangling line continuation"


@cache
def dockerfile_stages() -> dict[str, Stage]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions((REPO / "Dockerfile").read_text()):
        if keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            assert len(words) == 3 and words[1].upper() == "AS", f"name every stage: FROM {rest}"
            current = Stage(words[2], image, stages.get(image), [])
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return stages


def _arg_defaults(stage: Stage) -> dict[str, str]:
    return {n: d for k, r in stage.chain() if k == "ARG" for n, _, d in [r.partition("=")] if d}


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN instructions, build args substituted."""
    args = _arg_defaults(stage)
    found = []
    for keyword, rest in stage.chain():
        if keyword != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
                found.append(command[command.index("install") + 1 :])
            command = []
    return found


def _requirements_installed(stage: Stage) -> list[str]:
    """What deploy/docker/requirements.py prints for the stage (its exclusions read from the RUN)."""
    for keyword, rest in stage.chain():
        match = re.search(r"requirements\.py\s+(\S+)\s+([^>]*)>", rest) if keyword == "RUN" else None
        if match:
            return image_requirements.requirements(REPO / "pyproject.toml", match.group(2).split())
    raise AssertionError(f"{stage.name}: deploy/docker/requirements.py is not used")


def _user(stage: Stage) -> str:
    users = [rest for keyword, rest in stage.chain() if keyword == "USER"]
    assert users, f"{stage.name}: no USER"
    return users[-1]


def _reaches(requirements: list[str], forbidden: str) -> list[str] | None:
    """A dependency path from `requirements` to `forbidden`, read from the metadata of the packages
    installed here (the dev environment has them all); None when there is none."""
    stack = [(Requirement(r), [Requirement(r).name]) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while stack:
        req, path = stack.pop()
        name = canonicalize_name(req.name)
        if name == forbidden:
            return path
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = Requirement(line)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                stack.append((dep, [*path, dep.name]))
    return None


def test_dockerfile_has_api_and_worker_targets_from_a_python_base() -> None:
    stages = dockerfile_stages()
    assert {"base", "api", "worker"} <= stages.keys()
    assert stages["api"].parent is stages["base"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stages["base"].image), stages["base"].image


def test_dockerfile_api_installs_no_torch() -> None:
    api = dockerfile_stages()["api"]
    installs = _pip_installs(api)
    assert installs
    for args in installs:
        packages = [a for a in args if not a.startswith("-")]
        if "." in packages or "/app" in packages:
            assert "--no-deps" in args, "pyproject.toml requires torch: install the project with --no-deps"
        for package in packages:
            if package not in (".", "-r") and not package.endswith(".txt"):
                assert canonicalize_name(Requirement(package).name) != "torch"
    requirements = _requirements_installed(api)
    names = {canonicalize_name(Requirement(r).name) for r in requirements}
    assert "torch" not in names and "accelerate" not in names
    path = _reaches(requirements + ["jinja2"], "torch")
    assert path is None, f"the api image would get torch through {' -> '.join(path)}"
    # What the API needs at run time is all there (the heavy parts: tokenizers and chat templates).
    assert {"transformers", "fastapi", "uvicorn", "sqlalchemy", "asyncpg", "redis", "arq"} <= names
    assert any("jinja2" in a for args in installs for a in args), "chat templates need jinja2"


def test_dockerfile_worker_runs_cuda_torch_on_a_cuda_image() -> None:
    worker = dockerfile_stages()["worker"]
    assert worker.image.startswith(("nvidia/cuda:", "nvcr.io/nvidia/cuda:")), worker.image
    assert "runtime" in worker.image or "base" in worker.image, "a runtime image, not devel"
    torch_installs = [
        args for args in _pip_installs(worker) if any(a.split("==")[0] == "torch" for a in args)
    ]
    (args,) = torch_installs
    index = args[args.index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    version = next(a.split("==")[1] for a in args if a.startswith("torch=="))
    assert Requirement(next(d for d in _project_deps() if d.startswith("torch"))).specifier.contains(version)
    assert "torch" not in {canonicalize_name(Requirement(r).name) for r in _requirements_installed(worker)}
    for args in _pip_installs(worker):
        if "." in args:
            assert "--no-deps" in args


def _project_deps() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.mark.parametrize("target", ["api", "worker"])
def test_dockerfile_targets_run_unprivileged_with_json_logs(target: str) -> None:
    stage = dockerfile_stages()[target]
    assert _user(stage) not in ("root", "0", "0:0")
    env = " ".join(rest for keyword, rest in stage.chain() if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "INFERQ_LOG_FORMAT=json" in env
    assert any(keyword == "EXPOSE" for keyword, _ in stage.instructions)
    assert any(keyword == "CMD" and "inferq" in rest for keyword, rest in stage.instructions)


def test_dockerfile_api_healthcheck_is_readyz_without_curl() -> None:
    api = dockerfile_stages()["api"]
    (check,) = [rest for keyword, rest in api.instructions if keyword == "HEALTHCHECK"]
    assert "/readyz" in check and "urllib" in check and "curl" not in check
    assert ("EXPOSE", "8000") in api.instructions


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern also covers what is under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_copies_what_the_build_context_has() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in dockerfile_stages().values():
        for keyword, rest in stage.instructions:
            if keyword != "COPY" or "--from" in rest:
                continue
            sources = rest.split()[:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing"
                assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert _dockerignored(".venv/bin/python", patterns) and _dockerignored("tests/test_deploy.py", patterns)


def test_requirements_script_refuses_unknown_names() -> None:
    assert "torch>=2.4" not in image_requirements.requirements(REPO / "pyproject.toml", ["torch"])
    with pytest.raises(SystemExit):
        image_requirements.requirements(REPO / "pyproject.toml", ["torchh"])
