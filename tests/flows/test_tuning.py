"""The `tuning` stage through the real pipeline flow (real Prefect, the study in the run's SQLite
metadata DB): trials recorded with pruned ones among them, the best configuration trained and gated,
and a killed study resumed without repeating its finished trials."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from alembic.migration import MigrationContext
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain.spec import parse_spec
from flows.context import FlowContext
from flows.pipeline import run_pipeline
from flows.records import decision_record
from flows.tuning import OPTUNA_SCHEMA, open_study, search, study_storage
from ml.data import prepare
from ml.loaders import load_data
from ml.zoo import constructor_problems
from storage.db import create_db_engine, make_sessions, transaction
from tests.flows.conftest import event_run, spec

pytestmark = pytest.mark.integration

LEARNING_RATE = "hyperparameters.learning_rate"


def tuned(trials: int) -> dict[str, Any]:
    """A search whose range reaches a useless learning rate, so the median pruner has work to do."""
    document = spec(epochs=3, checkpoint_every_steps=None)
    document["tuning"] = {
        "search_space": {LEARNING_RATE: {"type": "loguniform", "low": 1e-6, "high": 3e-2}},
        "trials": trials,
        "metric": "val_accuracy",
        "sampler": "random",
        "pruner": "median",
        "pruner_startup_trials": 1,
    }
    return document


def record(sessions: sessionmaker[Session], run_id: str) -> dict[str, Any]:
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def trial_task_runs(flow_run_id: str) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    return sorted(run.name for run in runs if run.name.startswith("trial-"))


def test_a_tuned_run_records_its_trials_and_the_gate_judges_the_best_configuration(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    run_id = event_run(env, tuned(trials=4), "v1", digits["v1"])
    outcome = run_pipeline("digits-classifier", run_id)
    chain = record(env, run_id)
    tuning = chain["decision"]["tuning"]

    assert tuning["metric"] == "val_accuracy" and tuning["direction"] == "maximize"
    assert tuning["study"] == f"digits-classifier-{run_id}"
    assert [t["number"] for t in tuning["trials"]] == [0, 1, 2, 3]
    states = [t["state"] for t in tuning["trials"]]
    assert "PRUNED" in states and "COMPLETE" in states, tuning["trials"]
    for trial in tuning["trials"]:
        assert set(trial) >= {"number", "params", "value", "state", "duration_s"}
        assert 1e-6 <= trial["params"][LEARNING_RATE] <= 3e-2 and trial["duration_s"] > 0
        assert (trial["value"] is None) == (trial["state"] == "FAIL")
    for trial in (t for t in tuning["trials"] if t["state"] == "PRUNED"):
        assert trial["pruned_at_epoch"] < 3  # stopped before its last epoch, at its last reported value
    complete = [t for t in tuning["trials"] if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert tuning["best"] == {"number": best["number"], "params": best["params"], "value": best["value"]}

    # the candidate is the best configuration, retrained: its first epoch ran at the best learning rate
    history = chain["decision"]["training"]["history"]
    assert history[0]["learning_rate"] == pytest.approx(best["params"][LEARNING_RATE])
    assert history[-1]["val_accuracy"] == pytest.approx(best["value"])  # same seed, same data: the same model
    # and the gate judged it on the test rows
    assert {g["check"] for g in chain["decision"]["gate"]} >= {"min", "vs_champion"}
    assert outcome["status"] == chain["status"] == "promoted"
    assert trial_task_runs(chain["prefect_flow_run_id"]) == ["trial-0", "trial-1", "trial-2", "trial-3"]


def test_the_timeout_stops_the_search_and_the_best_trial_so_far_is_trained(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    document = tuned(trials=50)
    document["tuning"]["timeout_seconds"] = 0.01  # no trial starts after the first one
    run_id = event_run(env, document, "v1", digits["v1"])
    run_pipeline("digits-classifier", run_id)
    tuning = record(env, run_id)["decision"]["tuning"]
    assert tuning["stopped_by"] == "timeout" and len(tuning["trials"]) == 1
    assert tuning["best"]["number"] == 0


@flow(name="killed-tuning-attempt")
def killed_attempt(document: dict[str, Any], run_id: str, path: Path) -> dict[int, Any]:
    """Two trials of the run's study finish and a third is left running, as a killed flow leaves them;
    returns the finished trials' (state, value, completion time)."""
    pipeline = parse_spec(document, source="test", param_checker=constructor_problems)
    ctx = FlowContext.open()
    try:
        table = load_data(path, pipeline.data, task=pipeline.task)
        splits = pipeline.data.model_dump(include={"validation_fraction", "test_fraction", "seed"})
        data = prepare(table, input_shape=[64], output_classes=10, **splits)
        search(ctx, pipeline, data, run_id, trials=2)
        study = open_study(ctx, pipeline, run_id)
        study.ask().suggest_float(LEARNING_RATE, 1e-6, 3e-2, log=True)
        return {t.number: (t.state, t.value, t.datetime_complete) for t in study.trials if t.number < 2}
    finally:
        ctx.close()


def test_a_killed_run_resumes_its_study_without_repeating_finished_trials(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    document = tuned(trials=4)
    run_id = event_run(env, document, "v1", digits["v1"])

    # the killed attempt: two trials finished, a third was running when the process died
    before = killed_attempt(document, run_id, digits["v1"])

    run_pipeline("digits-classifier", run_id)
    chain = record(env, run_id)
    tuning = chain["decision"]["tuning"]
    trials = {t["number"]: t for t in tuning["trials"]}
    assert trials[2]["state"] == "FAIL" and trials[2]["interrupted"] is True
    counted = [t for t in tuning["trials"] if not t.get("interrupted")]
    assert len(counted) == 4  # the interrupted trial does not count; two new ones plus its rerun
    assert trials[3]["params"] == trials[2]["params"]  # the interrupted trial's parameters, run again
    # this attempt ran only the new trials: 0 and 1 are the killed attempt's, untouched
    assert trial_task_runs(chain["prefect_flow_run_id"]) == ["trial-3", "trial-4"]
    ctx = FlowContext.open()
    try:
        study = optuna.load_study(study_name=f"digits-classifier-{run_id}", storage=study_storage(ctx))
        after = {t.number: (t.state, t.value, t.datetime_complete) for t in study.trials if t.number < 2}
    finally:
        ctx.close()
    assert after == before
    assert chain["status"] == "promoted"


def test_on_postgresql_the_study_lives_in_its_own_schema(
    digits: dict[str, Path], postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefect_server: None
) -> None:
    monkeypatch.setenv("RETRAINER_DATABASE_URL", postgres_url)
    monkeypatch.setenv("RETRAINER_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("RETRAINER_HOME_DIR", str(tmp_path / "home"))
    migrations.upgrade(postgres_url)
    engine = create_db_engine(postgres_url)
    revision = current_revision(engine)
    document = tuned(trials=2)
    suffix = uuid.uuid4().hex[:8]  # the PostgreSQL database is shared by the suite (and by earlier runs)
    document["name"], document["dataset"] = f"digits-{suffix}", f"digits-{suffix}"
    run_id = event_run(make_sessions(engine), document, "v1", digits["v1"])

    outcome = run_pipeline(document["name"], run_id)

    assert outcome["status"] == "promoted"
    with transaction(make_sessions(engine)) as session:
        tuning = decision_record(session, run_id)["decision"]["tuning"]
    assert len(tuning["trials"]) == 2 and tuning["best"] is not None
    tables = inspect(engine)
    assert {"studies", "trials", "trial_values", "alembic_version"} <= set(tables.get_table_names(schema=OPTUNA_SCHEMA))
    assert "studies" not in tables.get_table_names()  # the project's schema holds only its own tables
    assert current_revision(engine) == revision  # Optuna's Alembic never touched ours
    engine.dispose()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
