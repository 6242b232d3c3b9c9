"""`retrainer demo`: the whole story through the running service (`retrainer.service`), with the
digits data cut into versions. Every act is a real data-change event on Kafka; the consumer, the
trigger service, the Prefect runner, the gate, the model server and the canary controller do the
rest, and live traffic (with delayed labels) flows while a canary is out.

    v1  60 % of the rows                 → first model, promoted on the absolute gates
    v2  all rows, trained longer         → better than the champion → canary under traffic → promoted
    v3  30 % of the labels flipped        → rejected by the gate; the champion stays
    v4  v2 data, `ml.demo_models:LookupMLP` → as accurate (non-inferior), under the absolute latency
                                           ceiling, but a blocking per-request lookup makes it slower than
                                           the champion on the same live traffic: rolled back

`run_story` drives the acts against any running service (the end-to-end test uses it against
`retrainer serve` on PostgreSQL and MinIO); `demo_environment` sets up the embedded defaults and
`run_demo` is the command: while it runs, the service's logs go to files under the demo's
`logs/` folder, so the terminal shows only the progress view, the table and the report path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich import progress as bars
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.apikeys import TRAFFIC_KEY_NAME, Scope
from domain.errors import InfrastructureError, RetrainerError
from domain.settings import Settings, load_settings
from flows.records import decision_record
from flows.retry import poll_until
from storage import repositories as repo
from storage.db import transaction

if TYPE_CHECKING:
    from retrainer.traffic import Traffic

PIPELINE = "digits-classifier"
DEMO_SPEC: dict[str, Any] = {
    "name": PIPELINE,
    "dataset": "digits",
    "data": {"format": "csv", "target": "label", "validation_fraction": 0.15, "test_fraction": 0.2, "seed": 7},
    "model": {
        "architecture": "mlp",
        "params": {"hidden_sizes": [128, 64], "dropout": 0.1},
        "input_shape": [64],
        "output_classes": 10,
    },
    "hyperparameters": {
        "optimizer": "adamw",
        "learning_rate": 0.001,
        "weight_decay": 0.01,
        "batch_size": 64,
        "epochs": 3,
        "lr_schedule": {"type": "cosine_warm_restarts", "t0": 10},
        "gradient_clip_norm": 1.0,
        "checkpoint_every_steps": 20,
    },
    "hardware": {"device": "cpu", "precision": "fp32"},
    "quantization": {"type": "dynamic", "max_accuracy_drop": 0.01},
    "evaluation": {"latency_budget_seconds": 0.5},
    "gates": {
        "min": {"accuracy": 0.85},
        "max": {"latency_p99_ms": 100.0},
        "vs_champion": {"accuracy": {"min_delta": 0.0, "confidence": 0.95}},
    },
    "canary": {
        "steps": [25, 50, 100],
        "interval_seconds": 4,
        # Each check is a test whose false-rollback rate the judge controls (canary.confidence), but a
        # threshold must lie outside the window's sampling noise: with 10 classes, PSI 0.25 at the
        # 50 % step needs 136 requests per variant (`retrainer pipelines validate` refuses fewer).
        "min_requests": 150,
        "max_error_rate": 0.01,
        "max_latency_p99_ratio": 1.2,
        "latency_p99_slack_ms": 10.0,  # the server answers in a few ms: 1.2x of 5 ms is jitter, not a slow model
        "failure_limit": 1,
        "max_prediction_psi": 0.25,
        "min_labels": 30,
        "max_accuracy_drop": 0.05,
    },
    "triggers": {"events": {"debounce_seconds": 1, "max_wait_seconds": 10}, "manual": True},
}


@dataclass(frozen=True)
class Act:
    key: str  # the dataset version the event announces
    data: str  # which digits file it points at
    story: str
    expect: str  # the final run status the story expects
    epochs: int
    spec_changes: dict[str, Any] = field(default_factory=dict)


SLOW = {
    "model": {"architecture": "ml.demo_models:LookupMLP", "params": {"lookup_ms": 50.0}},
    # served as the float torch model: an ONNX export traces tensor operations only, so a quantized
    # variant would drop the Python-side lookup and with it the slowness this act is about
    "quantization": {"type": "none"},
    "gates": {"vs_champion": {"accuracy": {"min_delta": -0.03, "confidence": 0.95, "mode": "non_inferiority"}}},
}
ACTS = (
    Act("v1", "v1", "first model on 60 % of the data", "promoted", 3),
    Act("v2", "v2", "all the data, trained longer", "promoted", 15),
    Act("v3", "v3", "30 % of the labels flipped", "rejected", 15),
    Act("v4", "v2", "as accurate, but a blocking lookup makes it slow in serving", "rolled_back", 15, SLOW),
)


@dataclass(frozen=True)
class ActResult:
    act: Act
    event_id: str
    run_id: str
    status: str
    model_version: int | None
    reason: str
    seconds: float
    traffic: dict[str, int] = field(default_factory=dict)


Progress = Callable[[str, str], None]  # (act key, what is happening now)


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def spec_for(act: Act, base: dict[str, Any] = DEMO_SPEC) -> dict[str, Any]:
    document = merged(base, act.spec_changes)
    document["hyperparameters"]["epochs"] = act.epochs
    return document


def write_spec(directory: Path, document: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def read_rows(path: Path, spec: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (a regression spec: float targets, one column per output, squeezed to one
    value per row for a single output) of a data file, read by the pipelines' own loader as `spec`
    (default: the digits CSV, label column `label`) reads it."""
    from domain.spec import PipelineSpec
    from ml.data import RegressionTable
    from ml.loaders import load_data

    parsed = PipelineSpec.model_validate(spec or DEMO_SPEC)
    table = load_data(path, parsed.data, task=parsed.task, input_shape=parsed.model.input_shape)
    if isinstance(table, RegressionTable):
        targets = np.asarray(table.targets, dtype=np.float64).reshape(table.num_rows, -1)
        return table.features, targets[:, 0] if targets.shape[1] == 1 else targets
    return table.features, table.labels


def _run_for_event(session: Session, pipeline: str, event_id: str) -> e.Run | None:
    for run in repo.list_runs(session, pipeline, limit=20):
        if event_id in run.event_ids:
            return run
    return None


@dataclass
class _ActWatch:
    """Follows one act's run: says where it is and starts live traffic once it is a canary."""

    sessions: sessionmaker[Session]
    pipeline: str
    event_id: str
    act: str
    say: Progress
    run: e.Run | None = None
    traffic: Traffic | None = None

    def look(self, new_traffic: Callable[[], Traffic]) -> e.Run | None:
        """One look: the run once its status is final, else None (shown as progress)."""
        with transaction(self.sessions) as session:
            self.run = run = _run_for_event(session, self.pipeline, self.event_id)
            rollout = repo.active_rollout(session, self.pipeline) if run else None
        if run is None:
            self.say(self.act, "waiting for the consumer and the trigger service")
        elif run.status is e.RunStatus.CANARY and rollout is not None:
            self.traffic = self.traffic or new_traffic().start()
            steps = len(rollout.policy.get("steps", []))
            step = min(rollout.current_step + 1, steps)
            sent = self.traffic.stats.sent
            self.say(self.act, f"canary step {step}/{steps} at {rollout.traffic_percent:g} % · {sent} requests")
        elif run.status.is_final:
            return run
        else:
            self.say(self.act, f"run {run.id[:8]} {run.status.value}")
        return None

    def too_late(self, timeout_s: float, logs: Path) -> InfrastructureError:
        run = self.run.id if self.run else "not created"
        return InfrastructureError(
            f"demo act {self.act}: no final decision within {timeout_s:.0f} s (run {run}); see {logs}"
        )


def run_story(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    serving_url: str,
    data: dict[str, str],
    traffic_rows: Path,
    acts: tuple[Act, ...] = ACTS,
    base_spec: dict[str, Any] = DEMO_SPEC,
    progress: Progress | None = None,
    act_timeout_s: float = 300.0,
) -> list[ActResult]:
    """Publishes one event per act and follows its run to the end, with live traffic during a canary."""
    from consumers.publisher import data_changed_event, publish_data_changed
    from retrainer.traffic import Traffic

    say = progress or (lambda _act, _text: None)
    rows, labels = read_rows(traffic_rows, base_spec)
    with transaction(sessions) as session:  # the load generator's own key: its labels need `feedback`
        _key, traffic_key = repo.provision_api_key(session, TRAFFIC_KEY_NAME, [Scope.INFER, Scope.FEEDBACK])
    results: list[ActResult] = []
    for act in acts:
        started = time.monotonic()
        document = spec_for(act, base_spec)
        write_spec(settings.pipelines_dir, document)
        with transaction(sessions) as session:  # what `retrainer pipelines sync` does after a spec edit
            repo.upsert_pipeline(session, document["name"], document["dataset"], document)
        event = data_changed_event(
            document["dataset"], data[act.data], version=act.key, source="//retrainer/demo",
            event_id=f"demo-{act.key}-{uuid.uuid4().hex[:8]}",
        )  # fmt: skip
        event_id = publish_data_changed(settings.kafka_bootstrap_servers, settings.kafka_topic, event)
        say(act.key, f"event {event_id} published to {settings.kafka_topic}")
        watch = _ActWatch(sessions, document["name"], event_id, act.key, say)
        new_traffic = functools.partial(
            Traffic, serving_url, document["name"], rows, labels=labels, feedback_fraction=0.3, clients=3,
            rate_per_second=100, rows_per_request=8, seed=len(results), api_key=traffic_key,
        )  # fmt: skip
        try:
            run = poll_until(
                functools.partial(watch.look, new_traffic),
                timeout_s=act_timeout_s - (time.monotonic() - started),
                on_timeout=functools.partial(watch.too_late, act_timeout_s, settings.home_dir / "logs"),
            )
        finally:
            served = dict(watch.traffic.stop().by_version) if watch.traffic is not None else {}
        with transaction(sessions) as session:
            record = decision_record(session, run.id)
        outcome = record["decision"].get("outcome") or {}
        results.append(
            ActResult(
                act=act,
                event_id=event_id,
                run_id=run.id,
                status=record["status"],
                model_version=record["model_version"],
                reason=str(outcome.get("reason") or record.get("error") or ""),
                seconds=time.monotonic() - started,
                traffic=served,
            )
        )
        say(act.key, f"{record['status']}: {results[-1].reason}")
    return results


# --------------------------------------------------------------------------- embedded defaults


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def demo_environment(home: Path) -> dict[str, str]:
    """RETRAINER_* for a fresh demo under `home`: SQLite, local artifacts, a topic of its own (so
    events of earlier demos or other users of the broker never replay into it), free ports."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "RETRAINER_HOME_DIR": str(home),
        "RETRAINER_DATABASE_URL": f"sqlite:///{home / 'retrainer.db'}",
        "RETRAINER_ARTIFACT_ROOT": (home / "artifacts").as_uri(),
        "RETRAINER_PIPELINES_DIR": str(home / "pipelines"),
        "RETRAINER_KAFKA_TOPIC": f"retrainer.demo-{suffix}",
        "RETRAINER_KAFKA_DLQ_TOPIC": f"retrainer.demo-{suffix}.dlq",
        "RETRAINER_KAFKA_CONSUMER_GROUP": f"retrainer-demo-{suffix}",
        "RETRAINER_API_ADDRESS": "127.0.0.1:0",
        "RETRAINER_SERVING_ADDRESS": "127.0.0.1:0",
        "RETRAINER_CANARY_POLL_SECONDS": "0.5",
        # INFO: the logs go to files under `home`/logs (`run_demo`), never between the progress lines
        "RETRAINER_LOG_LEVEL": "INFO",
    }


def fresh_home(home: Path) -> Path:
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    return home


def ensure_kafka(settings: Settings) -> str:
    """The broker at RETRAINER_KAFKA_BOOTSTRAP_SERVERS, started from infra/local if none answers."""
    from consumers.health import check_kafka
    from domain.errors import RetrainerError

    try:
        check_kafka(settings.kafka_bootstrap_servers, [], settings.connect_timeout_seconds)
        return f"Kafka answers at {settings.kafka_bootstrap_servers}"
    except RetrainerError:
        script = repo_root() / "infra" / "local" / "kafka.sh"
        if not script.is_file():
            raise InfrastructureError(
                f"no Kafka broker at {settings.kafka_bootstrap_servers} and no {script} to start one; "
                "start a broker or set RETRAINER_KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        # without the demo's own topic names: the broker comes up with the contract's topics, ready for
        # `retrainer serve` after the demo (the demo creates its own topics next, `create_topics`)
        env = {k: v for k, v in os.environ.items() if k not in ("RETRAINER_KAFKA_TOPIC", "RETRAINER_KAFKA_DLQ_TOPIC")}
        done = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise InfrastructureError(
                f"starting the local Kafka broker failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            ) from None
        return f"started the local Kafka broker ({script.relative_to(repo_root())})"


def create_topics(settings: Settings) -> None:
    """Creates the run's topics; idempotent. Right after the broker starts, kafka-python may retry a
    CreateTopics whose first attempt did succeed, and then hears that the topics already exist."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers.split(","))
    try:
        for topic in (NewTopic(settings.kafka_topic, 3, 1), NewTopic(settings.kafka_dlq_topic, 1, 1)):
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])
    finally:
        admin.close()


def delete_topics(settings: Settings) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers.split(","))
    try:
        admin.delete_topics([settings.kafka_topic, settings.kafka_dlq_topic])
    finally:
        admin.close()


def apply_environment(values: dict[str, str]) -> None:
    os.environ.update(values)


# --------------------------------------------------------------------------- the command


def run_demo(out: Console) -> None:
    """`retrainer demo` on embedded defaults under RETRAINER_HOME_DIR/demo, wiped at each start.
    `out` shows the progress, the table and the report path; the service's logs go to
    `logs/service.log` beside the subprocesses' logs. Raises RetrainerError when an act did not end
    as the story expects."""
    from retrainer import wiring
    from retrainer.logs import logs_to_file
    from retrainer.report import write_report
    from retrainer.service import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    started = time.perf_counter()
    home = fresh_home(Path(load_settings().home_dir).resolve() / "demo")
    apply_environment(demo_environment(home))
    settings = load_settings()
    with logs_to_file(home / "logs" / "service.log", settings.log_level, settings.log_format) as log_file:
        results = _tell_story(out, settings, home)
        report = write_report(wiring.sessions(settings), home / "report.html")
    unexpected = _print_results(out, results)
    out.print(f"decision records: retrainer runs show RUN_ID --json  (e.g. {results[-1].run_id})", highlight=False)
    out.print(
        f"demo finished in {time.perf_counter() - started:.1f} s; state under {home}, logs in {log_file.parent}",
        highlight=False,
    )
    out.print(f"report: {report}", highlight=False, soft_wrap=True)
    if unexpected:
        raise RetrainerError(f"the story did not go as expected for {', '.join(unexpected)}; see the report")


def _spinner(out: Console, text: str) -> Live:
    # redirect_stderr=False here and in the Progress below: rich would otherwise swap sys.stderr for a
    # proxy onto `out`, and a library that installs its stderr handler meanwhile would print there.
    return Live(Spinner("dots", text), console=out, transient=True, redirect_stderr=False)


def _tell_story(out: Console, settings: Settings, home: Path) -> list[ActResult]:
    from ml.demo_data import digits_versions
    from retrainer import wiring
    from retrainer.service import running_service

    with _spinner(out, "preparing: digits data, Kafka…"):
        data = digits_versions(home / "data")
        write_spec(settings.pipelines_dir, spec_for(ACTS[0]))
        out.print(ensure_kafka(settings), highlight=False)
        create_topics(settings)
    with ExitStack() as stack:
        stack.callback(delete_topics, settings)  # runs after the service has stopped
        with _spinner(out, "starting the service: Prefect server and runner, model server, API, consumer…"):
            running = stack.enter_context(running_service(settings))
        out.print(
            f"service up: API {running.api_url}, models {running.serving_url}, Prefect {running.prefect_api_url}",
            highlight=False,
        )
        columns = (bars.SpinnerColumn(), bars.TextColumn("{task.description}"), bars.TimeElapsedColumn())
        with bars.Progress(*columns, console=out, redirect_stderr=False) as bar:
            tasks = {act.key: bar.add_task(f"{act.key}: {act.story}", start=False) for act in ACTS}

            def progress(key: str, text: str) -> None:
                bar.start_task(tasks[key])
                act = next(a for a in ACTS if a.key == key)
                bar.update(tasks[key], description=f"[bold]{key}[/bold] {act.story}: {text}")

            results = run_story(
                settings,
                wiring.sessions(settings),
                serving_url=running.serving_url,
                data={key: path.resolve().as_uri() for key, path in data.items()},
                traffic_rows=data["v2"],
                acts=ACTS,
                progress=progress,
            )
            for task in tasks.values():
                bar.stop_task(task)
    return results


def _print_results(out: Console, results: list[ActResult]) -> list[str]:
    """Prints the table of acts; returns the keys of the acts that did not end as expected."""
    table = Table(title="Runs and decisions")
    for column in ("act", "expected", "status", "model", "seconds", "served (version: requests)", "reason"):
        table.add_column(column, overflow="fold")
    unexpected = []
    for result in results:
        ok = result.status == result.act.expect
        if not ok:
            unexpected.append(result.act.key)
        table.add_row(
            f"{result.act.key}: {result.act.story}",
            result.act.expect,
            f"[green]{result.status}[/green]" if ok else f"[red]{result.status}[/red]",
            f"v{result.model_version}" if result.model_version else "-",
            f"{result.seconds:.0f}",
            ", ".join(f"v{v}: {n}" for v, n in sorted(result.traffic.items())) or "-",
            result.reason,
        )
    out.print(table)
    return unexpected
