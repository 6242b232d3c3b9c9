"""Canary rollouts end to end against the real model server under real HTTP load.

A uvicorn model server follows a metadata database (SQLite here; the same repositories run on
PostgreSQL in tests/storage); a bounded load generator sends live traffic with delayed labels; the
controller (`flows.canary`) walks the rollout stored in SQL. Steps are short (about a second) so
each scenario takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.evidence import CheckOutcome
from domain.settings import load_settings
from flows.canary import ServingClient, drive_rollout
from flows.context import FlowContext
from ml.package import MANIFEST_FORMAT, save_package
from ml.zoo import build_model
from retrainer.traffic import Traffic
from serving.app import create_serving_app
from serving.loader import MetadataFollower
from serving.registry import ModelRegistry
from serving.server import running_server
from storage import repositories as repo
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.db import create_db_engine, make_sessions, transaction
from tests.serving.conftest import CLASSES, FEATURES, STANDARDIZER

PIPELINE = "digits"
# The default thresholds, with the smallest sample that makes them sound for 3 classes
# (domain/canary_power.py: 100 requests per variant for max_error_rate 0.01 and the p99).
POLICY: dict[str, Any] = {
    "steps": [25.0, 50.0, 100.0],
    "interval_seconds": 1.0,
    "min_requests": 100,
    "max_error_rate": 0.01,
    "max_latency_p99_ratio": 1.2,
    "failure_limit": 1,
    "max_prediction_psi": 0.2,
    "min_labels": 1000,  # labels are exercised in their own test; here they must not decide
    "max_accuracy_drop": 0.02,
    "step_deadline_factor": 3.0,
}
# What the judge tests below 100 % (both variants' windows) and at 100 % (domain/sequential.py).
COMPARED = {"error_rate", "error_rate_vs_champion", "latency", "prediction_drift", "accuracy"}
AT_FULL_TRAFFIC = {"error_rate", "accuracy"}
ROWS = np.random.default_rng(0).normal(STANDARDIZER.mean, STANDARDIZER.std, size=(512, FEATURES)).astype(np.float32)


@dataclass
class Stack:
    settings_env: dict[str, str]
    sessions: sessionmaker[Session]
    store: ArtifactStore
    url: str
    tmp: Path

    def register(self, architecture: str, params: dict[str, Any], seed: int) -> int:
        manifest = {
            "format": MANIFEST_FORMAT, "architecture": architecture, "params": params,
            "input_shape": [FEATURES], "output_classes": CLASSES, "variant": "none",
            "standardizer": STANDARDIZER.to_dict(), "feature_names": [f"f{i}" for i in range(FEATURES)],
        }  # fmt: skip
        torch.manual_seed(seed)
        return self.store_version(build_model(architecture, params, [FEATURES], CLASSES), manifest, f"model-{seed}")

    def store_version(self, module: torch.nn.Module, manifest: dict[str, Any], name: str) -> int:
        """Saves the package, puts it in the artifact store and registers it; the version's id."""
        ref = self.store.put_file(save_package(module, manifest, self.tmp / f"{name}.pt").path)
        with transaction(self.sessions) as session:
            return repo.register_model_version(
                session, PIPELINE, artifact_uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size,
                metrics={}, manifest=manifest,
            ).id  # fmt: skip

    def start_rollout(
        self, candidate_id: int, champion_id: int, *, disagreement: float | None = None, **policy: Any
    ) -> tuple[int, str]:
        """`disagreement`: what the gate would have recorded for this candidate against the champion
        (the share of rows on which the two predict differently), which the drift check allows."""
        with transaction(self.sessions) as session:
            run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL, reason="canary test")
            repo.update_run(session, run.id, status=e.RunStatus.RUNNING)
            if disagreement is not None:
                champion = repo.get_model_version_by_id(session, champion_id).version
                recorded = {"rate": disagreement, "rows": len(ROWS), "champion_version": champion}
                repo.update_run(session, run.id, evidence={"disagreement": recorded})
            repo.update_run(session, run.id, status=e.RunStatus.CANARY, model_version_id=candidate_id)
            repo.set_model_stage(session, candidate_id, e.ModelStage.CANARY)
            rollout = repo.start_rollout(
                session, PIPELINE, candidate_version_id=candidate_id, champion_version_id=champion_id,
                policy={**POLICY, **policy}, run_id=run.id,
            )  # fmt: skip
        return rollout.id, run.id

    def drive(self) -> Any:
        ctx = FlowContext.open()
        client = ServingClient(self.url)
        try:
            return drive_rollout(ctx, PIPELINE, client, poll_seconds=0.2)
        finally:
            client.close()
            ctx.close()

    def traffic(self, **options: Any) -> Traffic:
        return Traffic(self.url, PIPELINE, ROWS, clients=3, rate_per_second=240, **options)


def metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, str], sessionmaker[Session], ArtifactStore]:
    """A migrated SQLite database with the pipeline registered and a local artifact store, in the
    environment (for `FlowContext.open`): the settings, sessions and store."""
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    env = {
        "RETRAINER_DATABASE_URL": url,
        "RETRAINER_ARTIFACT_ROOT": f"file://{tmp_path / 'artifacts'}",
        "RETRAINER_HOME_DIR": str(tmp_path / "home"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    migrations.upgrade(url)
    sessions = make_sessions(create_db_engine(url))
    store = open_artifact_store(env["RETRAINER_ARTIFACT_ROOT"], load_settings())
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, PIPELINE, {"name": PIPELINE})
    return env, sessions, store


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    env, sessions, store = metadata(tmp_path, monkeypatch)
    follower = MetadataFollower(ModelRegistry(), sessions, store)
    follower.start(0.5)
    app = create_serving_app(follower.registry, reload=follower.sync)
    with running_server(app) as base_url:
        yield Stack(env, sessions, store, base_url, tmp_path)
    follower.stop()
    follower.registry.close()


def _champion(stack: Stack) -> int:
    champion = stack.register("mlp", {"hidden_sizes": [16]}, seed=1)
    with transaction(stack.sessions) as session:
        repo.move_champion(session, PIPELINE, champion, expected_from_version_id=None, actor="test", reason="first")
    stack_follow = ServingClient(stack.url)
    stack_follow.load(PIPELINE)
    stack_follow.close()
    return champion


def _predictions(seed: int) -> np.ndarray:
    """The classes the zoo MLP registered with `seed` predicts for ROWS (as the server computes them)."""
    with torch.inference_mode():
        x = STANDARDIZER.transform_tensor(torch.from_numpy(ROWS))
        torch.manual_seed(seed)
        return build_model("mlp", {"hidden_sizes": [16]}, [FEATURES], CLASSES).eval()(x).argmax(dim=1).numpy()


def _disagreement(candidate_seed: int, champion_seed: int) -> float:
    """What the gate records (ml.evaluation.disagreement), here on the rows the traffic sends."""
    return float(np.mean(_predictions(candidate_seed) != _predictions(champion_seed)))


def _rollout(stack: Stack, rollout_id: int) -> e.Rollout:
    with transaction(stack.sessions) as session:
        rollout = repo.latest_rollout(session, PIPELINE)
        assert rollout is not None and rollout.id == rollout_id
        return rollout


def _state(stack: Stack, version_id: int, run_id: str) -> tuple[e.ModelStage, e.RunStatus, int | None]:
    with transaction(stack.sessions) as session:
        stage = repo.get_model_version_by_id(session, version_id).stage
        status = repo.get_run(session, run_id).status
        champion = repo.get_champion(session, PIPELINE)
    return stage, status, champion.id if champion else None


def test_a_good_candidate_walks_every_step_under_load_and_is_promoted(stack: Stack) -> None:
    champion = _champion(stack)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)  # a retrain: other weights, same cost
    # At the default thresholds. Other random weights predict other classes on some rows: the gate
    # measured how often, and live drift within that is the change it accepted.
    rollout_id, run_id = stack.start_rollout(candidate, champion, disagreement=_disagreement(2, 1))
    load = stack.traffic().start()
    try:
        result = stack.drive()
    finally:
        sent = load.stop()
    assert result.status is e.RolloutStatus.PROMOTED, result.reason
    rollout = _rollout(stack, rollout_id)
    assert [s.step_index for s in rollout.steps] == [0, 1, 2]
    assert [s.traffic_percent for s in rollout.steps] == [25.0, 50.0, 100.0]
    assert all(s.verdict is e.Verdict.PASS and s.finished_at for s in rollout.steps)
    for step in rollout.steps:
        last = step.analysis.attempts[-1]
        assert last.canary.requests >= POLICY["min_requests"]
        tested = AT_FULL_TRAFFIC if step.traffic_percent == 100.0 else COMPARED
        assert {c.metric for c in last.checks} == tested
        # each check's test is stored with the window: its outcome, level and sample sizes
        assert {c.check for c in last.evidence} == tested
        for evidence in last.evidence:
            if evidence.check != "accuracy":  # no labels here: accuracy waits, spending nothing
                assert evidence.outcome is CheckOutcome.PASS, evidence
                assert 0.0 < evidence.alpha < 0.05 and evidence.canary_n >= POLICY["min_requests"], evidence
        if step.traffic_percent < 100.0:
            assert last.champion.requests >= POLICY["min_requests"]
            drift = next(c for c in last.evidence if c.check == "prediction_drift")
            assert drift.measures["expected_disagreement"] == pytest.approx(_disagreement(2, 1))
    # traffic really was split: the candidate's share grew with the steps
    first = rollout.steps[0].analysis.attempts[-1]
    share = first.canary.requests / (first.canary.requests + first.champion.requests)
    assert 0.1 < share < 0.45
    assert _state(stack, candidate, run_id) == (e.ModelStage.CHAMPION, e.RunStatus.PROMOTED, candidate)
    with transaction(stack.sessions) as session:
        assert repo.get_model_version_by_id(session, champion).stage is e.ModelStage.RETIRED
        assert repo.alias_history(session, PIPELINE)[0].actor == "canary controller"
    assert sent.failed == 0 and sent.sent > 200
    state = ServingClient(stack.url).load(PIPELINE)
    assert state["champion"] == {"version": "2", "weight": 100.0} and state["canary"] is None


@pytest.mark.parametrize(
    ("architecture", "params", "failed_check"),
    [
        ("tests.serving.faulty:FlakyMLP", {"hidden": 16, "threshold": 1.0}, "error_rate"),
        # 30 ms per call, the slow candidate (much slower would throttle the closed-loop clients
        # below the canary's min_requests by the deadline: a "no evidence" rollback, not a latency one)
        ("tests.serving.faulty:SlowMLP", {"hidden": 16, "delay_ms": 30.0}, "latency"),
        ("tests.serving.faulty:SkewedMLP", {"hidden": 16}, "prediction_drift"),
    ],
    ids=["erroring", "30ms-slower", "drifting"],
)
def test_a_bad_candidate_is_rolled_back_at_the_first_analysed_step(
    stack: Stack, architecture: str, params: dict[str, Any], failed_check: str
) -> None:
    champion = _champion(stack)
    candidate = stack.register(architecture, params, seed=3)
    rollout_id, run_id = stack.start_rollout(candidate, champion)
    load = stack.traffic().start()
    try:
        result = stack.drive()
    finally:
        load.stop()
    assert result.status is e.RolloutStatus.ROLLED_BACK
    rollout = _rollout(stack, rollout_id)
    assert len(rollout.steps) == 1 and rollout.steps[0].verdict is e.Verdict.FAIL
    attempt = rollout.steps[0].analysis.attempts[-1]
    failed = {c.metric for c in attempt.checks if c.verdict is e.Verdict.FAIL}
    assert failed_check in failed, attempt.checks
    assert failed_check in (rollout.reason or "")
    # judged on the planned sample of both variants (never on a window the champion did not serve)
    assert attempt.canary.requests >= POLICY["min_requests"] and attempt.champion.requests >= POLICY["min_requests"]
    test = next(c for c in attempt.evidence if c.check == failed_check)
    assert test.outcome is CheckOutcome.FAIL and 0.0 < test.alpha < 0.05, test
    assert test.p_value is not None or test.interval is not None, test
    assert _state(stack, candidate, run_id) == (e.ModelStage.ROLLED_BACK, e.RunStatus.ROLLED_BACK, champion)
    # weight 0 at once: the server no longer routes to the candidate
    state = ServingClient(stack.url).load(PIPELINE)
    assert state["canary"] is None and state["champion"] == {"version": "1", "weight": 100.0}


def test_no_traffic_fails_closed_at_the_deadline(stack: Stack) -> None:
    champion = _champion(stack)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)
    rollout_id, run_id = stack.start_rollout(candidate, champion, interval_seconds=0.5, step_deadline_factor=2.0)
    started = time.monotonic()
    result = stack.drive()
    assert result.status is e.RolloutStatus.ROLLED_BACK
    assert time.monotonic() - started >= 1.0  # it waited for the deadline (2 intervals), never passed on no data
    rollout = _rollout(stack, rollout_id)
    assert "no evidence" in (rollout.reason or "")
    assert _state(stack, candidate, run_id) == (e.ModelStage.ROLLED_BACK, e.RunStatus.ROLLED_BACK, champion)


def test_delayed_labels_roll_back_a_less_accurate_candidate(stack: Stack) -> None:
    """Labels come from the champion's own answers, so the champion is right on each; a candidate with
    other weights disagrees often, which the gate measured (so the drift check allows it) and which
    only the accuracy check can judge."""
    champion = _champion(stack)
    labels = _predictions(1)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=5)
    # 120 canary requests per window bring ~60 labels: the default min_labels (50, the smallest sound
    # for max_accuracy_drop 0.02) per variant.
    rollout_id, _ = stack.start_rollout(
        candidate, champion, disagreement=_disagreement(5, 1), min_requests=120, min_labels=50, interval_seconds=2.0
    )
    load = stack.traffic(labels=labels, feedback_fraction=0.5).start()
    try:
        result = stack.drive()
    finally:
        load.stop()
    assert result.status is e.RolloutStatus.ROLLED_BACK, result.reason
    rollout = _rollout(stack, rollout_id)
    assert "accuracy" in (rollout.reason or ""), rollout.reason
    attempt = rollout.steps[-1].analysis.attempts[-1]
    accuracy = next(c for c in attempt.evidence if c.check == "accuracy")
    assert accuracy.outcome is CheckOutcome.FAIL and accuracy.measures["champion_accuracy"] >= 0.99, accuracy
    assert accuracy.interval is not None and accuracy.interval[1] < -POLICY["max_accuracy_drop"]
    assert min(accuracy.canary_n, accuracy.champion_n or 0) >= 50  # the default min_labels
    assert {c.check for c in attempt.evidence if c.outcome is CheckOutcome.FAIL} == {"accuracy"}, attempt.evidence


def test_a_controller_killed_between_steps_resumes_at_the_stored_step(stack: Stack, prefect_server: str) -> None:
    champion = _champion(stack)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)
    rollout_id, run_id = stack.start_rollout(
        candidate, champion, disagreement=_disagreement(2, 1), interval_seconds=1.5
    )
    env = {
        **os.environ,
        **stack.settings_env,
        "PREFECT_API_URL": prefect_server,
        "RETRAINER_CANARY_POLL_SECONDS": "0.2",
    }
    cli = [str(Path(sys.executable).parent / "retrainer"), "rollout", "run", PIPELINE, "--serving-url", stack.url]
    load = stack.traffic().start()
    try:
        controller = subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while _rollout(stack, rollout_id).current_step < 1:  # step 1 passed and stored
            assert controller.poll() is None, controller.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the controller did not pass step 1 in time"
            time.sleep(0.05)
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=10)
        killed_at = _rollout(stack, rollout_id)
        assert killed_at.status is e.RolloutStatus.ACTIVE and killed_at.current_step == 1
        result = stack.drive()  # a new controller
    finally:
        load.stop()
    assert result.status is e.RolloutStatus.PROMOTED, result.reason
    rollout = _rollout(stack, rollout_id)
    assert [s.step_index for s in rollout.steps] == [0, 1, 2]  # none skipped, none twice
    assert all(len(s.analysis.attempts) == 1 and s.verdict is e.Verdict.PASS for s in rollout.steps)
    if len(killed_at.steps) == 2:  # the killed controller had opened step 2: its window was kept
        assert rollout.steps[1].started_at == killed_at.steps[1].started_at
    assert _state(stack, candidate, run_id)[1] is e.RunStatus.PROMOTED


def test_rollout_supervise_drives_a_rollout_that_starts_while_it_runs(stack: Stack, prefect_server: str) -> None:
    """`retrainer rollout supervise` (the canary-controller container of compose and k8s): it picks up
    a rollout started after it, drives it to its end (here: no traffic, so fail closed), and stops
    cleanly on SIGTERM."""
    env = {
        **os.environ,
        **stack.settings_env,
        "PREFECT_API_URL": prefect_server,
        "RETRAINER_CANARY_POLL_SECONDS": "0.2",
    }
    cli = [str(Path(sys.executable).parent / "retrainer"), "rollout", "supervise", "--serving-url", stack.url]
    supervisor = subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # supervising nothing yet
        champion = _champion(stack)
        candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)
        rollout_id, run_id = stack.start_rollout(candidate, champion, interval_seconds=0.5, step_deadline_factor=2.0)
        deadline = time.monotonic() + 90
        while _rollout(stack, rollout_id).status is e.RolloutStatus.ACTIVE:
            assert supervisor.poll() is None, supervisor.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the supervisor did not finish the rollout"
            time.sleep(0.1)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        output = supervisor.communicate(timeout=30)[0].decode()
    assert supervisor.returncode == 0, output[-3000:]
    assert "no evidence" in (_rollout(stack, rollout_id).reason or "")
    assert _state(stack, candidate, run_id) == (e.ModelStage.ROLLED_BACK, e.RunStatus.ROLLED_BACK, champion)


def test_abort_and_manual_promote_end_the_rollout_and_the_controller_stops(stack: Stack) -> None:
    from flows import champion as overrides

    first = _champion(stack)
    candidate = stack.register("mlp", {"hidden_sizes": [16]}, seed=2)
    _, run_id = stack.start_rollout(candidate, first, interval_seconds=30)
    with transaction(stack.sessions) as session:
        with pytest.raises(Exception, match="at least 10 characters"):
            overrides.abort_rollout(session, PIPELINE, actor="ops", reason="no")
        aborted = overrides.abort_rollout(session, PIPELINE, actor="ops", reason="incident 42: freeze all changes")
    assert aborted.status is e.RolloutStatus.ABORTED and "incident 42" in (aborted.reason or "")
    assert stack.drive().status is e.RolloutStatus.ABORTED  # nothing active: the controller just reports
    assert _state(stack, candidate, run_id) == (e.ModelStage.ROLLED_BACK, e.RunStatus.ROLLED_BACK, first)

    second = stack.register("mlp", {"hidden_sizes": [16]}, seed=4)
    _, run_id = stack.start_rollout(second, first, interval_seconds=30)
    with transaction(stack.sessions) as session:
        promoted = overrides.promote_rollout(
            session, PIPELINE, actor="ops", reason="verified by hand on shadow traffic"
        )
    assert promoted.status is e.RolloutStatus.PROMOTED
    assert _state(stack, second, run_id) == (e.ModelStage.CHAMPION, e.RunStatus.PROMOTED, second)
