"""The deployment files against the schemas of the tools that read them, offline (no cluster, no
Docker), and the probes and ports in them against the processes they start.

- Every object in infra/k8s is validated against the Kubernetes API's own schemas (the OpenAPI
  definitions of each release, as JSON schema, shipped by the pinned `kubernetes-validate`) of the
  oldest release the manifests support and of the newest one the package ships, strictly: a field
  the API does not know is an error, as `kubectl apply --validate=strict` makes it.
- infra/compose/docker-compose.yml is validated against the Compose Specification's JSON schema
  (infra/schemas/compose-spec.json; infra/schemas/README.md says where it comes from).
- Each probe's path is a route of the real app of the process it probes, on the port the process
  listens on (retrainer/processes.py); the Prefect worker's command line is parsed by Prefect's own
  CLI parser.
- A few rules the API server enforces beyond its OpenAPI schema (port names and numbers, resource
  quantities, object names) are checked here, because the schema lets them through.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cyclopts
import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prefect.cli.worker import worker_app
from prefect.settings import get_current_settings
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette

from api.app import create_app
from domain.settings import load_settings
from serving.app import create_serving_app
from serving.registry import ModelRegistry
from web.health import add_health_route, health_app

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "infra" / "k8s"
COMPOSE_FILE = ROOT / "infra" / "compose" / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "infra" / "schemas" / "compose-spec.json"
# The vendored file as infra/schemas/README.md describes it; a changed file must say where it came from.
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
OLDEST_KUBERNETES = "1.33"  # the oldest release infra/README.md says the manifests support
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
WORK_POOL = "retrainer"
WORK_POOL_TYPE = "process"  # flows.registry.deploy_to_work_pool creates the pool with this type

# retrainer/processes.py: the address each long-running process serves /healthz and /metrics on.
HEALTH_ADDRESS_OF = {
    ("api",): "RETRAINER_API_ADDRESS",
    ("serve-models",): "RETRAINER_SERVING_ADDRESS",
    ("consume",): "RETRAINER_HEALTH_ADDRESS",
    ("triggers",): "RETRAINER_HEALTH_ADDRESS",
    ("rollout", "supervise"): "RETRAINER_HEALTH_ADDRESS",
}
# Readiness and liveness of the model server are the Open Inference Protocol's: ready once the
# champions are loaded; /healthz (database and follower) would take every replica out of the
# Service while the database is down, though the models in memory still answer.
OIP_PROBES = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}

# Rules of the API server that its OpenAPI schema does not carry (k8s.io/apimachinery validation).
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$")
WORKLOAD_KINDS = ("Deployment", "Job", "StatefulSet", "DaemonSet")

Objects = list[tuple[str, dict[str, Any]]]


def _manifests() -> Objects:
    """(file name, object) of every API object in infra/k8s; kustomization.yaml is kustomize's
    own input, not an API object (the kustomization test in test_deploy_manifests.py checks it)."""
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


@pytest.fixture(scope="module")
def objects() -> Objects:
    found = _manifests()
    assert found, f"{K8S_DIR} holds no manifests"
    return found


def _schema_error(obj: dict[str, Any], version: str) -> str | None:
    """What the Kubernetes API schema of `version` refuses in `obj` (the first error), or None."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:  # an apiVersion/kind this release does not serve
        return str(e.message)
    return None


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if obj.get("kind") in WORKLOAD_KINDS:
        pod = obj["spec"]["template"]["spec"]
        yield from [*pod.get("initContainers", []), *pod["containers"]]


def _where(file: str, obj: dict[str, Any], container: dict[str, Any] | None = None) -> str:
    where = f"{file}: {obj['kind']} {obj['metadata']['name']}"
    return f"{where} container {container['name']}" if container else where


# ----------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("file", sorted({file for file, _ in _manifests()}))
def test_k8s_manifest_matches_the_kubernetes_api_schema(objects: Objects, file: str, version: str) -> None:
    refused = [
        f"{_where(f, obj)}: {error}"
        for f, obj in objects
        if f == file and (error := _schema_error(obj, version)) is not None
    ]
    assert not refused, f"Kubernetes {version} refuses:\n" + "\n".join(refused)


def test_the_kubernetes_schema_check_refuses_what_the_api_server_would(objects: Objects) -> None:
    """The check is not vacuous: a misspelt field, a port as a string and an API version the
    pinned release no longer serves are each refused, naming where."""
    (_, deployment), *_ = [(f, o) for f, o in objects if o["kind"] == "Deployment"]
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinessProb"] = container.pop("readinessProbe", {})
    assert "'readinessProb' was unexpected" in str(_schema_error(misspelt, OLDEST_KUBERNETES))

    string_port = copy.deepcopy(deployment)
    string_port["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "8080"}]
    error = _schema_error(string_port, OLDEST_KUBERNETES)
    assert error is not None and error.startswith("spec.template.spec.containers.0.ports.0.containerPort:"), error

    ((_, hpa),) = [(f, o) for f, o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    removed = {**copy.deepcopy(hpa), "apiVersion": "autoscaling/v2beta2"}  # removed in Kubernetes 1.26
    assert "Couldn't find schema" in str(_schema_error(removed, OLDEST_KUBERNETES))


def test_k8s_values_the_api_server_checks_beyond_its_schema(objects: Objects) -> None:
    problems = []
    for file, obj in objects:
        if not DNS_1123_LABEL.match(obj["metadata"]["name"]):
            problems.append(f"{_where(file, obj)}: the name is not a DNS-1123 label")
        for container in _containers(obj):
            where = _where(file, obj, container)
            ports = container.get("ports", [])
            for port in ports:
                if not 1 <= port["containerPort"] <= 65535:
                    problems.append(f"{where}: containerPort {port['containerPort']} is outside 1-65535")
                if "name" in port and not IANA_SVC_NAME.match(port["name"]):
                    problems.append(f"{where}: port name {port['name']!r} is not an IANA service name")
            names = [port["name"] for port in ports if "name" in port]
            if len(names) != len(set(names)):
                problems.append(f"{where}: port names repeat: {names}")
            for kind, values in container.get("resources", {}).items():
                problems += [
                    f"{where}: resources.{kind}.{name} {value!r} is not a quantity"
                    for name, value in values.items()
                    if not QUANTITY.match(str(value))
                ]
    assert not problems, "\n".join(problems)


def _restricted_violations(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What the `restricted` Pod Security Standard refuses in one container of `pod`."""
    context, pod_context = container.get("securityContext", {}), pod.get("securityContext", {})
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if context.get("privileged"):
        problems.append("privileged")
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
        problems.append("capabilities must drop ALL and add nothing but NET_BIND_SERVICE")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problems.append("runAsNonRoot must be true (pod or container)")
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append("runAsUser 0")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"seccompProfile {seccomp}, not RuntimeDefault or Localhost")
    if any("hostPort" in port for port in container.get("ports", [])):
        problems.append("hostPort")
    return problems


def test_k8s_pods_meet_the_restricted_pod_security_standard(objects: Objects) -> None:
    """namespace.yaml enforces `restricted`: the API server's admission would refuse any pod below it."""
    ((_, namespace),) = [(f, o) for f, o in objects if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"}
    allowed_volumes |= {"projected", "secret"}
    problems = []
    for file, obj in objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        pod = obj["spec"]["template"]["spec"]
        problems += [f"{_where(file, obj)}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            if kinds - allowed_volumes:
                problems.append(f"{_where(file, obj)}: volume {volume['name']} of type {sorted(kinds)}")
        for container in _containers(obj):
            problems += [f"{_where(file, obj, container)}: {p}" for p in _restricted_violations(pod, container)]
    assert not problems, "\n".join(problems)
    escalating = {"name": "x", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}
    assert len(_restricted_violations({}, escalating)) == 5, "the check itself refuses a privileged container"


# ----------------------------------------------------------------------------- Compose schema


def _compose_validator() -> jsonschema.Draft202012Validator:
    raw = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256, (
        f"{COMPOSE_SCHEMA} changed: update its source and version in infra/schemas/README.md and the digest here"
    )
    schema = json.loads(raw)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _compose_errors(data: dict[str, Any]) -> list[str]:
    errors = sorted(_compose_validator().iter_errors(data), key=lambda e: list(map(str, e.path)))
    return [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors]


def test_compose_file_matches_the_compose_specification() -> None:
    errors = _compose_errors(yaml.safe_load(COMPOSE_FILE.read_text()))
    assert not errors, f"{COMPOSE_FILE.name} against the Compose Specification:\n" + "\n".join(errors)


def test_the_compose_schema_check_refuses_a_misspelt_key() -> None:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    name, service = next(iter(data["services"].items()))
    service["restat"] = "always"
    service["healthcheck"] = {"tset": ["CMD", "true"]}
    errors = _compose_errors(data)
    assert any(e.startswith(f"services.{name}:") and "'restat'" in e for e in errors), errors
    assert any(e.startswith(f"services.{name}.healthcheck:") and "'tset'" in e for e in errors), errors


# ----------------------------------------------------------------------------- probes and ports


def _api_app() -> Starlette:
    # Nothing connects: the app is built and only its public, probe-less routes are called.
    sessions = sessionmaker(create_engine("sqlite://"))
    return create_app(sessions=sessions, settings=load_settings(), submit=None, health_probes={})


def _model_server_app() -> Starlette:
    app = create_serving_app(ModelRegistry())
    add_health_route(app, {})  # as retrainer/processes.py serve_models does
    return app


APP_OF: dict[tuple[str, ...], Callable[[], Starlette]] = {
    ("api",): _api_app,
    ("serve-models",): _model_server_app,
    ("consume",): lambda: health_app({}),
    ("triggers",): lambda: health_app({}),
    ("rollout", "supervise"): lambda: health_app({}),
}


def _process_of(container: dict[str, Any]) -> tuple[str, ...] | None:
    args = tuple(container.get("args") or ())
    if container.get("command") is None:  # the image's ENTRYPOINT is `retrainer`
        return next((words for words in HEALTH_ADDRESS_OF if args[: len(words)] == words), None)
    return None


def _configmap(objects: Objects) -> dict[str, str]:
    ((_, configmap),) = [(f, o) for f, o in objects if o["kind"] == "ConfigMap"]
    return {k: str(v) for k, v in configmap["data"].items()}


def _probed(container: dict[str, Any], probe: str) -> tuple[str | None, int]:
    """(HTTP path or None for a TCP probe, container port number) that `probe` reaches."""
    spec = container[probe]
    action = spec.get("httpGet") or spec.get("tcpSocket")
    assert action is not None, f"{probe}: neither httpGet nor tcpSocket"
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    port = action["port"] if isinstance(action["port"], int) else ports[action["port"]]
    return action.get("path"), port


def test_every_long_running_process_is_probed_on_its_own_health_routes(objects: Objects) -> None:
    """Readiness on /healthz (the OIP routes for the model server), liveness on a route that
    answers while the process runs, both on the port the process listens on; every path probed or
    scraped is a route of the real app of that process (not 404)."""
    env = _configmap(objects)
    seen = set()
    for file, obj in objects:
        for container in _containers(obj):
            process = _process_of(container)
            if process is None:
                continue
            seen.add(process)
            where = _where(file, obj, container)
            port = int(env[HEALTH_ADDRESS_OF[process]].rpartition(":")[2])
            declared = [p["containerPort"] for p in container.get("ports", [])]
            assert port in declared, f"{where}: {HEALTH_ADDRESS_OF[process]} port {port} is not a containerPort"
            annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", f"{where}: /metrics is not scraped"
            assert annotations.get("prometheus.io/port") == str(port), f"{where}: /metrics is scraped elsewhere"
            paths = {annotations.get("prometheus.io/path", "/metrics"), "/healthz"}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: no {probe}"
                path, probed_port = _probed(container, probe)
                assert probed_port == port, f"{where}: {probe} reaches port {probed_port}, the process is on {port}"
                expected = OIP_PROBES[probe] if process == ("serve-models",) else "/healthz"
                if probe == "readinessProbe":
                    assert path == expected, f"{where}: readiness on {path}, not {expected}"
                elif path == "/healthz":
                    pytest.fail(f"{where}: liveness on /healthz restarts the pod when a dependency is down")
                if path is not None:
                    paths.add(path)
            client = TestClient(APP_OF[process]())
            missing = [path for path in sorted(paths) if client.get(path).status_code == 404]
            assert not missing, f"{where}: `retrainer {' '.join(process)}` serves no {missing}"
    assert seen == set(HEALTH_ADDRESS_OF), f"no Deployment runs {sorted(set(HEALTH_ADDRESS_OF) - seen)}"


GRPC_SETTING = "RETRAINER_SERVING_GRPC_ADDRESS"  # serving/grpc_server.py: empty serves no gRPC


def test_the_model_servers_grpc_port_is_declared_where_its_setting_listens(objects: Objects) -> None:
    """The OIP v2 gRPC service listens on the port of RETRAINER_SERVING_GRPC_ADDRESS as the model
    server's container gets it; Kubernetes declares that port (a named container port, a Service port
    on it) and compose publishes it, so `tritonclient.grpc` reaches the replicas. The HTTP probes stay
    on the HTTP port (the test above)."""
    config = _configmap(objects)
    (deployment, container), *others = [
        (obj, c) for _, obj in objects for c in _containers(obj) if _process_of(c) == ("serve-models",)
    ]
    assert not others, "one Deployment runs the model server"
    env = {**config, **{item["name"]: str(item.get("value", "")) for item in container.get("env", [])}}
    assert env.get(GRPC_SETTING), f"the model server's container sets no {GRPC_SETTING}: it would serve no gRPC"
    address = load_settings(serving_grpc_address=env[GRPC_SETTING]).serving_grpc_address  # validated as read
    port = int(address.rpartition(":")[2])
    declared = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert declared.get("grpc") == port, f"{GRPC_SETTING} port {port} is not the container port 'grpc': {declared}"
    assert port != int(config["RETRAINER_SERVING_ADDRESS"].rpartition(":")[2]), "gRPC needs a port of its own"
    (service,) = [
        o for _, o in objects if o["kind"] == "Service" and o["metadata"]["name"] == deployment["metadata"]["name"]
    ]
    targets = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets.get("grpc") == (port, "grpc"), f"the Service does not expose gRPC on {port}: {targets}"

    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["model-server"]
    assert compose["environment"][GRPC_SETTING].rpartition(":")[2] == str(port), "compose listens elsewhere"
    assert f"127.0.0.1:{port}:{port}" in compose["ports"], f"compose does not publish the gRPC port {port}"


def _worker_arguments(command: list[str], where: str) -> dict[str, Any]:
    """The arguments Prefect's own CLI parser binds from `prefect worker start …` (nothing runs)."""
    assert command[:2] == ["worker", "start"], f"{where}: {command} is not `prefect worker start`"
    _, bound, _ = worker_app.parse_args(command[1:], exit_on_error=False, print_error=False)
    return dict(bound.arguments)


def _k8s_workers(objects: Objects) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for file, obj in objects:
        for container in _containers(obj):
            if container.get("command") == ["prefect"]:
                yield _where(file, obj, container), container, _worker_arguments(container["args"], file)


def test_the_prefect_workers_poll_the_pool_the_deployments_are_on(objects: Objects) -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    compose_workers = [
        (f"compose service {name}", _worker_arguments(s["command"], name))
        for name, s in compose.items()
        if s.get("entrypoint") == ["prefect"]
    ]
    k8s_workers = list(_k8s_workers(objects))
    assert len(compose_workers) == 1 and len(k8s_workers) == 1, (compose_workers, k8s_workers)
    for where, arguments in [*compose_workers, *((w, a) for w, _, a in k8s_workers)]:
        assert arguments.get("work_pool_name") == WORK_POOL, f"{where}: polls {arguments.get('work_pool_name')}"
        assert arguments.get("worker_type") == WORK_POOL_TYPE, f"{where}: worker type {arguments.get('worker_type')}"
        assert arguments.get("limit", 0) >= 1, f"{where}: --limit caps concurrent flow runs; give one"

    # The liveness probe reaches the worker's own health server: --with-healthcheck, on the port
    # Prefect serves it on (PREFECT_WORKER_WEBSERVER_PORT from the ConfigMap, else Prefect's default).
    ((where, container, arguments),) = k8s_workers
    assert arguments.get("with_healthcheck") is True, f"{where}: the liveness probe needs --with-healthcheck"
    default_port = get_current_settings().worker.webserver.port
    port = int(_configmap(objects).get("PREFECT_WORKER_WEBSERVER_PORT", default_port))
    assert _probed(container, "livenessProbe") == ("/health", port), f"{where}: liveness is not the worker's /health"


def test_the_prefect_worker_parser_refuses_a_bad_command_line() -> None:
    """Proof that _worker_arguments checks something: Prefect's parser refuses an unknown option."""
    with pytest.raises(cyclopts.UnknownOptionError, match="--poll"):
        _worker_arguments(["worker", "start", "--poll", WORK_POOL], "a typo")
