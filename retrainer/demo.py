"""`retrainer demo`: the whole story through the running service (`retrainer.service`), with the
digits data cut into versions. Every act is a real data-change event on Kafka; the consumer, the
trigger service, the Prefect runner, the gate, the model server and the canary controller do the
rest, and live traffic (with delayed labels) flows while a canary is out.

    v1  60 % of the rows                 → first model, promoted on the absolute gates
    v2  all rows, trained longer         → better than the champion → canary under traffic → promoted
    v3  30 % of the labels flipped        → rejected by the gate; the champion stays
    v4  v2 data, `ml.demo_models:LookupMLP` → as accurate (non-inferior), under the absolute latency
                                           ceiling, but a blocking per-request lookup makes its p99 against
                                           the champion's on the same live traffic too high: rolled back

`run_story` drives the acts against any running service (the end-to-end test uses it against
`retrainer serve` on PostgreSQL and MinIO); `demo_environment` sets up the embedded defaults.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import InfrastructureError
from domain.settings import Settings
from storage import repositories as repo
from storage.db import transaction

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
        "min_requests": 80,
        "max_error_rate": 0.01,
        # p99 of a few hundred requests on 2 shared cores is noisy: a margin and a second window before
        # rolling back keep a good candidate safe, and the slow one (7-10x) still fails at once
        "max_latency_p99_ratio": 2.5,
        "latency_p99_slack_ms": 10.0,  # the server answers in a few ms: 2.5x of 5 ms is jitter, not a slow model
        "failure_limit": 2,
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


def read_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a digits CSV (label column last or named `label`)."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [[float(v) for v in line] for line in reader]
    table = np.asarray(rows, dtype=np.float32)
    target = header.index("label")
    labels = table[:, target].astype(np.int64)
    return np.delete(table, target, axis=1), labels


def _run_for_event(session: Session, pipeline: str, event_id: str) -> e.Run | None:
    for run in repo.list_runs(session, pipeline, limit=20):
        if event_id in run.event_ids:
            return run
    return None


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
    rows, labels = read_rows(traffic_rows)
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
        traffic: Traffic | None = None
        run: e.Run | None = None
        try:
            while True:
                if time.monotonic() - started > act_timeout_s:
                    raise InfrastructureError(
                        f"demo act {act.key}: no final decision within {act_timeout_s:.0f} s "
                        f"(run {run.id if run else 'not created'}); see {settings.home_dir}/logs"
                    )
                with transaction(sessions) as session:
                    run = _run_for_event(session, document["name"], event_id)
                    rollout = repo.active_rollout(session, document["name"]) if run else None
                if run is None:
                    say(act.key, "waiting for the consumer and the trigger service")
                elif run.status is e.RunStatus.CANARY and rollout is not None:
                    if traffic is None:
                        traffic = Traffic(
                            serving_url, document["name"], rows, labels=labels, feedback_fraction=0.3, clients=3,
                            rate_per_second=100, rows_per_request=8, seed=len(results),
                        ).start()  # fmt: skip
                    steps = rollout.policy.get("steps", [])
                    step = min(rollout.current_step, len(steps) - 1)
                    say(
                        act.key,
                        f"canary step {step + 1}/{len(steps)} at {steps[step]:g} % · {traffic.stats.sent} requests",
                    )
                elif run.status.is_final:
                    break
                else:
                    say(act.key, f"run {run.id[:8]} {run.status.value}")
                time.sleep(0.5)
        finally:
            served = dict(traffic.stop().by_version) if traffic is not None else {}
        with transaction(sessions) as session:
            record = repo.decision_record(session, run.id)
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
        "RETRAINER_LOG_LEVEL": "WARNING",  # the progress view stays readable; the service's logs are in files
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
        done = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, check=False)
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
