"""The manifests under deploy/: valid against the Kubernetes API schemas, and in step with the server.

A manifest that names a probe service the server does not serve, a port it does not listen on, a setting it
does not have, or a grace period shorter than its drain, deploys fine and fails in production: at the first
rollout, as refused or cut calls. These tests read the server's own settings and ask a real server.

kubernetes-validate ships the schemas of the built-in kinds only. For the custom resources (ServiceMonitor,
ServingRuntime, InferenceService) the core objects they embed (containers, ports, metadata) are validated
against the same schemas, and their own fields are checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from sluice.server.app import SluiceServer
from sluice.server.settings import ServerSettings
from support import ROOT, scrape

DEPLOY = ROOT / "deploy"
KUBERNETES = kv.latest_version()
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}
DEFAULTS = {name: field.default for name, field in ServerSettings.model_fields.items()}
# Where each port setting's default must appear, by the container port's name.
PORTS = {"grpc": "port", "h2c": "port", "http": "http_port", "metrics": "metrics_port"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                found.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


MANIFESTS = manifests()


def of_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def validate_as(value: Any, schema: str) -> None:
    """Validates part of a resource against one of the strict Kubernetes schemas (`container-v1`, ...)."""
    folder = f"kubernetes-json-schema/v{KUBERNETES}-local-strict"
    contents = kv.schema_contents(f"{folder}/{schema}.json", KUBERNETES)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", KUBERNETES)
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    jsonschema.Draft202012Validator(contents, registry=registry).validate(value)


def containers() -> list[tuple[str, dict[str, Any]]]:
    """Every Sluice container in the manifests, with where it is."""
    return [
        ("Deployment", of_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]),
        ("ServingRuntime", of_kind("ServingRuntime")["spec"]["containers"][0]),
    ]


def settings_of(container: dict[str, Any]) -> ServerSettings:
    """The settings the container's environment gives the server (only the ones with a plain value)."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return ServerSettings(**{name.removeprefix("SLUICE_").lower(): value for name, value in env.items()})


def test_there_is_a_manifest_of_each_kind_the_deployment_needs() -> None:
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == sorted(
        [
            "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "InferenceService", "PodDisruptionBudget",
            "Service", "Service", "ServiceMonitor", "ServingRuntime",
        ]
    )  # fmt: skip


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_each_manifest_is_valid_against_the_kubernetes_schemas(where: str, doc: dict[str, Any]) -> None:
    validate_as(doc["metadata"], "objectmeta-meta-v1")
    if doc["kind"] not in CUSTOM_KINDS:
        try:
            kv.validate(doc, KUBERNETES, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {path}: {exc.message}")
        return
    spec = doc["spec"]
    if doc["kind"] == "ServingRuntime":
        assert set(spec) <= {
            "annotations", "supportedModelFormats", "protocolVersions", "multiModel", "containers",
            "volumes", "nodeSelector", "tolerations", "affinity", "labels", "imagePullSecrets",
        }, where  # fmt: skip
        for container in spec["containers"]:
            validate_as(container, "container-v1")
        assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx"}
        assert set(spec["protocolVersions"]) <= {"v1", "v2", "grpc-v1", "grpc-v2"}
    elif doc["kind"] == "InferenceService":
        model = spec["predictor"]["model"]
        for port in model["ports"]:
            validate_as(port, "containerport-v1")
        assert model["protocolVersion"] in {"v1", "v2", "grpc-v1", "grpc-v2"}
        assert model["storageUri"].split("://")[0] in {"pvc", "gs", "s3", "https", "hdfs", "oci"}
    elif doc["kind"] == "ServiceMonitor":
        validate_as(spec["selector"], "labelselector-meta-v1")
        assert all(
            set(e) <= {"port", "path", "interval", "scheme", "scrapeTimeout"} for e in spec["endpoints"]
        )


@pytest.mark.parametrize(("where", "container"), containers(), ids=[w for w, _ in containers()])
def test_ports_and_settings_are_the_servers(where: str, container: dict[str, Any]) -> None:
    for port in container["ports"]:
        assert port["containerPort"] == DEFAULTS[PORTS[port["name"]]], f"{where}: port {port['name']}"
    names = {e["name"] for e in container["env"]}
    unknown = {n for n in names if n.removeprefix("SLUICE_").lower() not in DEFAULTS}
    assert not unknown, f"{where}: no such setting {unknown} (an unknown SLUICE_ variable is ignored)"
    settings = settings_of(container)
    # Probes come from the kubelet at the pod's IP: 127.0.0.1 (the default) would fail every one.
    assert settings.host == "0.0.0.0"
    assert settings.metrics_host == "0.0.0.0"
    assert settings.drain_delay_s > 0, (
        "endpoint removal races SIGTERM: a drain delay keeps answering meanwhile"
    )
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(("where", "container"), containers(), ids=[w for w, _ in containers()])
def test_probes_ask_the_servers_health_entries(where: str, container: dict[str, Any]) -> None:
    port = DEFAULTS["port"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": "liveness"}, f"{where}: {probe}"
    assert container["readinessProbe"]["grpc"] in ({"port": port, "service": ""}, {"port": port}), where


async def test_the_probed_services_and_the_scaled_metric_exist_on_a_real_server() -> None:
    services = {
        c[probe]["grpc"].get("service", "")
        for _, c in containers()
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    rules = yaml.safe_load(of_kind("ConfigMap")["data"]["config.yaml"])["rules"]
    series = {rule["seriesQuery"].split("{")[0] for rule in rules}
    server = SluiceServer(ServerSettings(port=0, metrics_port=0, http_port=-1, grace_period_s=5))
    await server.start()
    try:
        await server.loaded()
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in services:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        # The metrics endpoint runs on its own thread, so a blocking scrape from the loop is fine.
        exported = {sample.split("{")[0] for sample in scrape(server)}
    finally:
        await server.stop(0)
    assert series <= exported, f"the adapter reads {series - exported}, which Sluice does not export"


def test_grace_periods_cover_the_drain() -> None:
    deployment = of_kind("Deployment")["spec"]["template"]["spec"]
    runtime = of_kind("ServingRuntime")["spec"]["containers"][0]
    inference_service = of_kind("InferenceService")["spec"]["predictor"]
    for grace, settings in [
        (deployment["terminationGracePeriodSeconds"], settings_of(deployment["containers"][0])),
        (inference_service["terminationGracePeriodSeconds"], settings_of(runtime)),
    ]:
        # The kubelet's SIGKILL must come after the drain delay and the grace period, with time to exit.
        assert grace >= settings.drain_delay_s + settings.grace_period_s + 1
    # The readiness probe notices the drain within the delay: NOT_SERVING is seen before calls are refused.
    readiness = of_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    drain = settings_of(deployment["containers"][0]).drain_delay_s
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain


def test_the_inference_threads_follow_the_cpu_limit() -> None:
    for where, container in containers():
        (threads,) = [e for e in container["env"] if e["name"] == "SLUICE_INFERENCE_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu", where
        assert "cpu" in container["resources"]["limits"], where


def test_services_budgets_and_scalers_point_at_the_deployment() -> None:
    deployment = of_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for name in ("sluice", "sluice-headless"):
        service = of_kind("Service", name)
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports, name
    assert of_kind("Service", "sluice-headless")["spec"]["clusterIP"] == "None"
    assert of_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = of_kind("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= of_kind("Service", "sluice")["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    hpa = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    rules = yaml.safe_load(of_kind("ConfigMap")["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted <= served, f"no adapter rule serves {wanted - served}"


def test_pods_run_as_a_non_root_user() -> None:
    pod = of_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    runtime = of_kind("ServingRuntime")["spec"]["containers"][0]
    assert runtime["securityContext"]["runAsNonRoot"] is True


def test_the_model_repository_comes_from_a_volume() -> None:
    pod = of_kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    repository = Path(container["args"][container["args"].index("serve") + 1])
    mounts = {Path(m["mountPath"]): m for m in container["volumeMounts"]}
    assert mounts[repository]["readOnly"] is True
    assert mounts[repository]["name"] in {v["name"] for v in pod["volumes"]}
    # KServe's storage initializer puts the storageUri's files in /mnt/models.
    assert of_kind("ServingRuntime")["spec"]["containers"][0]["args"] == ["serve", "/mnt/models"]
