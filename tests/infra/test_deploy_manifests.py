"""The deployment files agree with the code: Dockerfile, infra/compose, infra/k8s, infra/README.md.

Nothing here starts Docker or Kubernetes (neither is needed to run the tests). The checks are
structural and take a second or two: every YAML parses; every RETRAINER_* variable is a
field of `domain.settings.Settings` and every value set for one passes its validation; every
`retrainer …` command line exists in the Typer app with the options it is given; no container
runs inline Python (each runs a CLI command); compose dependencies, Kubernetes selectors, Service ports, the
HPA target and the kustomization's resource list are consistent with each other. The schemas of
Kubernetes and Compose, the probes and metrics ports and the Prefect workers' command lines are
checked in test_manifests_schema.py.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from domain.errors import ConfigurationError
from domain.settings import ENV_PREFIX, Settings, load_settings
from retrainer.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_DIR = ROOT / "infra" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = ROOT / "infra" / "k8s"
INFRA_README = ROOT / "infra" / "README.md"

REPO_PACKAGES = frozenset(
    name.rstrip("*")
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
)
SETTING_NAMES = frozenset(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
K8S_IMAGE = "retrainer"  # the image name the manifests use; kustomization.yaml's `images` maps it
WORK_POOL = "retrainer"
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - in a container a server must listen beyond loopback
RETRAINER_PROCESSES = {
    ("api",), ("consume",), ("triggers",), ("serve-models",), ("db", "upgrade"),
    ("pipelines", "deploy"), ("rollout", "supervise"),
}  # fmt: skip
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# `retrainer WORD…` as a command inside a shell script or a README code block: at the start of a
# line or after ; & | ( or `--`, or as the command of `exec SERVICE`. Words stop at the first
# option, argument in capitals, quote or end of line.
RETRAINER_CALL = re.compile(r"(?:^|[;&|(]|--|\bexec\s+\S+)[ \t]*retrainer((?:[ \t]+[a-z][a-z0-9-]*)+)", re.MULTILINE)


# ----------------------------------------------------------------------------- loading


def _yaml_files() -> list[Path]:
    return sorted([*COMPOSE_DIR.rglob("*.yml"), *COMPOSE_DIR.rglob("*.yaml"), *K8S_DIR.glob("*.yaml")])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose file has no services"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every Kubernetes object in infra/k8s (the kustomization excluded)."""
    objects = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((path.name, doc))
    assert objects, "infra/k8s holds no manifests"
    return objects


def _of_kind(objects: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [obj for _, obj in objects if obj.get("kind") == kind]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Process:
    """What one container runs: `retrainer ARGV`, `prefect ARGV`, a shell script or `python -c`."""

    where: str
    program: str  # retrainer | prefect | sh | python | other
    argv: tuple[str, ...] = ()
    script: str = ""


def _process(where: str, entrypoint: list[str] | None, command: list[str] | None) -> Process:
    """The process of a container built from the Dockerfile (ENTRYPOINT ["retrainer"])."""
    full = [*(entrypoint if entrypoint is not None else ["retrainer"]), *(command or [])]
    program = Path(full[0]).name
    if program in ("sh", "bash") and len(full) >= 3 and full[1].startswith("-") and "c" in full[1]:
        return Process(where, "sh", script=full[2])
    if program.startswith("python") and len(full) == 3 and full[1] == "-c":
        return Process(where, "python", script=full[2])
    if program in ("retrainer", "prefect"):
        return Process(where, program, tuple(full[1:]))
    return Process(where, "other", tuple(full))


def _uses_retrainer_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    return (COMPOSE_DIR / context).resolve() == ROOT


def _compose_processes(services: dict[str, dict[str, Any]]) -> list[Process]:
    processes = []
    for name, service in services.items():
        if not _uses_retrainer_image(service):
            continue
        for key in ("entrypoint", "command"):
            assert key not in service or isinstance(service[key], list), (
                f"compose service {name}: write `{key}` as a list (exec form), not a string"
            )
        processes.append(_process(f"compose service {name}", service.get("entrypoint"), service.get("command")))
    return processes


def _k8s_processes(objects: list[tuple[str, dict[str, Any]]]) -> list[Process]:
    processes = []
    for file, obj in objects:
        if obj.get("kind") not in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            continue
        for container in _containers(obj):
            if container["image"] != K8S_IMAGE:
                continue
            where = f"{file}: {obj['kind']} {obj['metadata']['name']} container {container['name']}"
            command = container.get("command")
            # Kubernetes: `command` replaces ENTRYPOINT, `args` replaces CMD.
            processes.append(_process(where, command, container.get("args")))
    return processes


def _command_path(words: list[str]) -> tuple[str, ...]:
    """The leading words of `words` that name a command of the CLI (groups walked), or an
    AssertionError naming the first word that is not one. Typer vendors its own click, so groups
    are recognised by their `commands` mapping rather than by class."""
    command: Any = get_command(app)
    path: list[str] = []
    for word in words:
        subcommands = getattr(command, "commands", None)
        if subcommands is None or word.startswith("-"):
            break
        assert word in subcommands, (
            f"`retrainer {' '.join([*path, word])}`: no such command (available: {', '.join(sorted(subcommands))})"
        )
        command, path = subcommands[word], [*path, word]
    assert getattr(command, "commands", None) is None, f"`retrainer {' '.join(path)}` is a group, not a command"
    return tuple(path)


def _check_argv(where: str, argv: tuple[str, ...]) -> tuple[str, ...]:
    """The command exists and accepts the options given (click parses them before --help acts)."""
    path = _command_path(list(argv)) if argv and argv != ("--help",) else ()
    result = CliRunner().invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, f"{where}: `retrainer {' '.join(argv)}` is refused:\n{result.output}"
    return path


def _calls_in(text: str) -> list[list[str]]:
    return [match.group(1).split() for match in RETRAINER_CALL.finditer(text)]


# ----------------------------------------------------------------------------- every file parses


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_the_package_as_a_non_root_user() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim", froms
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install -c constraints\.txt\b[^&;]*\s\.(\s|$)", runs), (
        "the Dockerfile must install the package with `pip install -c constraints.txt .`"
    )
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the Dockerfile must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), f"USER {users[-1]} is root"
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["retrainer"], entrypoints
    cmds = [rest for keyword, rest in instructions if keyword == "CMD"]
    if cmds:
        _check_argv("Dockerfile CMD", tuple(yaml.safe_load(cmds[-1])))


def test_dockerfile_copies_every_package_of_the_distribution() -> None:
    copied = {
        Path(word).parts[0]
        for keyword, rest in _dockerfile_instructions()
        if keyword == "COPY" and "--from" not in rest
        for word in shlex.split(rest)[:-1]
        if not word.startswith("--")
    }
    assert copied >= REPO_PACKAGES, f"packages the Dockerfile does not COPY: {sorted(REPO_PACKAGES - copied)}"
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= {
        word for keyword, rest in _dockerfile_instructions() if keyword == "COPY" for word in shlex.split(rest)
    }


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    entries = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".venv", ".cache", ".retrainer", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"} - entries
    assert not missing, f".dockerignore does not exclude {sorted(missing)}"


# ----------------------------------------------------------------------------- settings


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _dockerfile_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def _k8s_environments(objects: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """Every place a Kubernetes manifest sets environment variables, by where."""
    found: dict[str, dict[str, str]] = {}
    for file, obj in objects:
        name = f"{file}: {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "ConfigMap":
            found[name] = {k: str(v) for k, v in (obj.get("data") or {}).items()}
        elif obj["kind"] == "Secret":
            found[name] = {k: str(v) for k, v in {**(obj.get("data") or {}), **(obj.get("stringData") or {})}.items()}
        elif obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            for container in _containers(obj):
                env = {item["name"]: str(item.get("value", "")) for item in container.get("env", [])}
                found[f"{name} container {container['name']}"] = env
    return found


def test_every_retrainer_variable_is_a_setting(
    services: dict[str, dict[str, Any]], k8s_objects: list[tuple[str, dict[str, Any]]]
) -> None:
    sources = {f"compose service {name}": _compose_environment(s) for name, s in services.items()}
    sources["Dockerfile ENV"] = _dockerfile_environment()
    sources.update(_k8s_environments(k8s_objects))
    unknown = [
        f"{where}: {name}"
        for where, env in sources.items()
        for name in env
        if name.startswith(ENV_PREFIX) and name not in SETTING_NAMES
    ]
    assert not unknown, "RETRAINER_* variables that domain/settings.py does not define:\n" + "\n".join(unknown)
    assert any(name.startswith(ENV_PREFIX) for env in sources.values() for name in env)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _validate_settings(where: str, env: dict[str, str]) -> Settings:
    values = {name.removeprefix(ENV_PREFIX).lower(): value for name, value in env.items() if name in SETTING_NAMES}
    try:
        return load_settings(**values)
    except ConfigurationError as e:  # names each bad variable and what is wrong with it
        pytest.fail(f"{where}: {e}")


@pytest.mark.usefixtures("clean_env")
def test_compose_settings_are_valid(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if _uses_retrainer_image(service):
            settings = _validate_settings(f"compose service {name}", _compose_environment(service))
            assert settings.database_url.startswith("postgresql+psycopg://"), name
            assert settings.artifact_root.startswith("s3://"), name
            for address in (settings.api_address, settings.serving_address):
                assert address.rsplit(":", 1)[0] == EVERY_INTERFACE, f"{name}: bind {EVERY_INTERFACE} in a container"
            assert str(settings.pipelines_dir).startswith("/"), f"{name}: flows run in temp dirs; use an absolute path"


@pytest.mark.usefixtures("clean_env")
def test_k8s_settings_are_valid(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    env = {}
    for obj in [*_of_kind(k8s_objects, "ConfigMap"), *_of_kind(k8s_objects, "Secret")]:
        env.update(obj.get("data") or {})
        env.update(obj.get("stringData") or {})
    settings = _validate_settings("infra/k8s ConfigMap + Secret", {k: str(v) for k, v in env.items()})
    for address in (settings.api_address, settings.serving_address):
        assert address.rsplit(":", 1)[0] == EVERY_INTERFACE, f"bind {EVERY_INTERFACE} in a pod"
    assert str(settings.pipelines_dir).startswith("/") and str(settings.home_dir).startswith("/")
    assert "PREFECT_API_URL" in env, "the worker, API and debouncer need PREFECT_API_URL"


# ----------------------------------------------------------------------------- CLI commands


def test_compose_and_k8s_run_real_cli_commands(
    services: dict[str, dict[str, Any]], k8s_objects: list[tuple[str, dict[str, Any]]]
) -> None:
    for label, processes in (
        ("compose", _compose_processes(services)),
        ("k8s", _k8s_processes(k8s_objects)),
    ):
        paths = set()
        for process in processes:
            if process.program == "retrainer":
                paths.add(_check_argv(process.where, process.argv))
            elif process.program == "sh":
                calls = _calls_in(process.script)
                assert calls, f"{process.where}: a shell script that runs no `retrainer` command"
                paths.update(_command_path(words) for words in calls)
            elif process.program == "prefect":
                assert process.argv[:2] == ("worker", "start"), process
            elif process.program == "python":
                assert process.script.strip(), process.where
            else:
                pytest.fail(f"{process.where}: runs {process.argv}, neither retrainer nor prefect")
        missing = RETRAINER_PROCESSES - paths
        assert not missing, f"{label}: no container runs {sorted(' '.join(p) for p in missing)}"


def test_readme_commands_exist() -> None:
    text = INFRA_README.read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    calls = [words for block in blocks for words in _calls_in(block)]
    assert calls, "infra/README.md shows no `retrainer …` command"
    for words in calls:
        _command_path(words)


def test_no_container_runs_inline_python(
    services: dict[str, dict[str, Any]], k8s_objects: list[tuple[str, dict[str, Any]]]
) -> None:
    """Registration and the canary supervisor are CLI commands (`pipelines deploy`, `rollout
    supervise`), tested with the code; inline scripts in YAML are tested by nothing."""
    for process in [*_compose_processes(services), *_k8s_processes(k8s_objects)]:
        assert process.program != "python", f"{process.where}: inline Python; make it a `retrainer` command"
        assert not re.search(r"^\s*python3? ", process.script, flags=re.MULTILINE), process.where


def test_pipelines_are_deployed_on_the_work_pool(
    services: dict[str, dict[str, Any]], k8s_objects: list[tuple[str, dict[str, Any]]]
) -> None:
    """The workers' side (`prefect worker start --pool`) is parsed by Prefect's own CLI parser in
    test_manifests_schema.py."""
    processes = [*_compose_processes(services), *_k8s_processes(k8s_objects)]
    deploys = [p for p in processes if p.program == "retrainer" and p.argv[:2] == ("pipelines", "deploy")]
    assert len(deploys) == 2, "one `retrainer pipelines deploy` in compose and one in k8s"
    for deploy in deploys:
        argv = list(deploy.argv)
        assert argv[argv.index("--pool") + 1] == WORK_POOL, deploy.where


# ----------------------------------------------------------------------------- compose


def test_compose_services_have_an_image_and_real_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, f"compose service {name}: neither image nor build"
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, spec in depends.items():
            assert target in services, f"compose service {name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            assert condition in DEPENDS_ON_CONDITIONS, f"{name} -> {target}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") in ("no", "on-failure"), (
                    f"{name} waits for {target} to complete, but {target} restarts forever"
                )


def test_compose_has_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    images = {name: str(service.get("image", "")) for name, service in services.items()}
    assert any(image.startswith("apache/kafka:") for image in images.values()), "Kafka (apache/kafka)"
    assert any(image.startswith("postgres:") for image in images.values()), "PostgreSQL"
    assert any("minio/minio:" in image for image in images.values()), "MinIO"
    assert any("minio/mc:" in image for image in images.values()), "a bucket-creating one-shot (minio/mc)"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    prefect_pin = next(p.split("==")[1] for p in pins if p.startswith("prefect=="))
    prefect = [s for s in services.values() if str(s.get("image", "")).startswith("prefecthq/prefect:")]
    assert len(prefect) == 1, "one Prefect server"
    assert prefect[0]["image"] == f"prefecthq/prefect:{prefect_pin}-python3.11", "server and client versions differ"
    assert prefect[0]["command"][:3] == ["prefect", "server", "start"] and EVERY_INTERFACE in prefect[0]["command"]
    retrainer = [name for name, service in services.items() if _uses_retrainer_image(service)]
    assert len(retrainer) >= 6, retrainer
    assert (ROOT / "Dockerfile").is_file()


def test_compose_mounts_and_ports_match_the_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"compose service {name}: {source} does not exist"
        env = _compose_environment(service)
        published = {str(port).rsplit(":", 1)[-1] for port in service.get("ports", [])}
        command = service.get("command") or []
        if command[:1] == ["api"]:
            assert env["RETRAINER_API_ADDRESS"].rsplit(":", 1)[1] in published, name
        if command[:1] == ["serve-models"]:
            assert env["RETRAINER_SERVING_ADDRESS"].rsplit(":", 1)[1] in published, name
        if "RETRAINER_PIPELINES_DIR" in env:
            mounts = [str(v).split(":")[1] for v in service.get("volumes", []) if str(v).startswith("../../pipelines")]
            assert mounts == [env["RETRAINER_PIPELINES_DIR"]], f"{name}: mount ./pipelines at RETRAINER_PIPELINES_DIR"


def _topic_partitions(services: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Topics and partition counts that the compose kafka-init script creates."""
    script = " ".join(" ".join(s.get("command") or []) for s in services.values() if "kafka-topics.sh" in str(s))
    return {topic: int(count) for topic, count in re.findall(r"\b(retrainer\.[\w.-]+):(\d+)\b", script)}


def test_topics_match_the_settings_and_consumers_fit_the_partitions(
    services: dict[str, dict[str, Any]], k8s_objects: list[tuple[str, dict[str, Any]]]
) -> None:
    partitions = _topic_partitions(services)
    default_topic = Settings.model_fields["kafka_topic"].default
    topic = _compose_environment(services["consumer"]).get("RETRAINER_KAFKA_TOPIC", default_topic)
    assert set(partitions) == {topic, f"{topic}.dlq"}, partitions
    (consumer,) = [
        obj
        for obj in _of_kind(k8s_objects, "Deployment")
        if any((c.get("args") or [None])[0] == "consume" for c in _containers(obj))
    ]
    assert 1 <= consumer["spec"]["replicas"] <= partitions[topic], "consumer replicas beyond partitions sit idle"


# ----------------------------------------------------------------------------- Kubernetes


def test_k8s_objects_are_well_formed(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    namespaces = {obj["metadata"]["name"] for obj in _of_kind(k8s_objects, "Namespace")}
    assert len(namespaces) == 1, namespaces
    seen = set()
    for file, obj in k8s_objects:
        assert obj.get("apiVersion") and obj.get("kind"), f"{file}: apiVersion and kind are required"
        name = (obj.get("metadata") or {}).get("name")
        assert name, f"{file}: {obj['kind']} without metadata.name"
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"].get("namespace") in namespaces, f"{file}: {obj['kind']} {name} namespace"
        assert (obj["kind"], name) not in seen, f"{file}: duplicate {obj['kind']} {name}"
        seen.add((obj["kind"], name))


def test_k8s_workloads_select_their_pods_and_reference_real_config(
    k8s_objects: list[tuple[str, dict[str, Any]]],
) -> None:
    configmaps = {obj["metadata"]["name"] for obj in _of_kind(k8s_objects, "ConfigMap")}
    secrets = {obj["metadata"]["name"] for obj in _of_kind(k8s_objects, "Secret")}
    workloads = [*_of_kind(k8s_objects, "Deployment"), *_of_kind(k8s_objects, "Job")]
    assert workloads
    for workload in workloads:
        name = f"{workload['kind']} {workload['metadata']['name']}"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["kind"] == "Deployment":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector and selector.items() <= labels.items(), f"{name}: selector does not match its pods"
        pod = _pod_spec(workload)
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pods must run as non-root"
        for container in _containers(workload):
            assert container.get("name") and container.get("image"), name
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, name
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, f"{name}: unknown ConfigMap"
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, f"{name}: unknown Secret"


def _deployment_selected_by(objects: list[tuple[str, dict[str, Any]]], selector: dict[str, str]) -> dict[str, Any]:
    matches = [
        d
        for d in _of_kind(objects, "Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(matches) == 1, f"selector {selector} matches {len(matches)} Deployments"
    return matches[0]


def _container_ports(deployment: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number."""
    ports: dict[str | int, int] = {}
    for container in _containers(deployment):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_k8s_services_target_declared_container_ports(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    services = _of_kind(k8s_objects, "Service")
    assert services
    for service in services:
        deployment = _deployment_selected_by(k8s_objects, service["spec"]["selector"])
        declared = _container_ports(deployment)
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in declared, (
                f"Service {service['metadata']['name']}: targetPort {target} is not a containerPort of "
                f"Deployment {deployment['metadata']['name']} ({sorted(map(str, declared))})"
            )
    for pdb in _of_kind(k8s_objects, "PodDisruptionBudget"):
        _deployment_selected_by(k8s_objects, pdb["spec"]["selector"]["matchLabels"])


def _deployment_running(objects: list[tuple[str, dict[str, Any]]], command: str) -> dict[str, Any]:
    (deployment,) = [
        d
        for d in _of_kind(objects, "Deployment")
        if any((c.get("args") or [None])[0] == command for c in _containers(d))
    ]
    return deployment


def test_model_server_resources_and_autoscaler(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    """(Its probes and metrics port: test_manifests_schema.py.)"""
    deployment = _deployment_running(k8s_objects, "serve-models")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"], "requests (the HPA needs cpu)"
    assert resources["limits"]["cpu"] and resources["limits"]["memory"], "limits"

    (hpa,) = _of_kind(k8s_objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert any(
        m["type"] == "Resource" and m["resource"]["name"] == "cpu" and m["resource"]["target"]["type"] == "Utilization"
        for m in hpa["spec"]["metrics"]
    ), "the HPA scales on CPU utilisation"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a fixed one fights it"
    (pdb,) = _of_kind(k8s_objects, "PodDisruptionBudget")
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", (
        "model servers are unready until the first champion; they must not block a node drain"
    )


def test_kustomization_lists_exactly_the_manifests(k8s_objects: list[tuple[str, dict[str, Any]]]) -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    files = {path.name for path in K8S_DIR.iterdir() if path.is_file() and path.name != "kustomization.yaml"}
    assert set(listed) == files, f"not listed: {sorted(files - set(listed))}; missing: {sorted(set(listed) - files)}"
    assert [image["name"] for image in kustomization.get("images", [])] == [K8S_IMAGE]
    assert _k8s_processes(k8s_objects), f"no container uses image {K8S_IMAGE!r}"


# ----------------------------------------------------------------------------- health and metrics

HEALTH_SETTING = "RETRAINER_HEALTH_ADDRESS"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
LONG_RUNNING = {
    ("api",): "RETRAINER_API_ADDRESS", ("serve-models",): "RETRAINER_SERVING_ADDRESS",
    ("consume",): HEALTH_SETTING, ("triggers",): HEALTH_SETTING, ("rollout", "supervise"): HEALTH_SETTING,
}  # fmt: skip
"""Every long-running process and the setting of the address its /healthz and /metrics are on."""


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_every_long_running_compose_process_is_scraped_and_health_checked(
    services: dict[str, dict[str, Any]],
) -> None:
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    (prometheus,) = [s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus")]
    assert any(volume.startswith("./prometheus.yml:") for volume in prometheus["volumes"])
    for words, setting in LONG_RUNNING.items():
        (name,) = [n for n, s in services.items() if tuple((s.get("command") or [])[: len(words)]) == words]
        port = _port(_compose_environment(services[name])[setting])
        assert f"{name}:{port}" in targets, f"{PROMETHEUS_CONFIG.name} does not scrape compose service {name}"
        if setting == HEALTH_SETTING:
            check = " ".join(services[name]["healthcheck"]["test"])
            assert f"127.0.0.1:{port}/healthz" in check, f"compose service {name}: no healthcheck on /healthz"
