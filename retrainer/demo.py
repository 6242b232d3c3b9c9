"""`retrainer demo`: the story so far on embedded defaults (SQLite, local artifacts, Prefect's
local server), with the digits data cut into versions.

    v1 (60 % of the rows)        → the first model, promoted on the absolute gates
    v2 (all rows, trained longer) → compared with the champion on the same rows, promoted if better
    v3 (30 % labels flipped)      → rejected by the gate; the champion stays

Data-change events are written to the inbox directly here (the Kafka path is `retrainer consume`
and `retrainer triggers`); the canary rollout (issue 6), `retrainer serve` with the local Kafka
broker and the HTML report (issue 7) come later.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from domain import entities as e
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
        "max": {"latency_p99_ms": 50.0},
        "vs_champion": {"accuracy": {"min_delta": 0.0, "confidence": 0.95}},
    },
}
STORY = [
    ("v1", 3, "first model on 60 % of the data"),
    ("v2", 20, "all the data, trained longer"),
    ("v3", 20, "30 % of the labels flipped"),
]


@dataclass(frozen=True)
class DemoStep:
    version: str
    story: str
    run_id: str
    status: str
    model_version: int | None
    accuracy: float | None
    champion_accuracy: float | None
    reason: str


def run_story(settings: Settings, sessions: Any, on_step: Any = None) -> list[DemoStep]:
    from flows.pipeline import run_pipeline
    from ml.demo_data import digits_versions

    home = Path(settings.home_dir).resolve() / "demo"
    files = digits_versions(home / "data")
    (home / "pipelines").mkdir(parents=True, exist_ok=True)
    steps: list[DemoStep] = []
    for version, epochs, story in STORY:
        document = copy.deepcopy(DEMO_SPEC)
        document["hyperparameters"]["epochs"] = epochs
        (home / "pipelines" / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        with transaction(sessions) as session:
            repo.upsert_pipeline(session, PIPELINE, "digits", document)
            event_id = f"demo-{version}-{uuid.uuid4().hex[:8]}"
            repo.add_to_inbox(
                session,
                event_id=event_id,
                source="//retrainer/demo",
                type="retrainer.data.changed",
                dataset="digits",
                payload={"data": {"dataset": "digits", "version": version, "uri": files[version].resolve().as_uri()}},
            )
            run, _ = repo.create_run(
                session, PIPELINE, e.TriggerKind.EVENT, event_ids=[event_id], reason=f"demo: {story}"
            )
        if on_step is not None:
            on_step(f"{version}: {story}")
        run_pipeline(PIPELINE, run.id)
        with transaction(sessions) as session:
            record = repo.decision_record(session, run.id)
        decision = record["decision"]
        champion = (decision.get("champion") or {}).get("report") or {}
        steps.append(
            DemoStep(
                version=version,
                story=story,
                run_id=run.id,
                status=record["status"],
                model_version=record["model_version"],
                accuracy=(decision.get("candidate") or {}).get("metrics", {}).get("accuracy"),
                champion_accuracy=champion.get("metrics", {}).get("accuracy"),
                reason=(decision.get("outcome") or {}).get("reason", record.get("error") or ""),
            )
        )
    return steps
