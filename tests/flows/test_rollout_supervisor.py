"""The canary supervisor is a loop service: each pass is one scan that starts a controller for
each active rollout, and a controller that died with an error fails the next pass (so /healthz of
`rollout supervise` and `retrainer serve` names it) and is started again. Real Prefect (the flow
runs in the controller's thread) and a real metadata database."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session, sessionmaker

from flows.canary import RolloutSupervisor
from flows.loop import LoopHealth, LoopPassFailed, PassIncomplete, run_loop
from retrainer.service import free_port
from storage import repositories as repo
from storage.db import transaction
from tests.flows.conftest import spec

pytestmark = pytest.mark.integration


def test_a_controller_that_died_fails_the_next_pass_naming_its_pipeline_and_is_started_again(
    env: sessionmaker[Session],
) -> None:
    with transaction(env) as session:
        repo.upsert_pipeline(session, "digits-classifier", "digits", spec())
        candidate = repo.register_model_version(
            session, "digits-classifier", metrics={}, artifact_uri="file:///m/a.pt", sha256="a" * 64, size_bytes=1
        )
        # a policy the controller cannot read (stored by a version with other rules): it dies on it
        repo.start_rollout(
            session,
            "digits-classifier",
            candidate_version_id=candidate.id,
            champion_version_id=None,
            policy={"steps": "all at once"},
        )
    supervisor = RolloutSupervisor(env, f"http://127.0.0.1:{free_port()}")
    health = LoopHealth.for_interval(supervisor.name, 1.0)

    run_loop(supervisor, threading.Event(), once=True, health=health)
    health.probe()  # the scan itself went well: one controller started
    first = supervisor.controllers["digits-classifier"]
    first.join(120)
    assert not first.is_alive()

    with pytest.raises(PassIncomplete) as died:
        run_loop(supervisor, threading.Event(), once=True, health=health)
    assert "1 canary controller(s) failed" in died.value.message
    assert "controller of digits-classifier: ValidationError" in died.value.message
    with pytest.raises(LoopPassFailed) as unhealthy:
        health.probe()
    assert unhealthy.value.code == "infrastructure_unavailable"
    assert "canary-supervisor: last pass failed" in unhealthy.value.message
    assert "digits-classifier" in unhealthy.value.message
    again = supervisor.controllers["digits-classifier"]
    assert again is not first  # the rollout is still active: started again
    again.join(120)  # it dies on the same policy; left running, it would read the next test's database
    assert not again.is_alive()


def test_a_scan_without_active_rollouts_starts_nothing_and_passes(env: sessionmaker[Session]) -> None:
    with transaction(env) as session:
        repo.upsert_pipeline(session, "digits-classifier", "digits", spec())
    supervisor = RolloutSupervisor(env, None)
    health = LoopHealth.for_interval(supervisor.name, 1.0)
    run_loop(supervisor, threading.Event(), once=True, health=health)
    assert supervisor.controllers == {} and health.last_ok is not None
    health.probe()
