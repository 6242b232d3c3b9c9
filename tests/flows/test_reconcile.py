"""The run reconciler against the session's real Prefect: a crashed flow run is submitted again and
resumes from its checkpoint; one with no attempts left, or one that failed, ends the run `failed`; a
RUNNING flow run whose process fell silent (no heartbeat) is crashed and settled the same way; one
left PENDING by a worker that died while starting it, or SCHEDULED past its time, for longer than the
start bound is cancelled and settled the same way; Prefect not answering changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed, Failed, Pending, Running
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from domain import entities as e
from domain.errors import TransientInfraError
from domain.spec import parse_spec
from flows.loop import PassIncomplete
from flows.pipeline import run_pipeline
from flows.reconcile import (
    HEARTBEAT,
    FlowRunState,
    Liveness,
    ReconcilePass,
    Reconciler,
    StartBound,
    prefect_flow_run_states,
    prefect_heard_from,
    prefect_mark_crashed,
    prefect_mark_never_started,
)
from flows.registry import deployments, sync_pipelines
from flows.triggers import TriggerRequest, attempts_of, prefect_submitter, request_run, submit_unsubmitted_runs
from ml.zoo import MLP
from retrainer.service import free_port
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import SqlRun
from tests.flows.conftest import event_run, spec
from tests.flows.test_trigger_service import _own_postgresql  # noqa: F401
from tests.storage.conftest import wipe

pytestmark = pytest.mark.integration


class ExitOnce(nn.Module):
    """Ends its process (SystemExit, as a worker's child does when the worker dies) once, mid-training."""

    def __init__(self, input_shape: Sequence[int], output_classes: int, marker: str) -> None:
        super().__init__()
        self.net = MLP(input_shape, output_classes, hidden_sizes=(64,), dropout=0.0)
        self.marker, self.calls = Path(marker), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 30 and not self.marker.exists():
                self.marker.touch()
                raise SystemExit(1)
        return self.net(x)  # type: ignore[no-any-return]


def get(sessions: sessionmaker[Session], run_id: str) -> e.Run:
    with transaction(sessions) as session:
        return repo.get_run(session, run_id)


def flow_run(flow_run_id: str | None) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)  # type: ignore[arg-type]


def crash(flow_run_id: str | None, state: Any = None) -> None:
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, state or Crashed(message="worker died"), force=True)  # type: ignore[arg-type]


def test_a_crashed_flow_run_is_submitted_again_and_resumes_from_its_checkpoint(
    env: sessionmaker[Session], digits: dict[str, Path], tmp_path: Path
) -> None:
    document = spec()
    marker = {"marker": f"{tmp_path}/exited"}
    document["model"].update(architecture="tests.flows.test_reconcile:ExitOnce", params=marker)
    run_id = event_run(env, document, "v2", digits["v2"])
    with pytest.raises(SystemExit):
        run_pipeline("digits-classifier", run_id)
    crashed = get(env, run_id)
    # the flow's own handler leaves a crash to the reconciler: the run is still in progress
    assert crashed.status is e.RunStatus.RUNNING and crashed.error is None
    assert flow_run(crashed.prefect_flow_run_id).state.type.value == "CRASHED"

    def in_process(run: e.Run) -> str | None:
        """The new flow run as a worker would start it, here in this process."""
        run_pipeline(run.pipeline, run.id)
        return get(env, run.id).prefect_flow_run_id

    done = Reconciler(env, in_process, prefect_flow_run_states, max_resubmits=1, grace_s=0).run_once()
    assert done.resubmitted == (run_id,) and done.failed == ()
    run = get(env, run_id)
    assert run.status is e.RunStatus.PROMOTED, run.error
    assert run.prefect_flow_run_id != crashed.prefect_flow_run_id
    assert run.evidence is not None
    assert run.evidence["training"]["resumed_from_step"] == 25  # the last checkpoint before the exit at step 30
    [attempt] = run.evidence["resubmits"]
    assert attempt["attempt"] == 1 and attempt["crashed_flow_run"] == crashed.prefect_flow_run_id


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, env: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """The metadata database of the reconciler tests: SQLite, and PostgreSQL (which locks rows)."""
    if request.param == "sqlite":
        yield env
        return
    engine = create_db_engine(request.getfixturevalue("_own_postgresql"))
    wipe(engine)
    yield make_sessions(engine)
    engine.dispose()


def deployed_runs(sessions: sessionmaker[Session], tmp_path: Path, count: int) -> list[e.Run]:
    """`count` manual runs of a deployed pipeline, each submitted (its flow run waits: no worker
    serves the deployment) and marked running, as a worker would have left them."""
    pipelines = [parse_spec(spec(), source="the reconciler tests")]
    with transaction(sessions) as session:
        sync_pipelines(session, pipelines)
    [deployment] = deployments(pipelines)
    deployment.apply()
    runs = []
    for i in range(count):
        request = TriggerRequest(e.TriggerKind.MANUAL, idempotency_key=f"{tmp_path.name}-{i}", request_sha256="c" * 64)
        submitted = request_run(sessions, "digits-classifier", request, prefect_submitter()).run
        with transaction(sessions) as session:
            runs.append(repo.update_run(session, submitted.id, status=e.RunStatus.RUNNING))
    return runs


def test_crashed_runs_are_resubmitted_while_attempts_last_and_other_ends_fail_the_run(
    database: sessionmaker[Session], tmp_path: Path
) -> None:
    env = database
    crashing, failing, waiting = deployed_runs(env, tmp_path, 3)
    crash(crashing.prefect_flow_run_id)
    crash(failing.prefect_flow_run_id, Failed(message="flow code raised"))
    reconciler = Reconciler(env, prefect_submitter(), prefect_flow_run_states, max_resubmits=1, grace_s=0)
    assert Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=3600).run_once().resubmitted == ()

    done = reconciler.run_once()
    assert done.resubmitted == (crashing.id,) and done.failed == (failing.id,)
    again = get(env, crashing.id)
    assert again.status is e.RunStatus.QUEUED and again.prefect_flow_run_id not in (None, crashing.prefect_flow_run_id)
    new = flow_run(again.prefect_flow_run_id)
    assert new.idempotency_key == f"{crashing.id}:1"  # a new key per attempt: a new flow run, not the crashed one
    assert new.parameters == {"pipeline": "digits-classifier", "run_id": crashing.id}
    assert prefect_submitter()(again) == again.prefect_flow_run_id  # the same attempt again: the same flow run
    failed = get(env, failing.id)
    assert failed.status is e.RunStatus.FAILED and "ended FAILED" in str(failed.error), failed.error
    assert get(env, waiting.id) == waiting  # its flow run is still scheduled: nothing to settle

    crash(again.prefect_flow_run_id)  # the second flow run crashes too: no attempt left
    assert reconciler.run_once().failed == (crashing.id,)
    last = get(env, crashing.id)
    assert last.status is e.RunStatus.FAILED
    assert f"flow run {again.prefect_flow_run_id} crashed" in str(last.error), last.error
    assert "submitted 2 time(s) (RETRAINER_RUN_MAX_RESUBMITS=1)" in str(last.error), last.error
    assert last.evidence is not None and len(last.evidence["resubmits"]) == 1


def test_prefect_not_answering_changes_nothing_and_the_next_pass_settles_the_run(
    database: sessionmaker[Session], tmp_path: Path
) -> None:
    env = database
    [run] = deployed_runs(env, tmp_path, 1)
    crash(run.prefect_flow_run_id)
    reconciler = Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=0)
    nowhere = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings({PREFECT_API_URL: nowhere}), pytest.raises(PassIncomplete) as down:
        reconciler.run_once()
    assert down.value.code == TransientInfraError.code
    assert get(env, run.id) == run  # no answer is no evidence: neither resubmitted nor failed
    assert reconciler.run_once().resubmitted == (run.id,)


def test_a_resubmission_whose_answer_is_lost_waits_queued_and_the_submission_pass_gets_its_flow_run(
    database: sessionmaker[Session], tmp_path: Path
) -> None:
    """Prefect made the new flow run but the answer was lost: the run is not put back on the crashed flow run
    (the new one, starting, would find the run taken and end cancelled) but waits queued with the attempt,
    and the trigger service's submission pass, with the same idempotency key, records the flow run Prefect made."""
    env = database
    [run] = deployed_runs(env, tmp_path, 1)
    crash(run.prefect_flow_run_id)
    real = prefect_submitter()
    made: list[str | None] = []

    def answer_lost(claimed: e.Run) -> str | None:
        made.append(real(claimed))
        raise httpx.ReadError("connection reset while reading the answer")

    with pytest.raises(PassIncomplete):
        Reconciler(env, answer_lost, prefect_flow_run_states, max_resubmits=1, grace_s=0).run_once()
    waiting = get(env, run.id)
    assert waiting.status is e.RunStatus.QUEUED and waiting.prefect_flow_run_id is None
    assert attempts_of(waiting) == 1 and made[0]
    assert submit_unsubmitted_runs(env, real) == [run.id]
    assert get(env, run.id).prefect_flow_run_id == made[0]


def running_flow_runs(sessions: sessionmaker[Session], tmp_path: Path, count: int) -> list[e.Run]:
    """`deployed_runs` whose flow runs Prefect holds RUNNING, as a worker that started them would."""
    runs = deployed_runs(sessions, tmp_path, count)
    for run in runs:
        crash(run.prefect_flow_run_id, Running())
    return runs


def beat(flow_run_id: str | None, at: datetime) -> None:
    """A heartbeat of the flow run at `at`, as its process sends it; returns once Prefect shows it."""
    emit_event(HEARTBEAT, resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"}, occurred=at)
    EventsWorker.drain_all(timeout=10)
    deadline = time.monotonic() + 30  # the server stores events in batches (every 5 s by default)
    while str(flow_run_id) not in prefect_heard_from([str(flow_run_id)], at, at):
        assert time.monotonic() < deadline, "Prefect never showed the heartbeat"
        time.sleep(0.5)


LIVENESS = Liveness(prefect_heard_from, prefect_mark_crashed, beat_s=30, misses=3)  # silent for 90 s: dead


def test_a_silent_running_flow_run_is_crashed_then_resubmitted_or_failed_and_a_beating_one_is_left(
    env: sessionmaker[Session], tmp_path: Path
) -> None:
    silent, spent, beating = running_flow_runs(env, tmp_path, 3)
    with transaction(env) as session:  # `spent` was submitted again once already: no attempt left
        session.get_one(SqlRun, spent.id).evidence = {"resubmits": [{"attempt": 1}]}
    spent = get(env, spent.id)
    later = datetime.now(UTC) + timedelta(seconds=120)  # every flow run entered RUNNING > 90 s before
    beat(beating.prefect_flow_run_id, later - timedelta(seconds=20))
    reconciler = Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=0, liveness=LIVENESS)

    assert reconciler.run_once() == ReconcilePass()  # now: every flow run just started, none is silent
    done = reconciler.run_once(later)
    assert done.resubmitted == (silent.id,) and done.failed == (spent.id,)
    dead = flow_run(silent.prefect_flow_run_id).state
    assert dead.type.value == "CRASHED" and "sent no heartbeat for 90 s" in str(dead.message), dead
    again = get(env, silent.id)
    assert again.status is e.RunStatus.QUEUED and again.prefect_flow_run_id != silent.prefect_flow_run_id
    assert again.evidence is not None
    [attempt] = again.evidence["resubmits"]
    assert (
        attempt["crashed_flow_run"] == silent.prefect_flow_run_id
        and "RETRAINER_RUN_HEARTBEAT_MISSES=3" in (attempt["message"])
    )
    failed = get(env, spent.id)
    assert failed.status is e.RunStatus.FAILED, failed
    assert f"flow run {spent.prefect_flow_run_id} crashed" in str(failed.error), failed.error
    assert "sent no heartbeat for 90 s" in str(failed.error), failed.error
    assert get(env, beating.id) == beating  # it beat 20 s ago: alive
    assert flow_run(beating.prefect_flow_run_id).state.type.value == "RUNNING"


def test_heartbeats_not_answering_change_nothing_and_the_next_pass_settles_the_run(
    env: sessionmaker[Session], tmp_path: Path
) -> None:
    [run] = running_flow_runs(env, tmp_path, 1)
    nowhere = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there

    def heard_from_nowhere(ids: Sequence[str], since: datetime, until: datetime) -> set[str]:
        with temporary_settings({PREFECT_API_URL: nowhere}):
            return prefect_heard_from(ids, since, until)

    down = Liveness(heard_from_nowhere, prefect_mark_crashed, beat_s=30, misses=3)
    later = datetime.now(UTC) + timedelta(seconds=120)
    with pytest.raises(PassIncomplete) as failed:
        Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=0, liveness=down).run_once(later)
    assert failed.value.code == TransientInfraError.code
    assert get(env, run.id) == run  # no answer is no evidence: the flow run is not crashed
    assert flow_run(run.prefect_flow_run_id).state.type.value == "RUNNING"
    reconciler = Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=0, liveness=LIVENESS)
    assert reconciler.run_once(later).resubmitted == (run.id,)


def set_state(flow_run_id: str | None, state: Any, *, force: bool = False) -> str:
    """Proposes (or forces) the flow run's state as a worker or its process would; Prefect's answer."""
    with get_client(sync_client=True) as client:
        return str(client.set_flow_run_state(flow_run_id, state, force=force).status.value)  # type: ignore[arg-type]


START = StartBound(prefect_mark_never_started, timeout_s=300)  # not started within 5 min: lost


def test_a_flow_run_that_never_started_is_cancelled_then_resubmitted_or_failed_and_one_within_the_bound_is_left(
    database: sessionmaker[Session], tmp_path: Path
) -> None:
    env = database
    dead_worker, spent, no_worker, started = deployed_runs(env, tmp_path, 4)
    for run in (dead_worker, spent, started):  # a worker took them: Prefect's real PENDING proposal
        assert set_state(run.prefect_flow_run_id, Pending()) == "ACCEPT"
    assert set_state(started.prefect_flow_run_id, Running()) == "ACCEPT"  # its process started it
    with transaction(env) as session:  # `spent` was submitted again once already: no attempt left
        session.get_one(SqlRun, spent.id).evidence = {"resubmits": [{"attempt": 1}]}
    spent = get(env, spent.id)
    reconciler = Reconciler(env, prefect_submitter(), prefect_flow_run_states, grace_s=0, start_bound=START)

    # within the bound a flow run waiting for a worker, or for its process to start, is left alone
    assert reconciler.run_once() == ReconcilePass()
    assert reconciler.run_once(datetime.now(UTC) + timedelta(seconds=240)) == ReconcilePass()
    done = reconciler.run_once(datetime.now(UTC) + timedelta(seconds=360))
    assert sorted(done.resubmitted) == sorted([dead_worker.id, no_worker.id]) and done.failed == (spent.id,)

    cancelled = flow_run(dead_worker.prefect_flow_run_id).state
    assert (cancelled.type.value, cancelled.name) == ("CANCELLED", "NeverStarted"), cancelled
    assert "stayed PENDING for more than 300 s (RETRAINER_RUN_START_TIMEOUT_S)" in str(cancelled.message)
    # the worker, had it lived, could not start it now: Prefect refuses PENDING after CANCELLED
    assert set_state(dead_worker.prefect_flow_run_id, Pending()) != "ACCEPT"
    late = flow_run(no_worker.prefect_flow_run_id).state
    assert late.type.value == "CANCELLED" and "stayed SCHEDULED past its time" in str(late.message), late
    for run in (dead_worker, no_worker):
        again = get(env, run.id)
        assert again.status is e.RunStatus.QUEUED and again.prefect_flow_run_id != run.prefect_flow_run_id
        assert flow_run(again.prefect_flow_run_id).idempotency_key == f"{run.id}:1"
        assert again.evidence is not None
        [attempt] = again.evidence["resubmits"]
        assert attempt["crashed_flow_run"] == run.prefect_flow_run_id
        assert "RETRAINER_RUN_START_TIMEOUT_S" in attempt["message"], attempt
    failed = get(env, spent.id)
    assert failed.status is e.RunStatus.FAILED, failed
    assert f"flow run {spent.prefect_flow_run_id} never started: it stayed PENDING" in str(failed.error)
    assert "submitted 2 time(s) (RETRAINER_RUN_MAX_RESUBMITS=1)" in str(failed.error), failed.error
    assert get(env, started.id) == started  # RUNNING: the heartbeat's business, not the start bound's
    assert flow_run(started.prefect_flow_run_id).state.type.value == "RUNNING"

    # the resubmitted flow runs are new: SCHEDULED now, so within the bound again
    assert reconciler.run_once(datetime.now(UTC) + timedelta(seconds=240)) == ReconcilePass()
    # a resubmitted one that never starts either: no attempt left, the run fails naming it
    assert sorted(reconciler.run_once(datetime.now(UTC) + timedelta(seconds=360)).failed) == sorted(
        [dead_worker.id, no_worker.id]
    )
    last = get(env, no_worker.id)
    assert last.status is e.RunStatus.FAILED and "stayed SCHEDULED past its time" in str(last.error), last.error


def test_a_flow_run_that_starts_between_the_read_and_the_cancel_is_left_running(
    env: sessionmaker[Session], tmp_path: Path
) -> None:
    [run] = deployed_runs(env, tmp_path, 1)
    assert set_state(run.prefect_flow_run_id, Pending()) == "ACCEPT"
    reads: list[Sequence[str]] = []

    def states_then_start(ids: Sequence[str]) -> dict[str, FlowRunState]:
        """Prefect's states; right after the pass's first read the worker's process starts the flow run."""
        found = prefect_flow_run_states(ids)
        reads.append(ids)
        if len(reads) == 1:
            assert set_state(run.prefect_flow_run_id, Running()) == "ACCEPT"
        return found

    later = datetime.now(UTC) + timedelta(seconds=360)
    assert (
        Reconciler(env, prefect_submitter(), states_then_start, grace_s=0, start_bound=START).run_once(later)
        == ReconcilePass()
    )
    assert len(reads) == 2  # the pass read the overdue flow run again before cancelling it
    assert flow_run(run.prefect_flow_run_id).state.type.value == "RUNNING"
    assert get(env, run.id) == run


def test_a_flow_run_a_slow_worker_starts_after_the_run_was_given_to_another_does_nothing(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    """Prefect lets a cancelled flow run start (RUNNING after CANCELLED); the flow itself then finds its run
    owned by the resubmitted flow run, or ended, and ends CANCELLED without touching the run."""
    run_id = event_run(env, spec(epochs=1), "v1", digits["v1"])
    owner = "0a9c1c6e-9f43-4a3e-9d34-1d2d5c1f0b11"  # the flow run the reconciler submitted instead
    with transaction(env) as session:
        repo.update_run(session, run_id, prefect_flow_run_id=owner)
    state = run_pipeline("digits-classifier", run_id, return_state=True)
    assert state.type.value == "CANCELLED" and owner in (state.message or "")
    untouched = get(env, run_id)
    assert untouched.status is e.RunStatus.QUEUED and untouched.prefect_flow_run_id == owner

    with transaction(env) as session:  # the reconciler ran out of attempts and ended the run
        repo.update_run(session, run_id, status=e.RunStatus.FAILED, error="flow run never started")
    state = run_pipeline("digits-classifier", run_id, return_state=True)
    assert state.type.value == "CANCELLED" and "already ended failed" in (state.message or "")
    ended = get(env, run_id)
    assert ended.status is e.RunStatus.FAILED and ended.error == "flow run never started"
