"""Canary evidence from every replica: two real model servers (uvicorn, each with its follower and
reporter) report to one metadata database, and the controller judges a step on their sum.

Traffic is sent to each server directly (as a load balancer would spread it), in exact numbers, so
the stored analysis must show exactly that many requests, and each replica's share of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain import entities as e
from domain.canary import CanaryAction, CanaryStep
from domain.evidence import CanaryAttempt
from flows.canary import ServingClient, drive_rollout
from flows.context import FlowContext
from serving.app import create_serving_app
from serving.loader import MetadataFollower
from serving.registry import ModelRegistry
from serving.server import running_server
from storage import repositories as repo
from storage.db import transaction
from tests.serving.test_canary_rollout import PIPELINE, ROWS, Stack, metadata

REPORT_S = 0.2
MISSING_AFTER_S = 1.0
# the same model as both variants: every check passes once the sample is there; steps are long
# enough that a window cut by a silent replica never meets its deadline inside a test
POLICY: dict[str, Any] = {
    "steps": [50.0, 100.0], "interval_seconds": 1.0, "min_requests": 60, "max_latency_p99_ratio": 5.0,
    "step_deadline_factor": 30.0, "min_labels": 1000,
}  # fmt: skip


@dataclass
class Replica:
    follower: MetadataFollower
    url: str
    stack: ExitStack

    def send(self, n: int) -> None:
        body = {"inputs": [{"name": "input", "shape": [1, ROWS.shape[1]], "datatype": "FP32",
                            "data": ROWS[0].tolist()}]}  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            for _ in range(n):
                assert http.post(f"/v2/models/{PIPELINE}/infer", json=body).status_code == 200

    def kill(self) -> None:
        """Goes silent as a killed process would: no last report, no goodbye."""
        self.stack.close()


@dataclass
class Fleet:
    stack: Stack
    replicas: tuple[Replica, Replica]

    def open_step(self, rollout_id: int) -> None:
        """Opens the step now, has both servers apply it, and lets one report pass (the report that
        straddles the step's start is not counted, so traffic sent after this is counted whole)."""
        with transaction(self.stack.sessions) as session:
            rollout = repo.active_rollout(session, PIPELINE)
            assert rollout is not None and rollout.id == rollout_id
            repo.begin_rollout_step(session, rollout_id, traffic_percent=rollout.traffic_percent)
        for replica in self.replicas:
            ServingClient(replica.url).load(PIPELINE)
        time.sleep(2 * REPORT_S)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    env, sessions, store = metadata(tmp_path, monkeypatch)
    with ExitStack() as outer:
        replicas = []
        for _ in range(2):
            stack = outer.enter_context(ExitStack())
            follower = MetadataFollower(ModelRegistry(), sessions, store, report_seconds=REPORT_S)
            follower.start(0.5)
            stack.callback(follower.registry.close)
            stack.callback(follower.stop, final_report=False)
            app = create_serving_app(follower.registry, reload=follower.sync, reporter=follower.reporter)
            replicas.append(Replica(follower, stack.enter_context(running_server(app)), stack))
        yield Fleet(Stack(env, sessions, store, replicas[0].url, tmp_path), (replicas[0], replicas[1]))


def _rollout(fleet: Fleet) -> int:
    stack = fleet.stack
    champion = stack.register("mlp", {"hidden_sizes": [16]}, seed=1)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=1)
    with transaction(stack.sessions) as session:
        repo.move_champion(session, PIPELINE, champion, expected_from_version_id=None, actor="test", reason="first")
    rollout_id, _ = stack.start_rollout(candidate, champion, disagreement=0.0, **POLICY)
    return rollout_id


def _drive(fleet: Fleet, enough: Callable[[list[CanaryStep]], bool]) -> list[tuple[CanaryStep, CanaryAttempt]]:
    """Drives the rollout until `enough` of the decisions seen; every decision and attempt seen."""
    seen: list[tuple[CanaryStep, CanaryAttempt]] = []

    class Enough(Exception):
        pass

    def listen(_rollout: e.Rollout, decision: CanaryStep, attempt: CanaryAttempt) -> None:
        seen.append((decision, attempt))
        if enough([d for d, _ in seen]):
            raise Enough

    ctx = FlowContext.open()
    client = ServingClient(fleet.replicas[0].url)
    try:
        drive_rollout(ctx, PIPELINE, client, poll_seconds=0.1, on_decision=listen, missing_after_s=MISSING_AFTER_S)
    except Enough:
        pass
    finally:
        client.close()
        ctx.close()
    return seen


def _first_decided(fleet: Fleet) -> tuple[CanaryStep, CanaryAttempt]:
    return _drive(fleet, lambda seen: seen[-1].action is not CanaryAction.WAIT)[-1]


def test_a_step_is_judged_on_the_sum_of_both_replicas_with_each_share_stored(fleet: Fleet) -> None:
    rollout_id = _rollout(fleet)
    fleet.open_step(rollout_id)
    a, b = fleet.replicas
    senders = [threading.Thread(target=a.send, args=(150,)), threading.Thread(target=b.send, args=(90,))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    time.sleep(3 * REPORT_S)

    decision, attempt = _first_decided(fleet)

    assert decision.action is CanaryAction.ADVANCE, decision.reason
    assert attempt.canary.requests + attempt.champion.requests == 240
    shares = {s.replica: s.canary_requests + s.champion_requests for s in attempt.replicas}
    assert shares == {a.follower.reporter.replica_id: 150, b.follower.reporter.replica_id: 90}
    assert attempt.canary.latency_histogram is not None and attempt.canary.latency_histogram.total == (
        attempt.canary.requests
    )
    assert attempt.missing_replicas == ()
    with transaction(fleet.stack.sessions) as session:
        rollout = repo.latest_rollout(session, PIPELINE)
        served = {r.replica: r.serving[PIPELINE] for r in repo.serving_replicas(session)}
    assert rollout is not None
    stored = rollout.steps[0].analysis.decisive
    assert stored is not None and stored.replicas == attempt.replicas
    assert stored.canary.requests == attempt.canary.requests
    assert {(s.champion_version, s.canary_version) for s in served.values()} == {("1", "2")}


def test_a_replica_that_goes_silent_is_named_missing_and_the_step_waits_for_the_sample_after_it(
    fleet: Fleet,
) -> None:
    rollout_id = _rollout(fleet)
    fleet.open_step(rollout_id)
    a, b = fleet.replicas
    a.send(120)
    b.send(120)  # together far above the sample: the step would pass on them
    time.sleep(3 * REPORT_S)
    b.kill()
    time.sleep(MISSING_AFTER_S + 2 * REPORT_S)

    seen = _drive(fleet, lambda seen: len(seen) >= 3 or seen[-1].action is not CanaryAction.WAIT)
    assert [d.action for d, _ in seen] == [CanaryAction.WAIT] * 3, seen[-1][0].reason
    decision, attempt = seen[-1]
    assert attempt.missing_replicas == (b.follower.reporter.replica_id,)
    assert attempt.canary.requests + attempt.champion.requests == 0  # the window restarts after b's silence

    a.send(200)
    time.sleep(3 * REPORT_S)
    decision, attempt = _first_decided(fleet)

    assert decision.action is CanaryAction.ADVANCE, decision.reason
    assert attempt.canary.requests + attempt.champion.requests == 200
    assert attempt.missing_replicas == (b.follower.reporter.replica_id,)
    assert [s.replica for s in attempt.replicas] == [a.follower.reporter.replica_id]
    with transaction(fleet.stack.sessions) as session:
        rollout = repo.latest_rollout(session, PIPELINE)
    assert rollout is not None and rollout.steps[0].verdict is e.Verdict.PASS
    decisive = rollout.steps[0].analysis.decisive
    assert decisive is not None and decisive.missing_replicas == (b.follower.reporter.replica_id,)
