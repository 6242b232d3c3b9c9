"""One trigger pass on a real metadata database (SQLite and PostgreSQL): runs are created for every
pipeline of a dataset whatever Prefect does, one failing dataset or run never blocks the others,
a deployment that does not exist fails its run, and the pass still ends failed when anything stays
behind. The submitter is a fake: it is the Prefect boundary (tests/flows/test_trigger_submission.py
covers the real one)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from flows.loop import PassIncomplete
from flows.trigger_service import TriggerService
from flows.triggers import DeploymentNotFoundError, RunSubmitter, process_pending_events, submit_unsubmitted_runs
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.storage.conftest import wipe

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
NOW_TRIGGERS = {"events": {"debounce_seconds": 0, "max_wait_seconds": 600}}


@pytest.fixture(scope="module")
def _own_postgresql(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this module's own: a pass submits every queued run it finds, so it must not
    see (or touch) the runs other tests leave in the shared test database."""
    base = make_url(request.getfixturevalue("postgres_url"))
    name = f"retrainer_triggers_{uuid.uuid4().hex[:8]}"
    admin = create_db_engine(base.render_as_string(hide_password=False))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    migrations.upgrade(url)
    try:
        yield url
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'retrainer.db'}"
        migrations.upgrade(url)
    else:
        url = request.getfixturevalue("_own_postgresql")
    engine = create_db_engine(url)
    wipe(engine)
    yield make_sessions(engine)
    engine.dispose()


def pipeline(sessions: sessionmaker[Session], name: str, dataset: str, triggers: dict[str, Any] | None = None) -> None:
    spec = {"name": name, "dataset": dataset, "model": {"architecture": "mlp"}, "triggers": triggers or NOW_TRIGGERS}
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, name, dataset, spec)


def event(sessions: sessionmaker[Session], dataset: str) -> str:
    event_id = f"evt-{uuid.uuid4()}"
    with transaction(sessions) as session:
        repo.add_to_inbox(
            session,
            event_id=event_id,
            source="//tests",
            type="retrainer.data.changed",
            dataset=dataset,
            payload={"data": {"dataset": dataset, "uri": f"s3://d/{dataset}.csv"}},
        )
    return event_id


def runs(sessions: sessionmaker[Session], name: str) -> list[e.Run]:
    with transaction(sessions) as session:
        return repo.list_runs(session, name)


class Submitter:
    """Records what it was asked to submit; `refuse` maps a pipeline to the error it raises."""

    def __init__(self, refuse: dict[str, Callable[[e.Run], BaseException]] | None = None) -> None:
        self.refuse = refuse or {}
        self.calls: list[str] = []

    def __call__(self, run: e.Run) -> str | None:
        self.calls.append(run.pipeline)
        if run.pipeline in self.refuse:
            raise self.refuse[run.pipeline](run)
        return f"flow-run-of-{run.id}"


def prefect_down(_run: e.Run) -> BaseException:
    return ConnectionError("Prefect API unavailable")


def no_deployment(run: e.Run) -> BaseException:
    return DeploymentNotFoundError(f"Prefect has no deployment 'retrainer-pipeline/{run.pipeline}'")


def test_a_prefect_outage_leaves_every_pipeline_of_the_dataset_with_a_run(sessions: sessionmaker[Session]) -> None:
    pipeline(sessions, "digits-a", "digits")
    pipeline(sessions, "digits-b", "digits")
    linked = event(sessions, "digits")
    down: RunSubmitter = Submitter({"digits-a": prefect_down, "digits-b": prefect_down})

    with pytest.raises(PassIncomplete) as outage:
        TriggerService(sessions, down).run_once()
    assert outage.value.code == "infrastructure_unavailable"
    assert "2 trigger items failed" in outage.value.message and "ConnectionError" in outage.value.message
    for name in ("digits-a", "digits-b"):
        (run,) = runs(sessions, name)
        assert run.status is e.RunStatus.QUEUED and run.prefect_flow_run_id is None and run.event_ids == (linked,)

    up = Submitter()
    done = TriggerService(sessions, up).run_once()
    assert done.created == () and len(done.submitted) == 2 and sorted(up.calls) == ["digits-a", "digits-b"]
    for name in ("digits-a", "digits-b"):
        (run,) = runs(sessions, name)
        assert run.prefect_flow_run_id == f"flow-run-of-{run.id}"
    assert TriggerService(sessions, up).run_once().submitted == ()  # submitted once, never again


def test_a_missing_deployment_fails_its_run_and_the_later_runs_are_still_submitted(
    sessions: sessionmaker[Session],
) -> None:
    pipeline(sessions, "gone", "old-data")
    pipeline(sessions, "digits", "digits")
    event(sessions, "old-data")  # the oldest queued run belongs to the pipeline without a deployment
    TriggerService(sessions, None).run_once()
    event(sessions, "digits")
    submit = Submitter({"gone": no_deployment})

    result = TriggerService(sessions, submit).run_once()  # no error: nothing is left to retry

    (failed,) = runs(sessions, "gone")
    assert failed.status is e.RunStatus.FAILED and failed.prefect_flow_run_id is None
    assert failed.error is not None and "retrainer-pipeline/gone" in failed.error
    (submitted,) = runs(sessions, "digits")
    assert result.submitted == (submitted.id,) and submitted.prefect_flow_run_id == f"flow-run-of-{submitted.id}"
    # each tried once: the run the pass created first, then the older queued one
    assert submit_unsubmitted_runs(sessions, submit) == [] and submit.calls == ["digits", "gone"]


def test_a_transient_submission_error_keeps_that_run_queued_and_fails_the_pass_after_the_others(
    sessions: sessionmaker[Session],
) -> None:
    pipeline(sessions, "flaky", "a")
    pipeline(sessions, "steady", "b")
    event(sessions, "a")
    event(sessions, "b")
    TriggerService(sessions, None).run_once()

    with pytest.raises(PassIncomplete) as partial:
        submit_unsubmitted_runs(sessions, Submitter({"flaky": prefect_down}))

    (flaky,) = runs(sessions, "flaky")
    (steady,) = runs(sessions, "steady")
    assert partial.value.code == "infrastructure_unavailable" and partial.value.retryable
    assert f"1 of 2 run submissions failed, retried on the next pass (run {flaky.id} (flaky)" in partial.value.message
    assert flaky.status is e.RunStatus.QUEUED and flaky.prefect_flow_run_id is None  # the claim was released
    assert steady.prefect_flow_run_id == f"flow-run-of-{steady.id}"
    assert submit_unsubmitted_runs(sessions, Submitter()) == [flaky.id]


def test_one_dataset_that_fails_leaves_its_events_pending_and_the_others_get_their_runs(
    sessions: sessionmaker[Session],
) -> None:
    # a spec stored by an older version, which today's trigger policy refuses
    pipeline(sessions, "broken", "bad-data", {"events": {"debounce_seconds": "soon"}})
    pipeline(sessions, "digits", "digits")
    stuck = event(sessions, "bad-data")
    event(sessions, "digits")

    with pytest.raises(PassIncomplete) as partial:
        process_pending_events(sessions)
    assert "1 of 2 datasets failed" in partial.value.message and "dataset bad-data: ValidationError" in (
        partial.value.message
    )
    assert [run.pipeline for run in runs(sessions, "digits")] == ["digits"]
    assert runs(sessions, "broken") == []
    with transaction(sessions) as session:
        assert repo.get_event(session, stuck).status is e.EventStatus.RECEIVED

    # the trigger service still submits the run of the dataset that worked, then reports the other
    submit = Submitter()
    with pytest.raises(PassIncomplete, match="dataset bad-data"):
        TriggerService(sessions, submit).run_once()
    assert submit.calls == ["digits"]
