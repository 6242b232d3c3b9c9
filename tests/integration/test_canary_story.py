"""Issue 12's acceptance story: canary verdicts through `retrainer serve` (one process: API, model
server, canary supervisor) on PostgreSQL, MinIO and Kafka, with varied live traffic from an outside
client (`retrainer.traffic.Traffic`, held-out digits rows) to the model server's port.

Four pipelines roll out at once, each 20 times in a row, with one policy that `retrainer pipelines
validate` accepts (`min_requests: 100`, steps 50 % and 100 %):

- canary-good: same architecture as the champion, trained on four times the rows (better, equal
  cost): promoted in at least 19 of 20;
- canary-slow: the good weights, 30 ms late per forward pass: rolled back by `latency` in 20 of 20;
- canary-erroring: the good weights, failing on the 10 % of rows above a threshold on one pixel
  (the batcher fails the whole batch): rolled back by `error_rate` / `error_rate_vs_champion`;
- canary-single-class: the good weights, always answering class 0: rolled back by
  `prediction_drift` in 20 of 20.

Each repetition registers fresh versions (the champion trained on the smaller data again where a
promotion replaced it, and a new candidate) and starts the rollout as the gate does, with the run's
evidence `disagreement` the gate records: how often candidate and champion disagree on held-out
rows. For the faulty candidates that is the rate of the weights they wrap, as an offline evaluation
that never meets the fault (they are "pass offline, misbehave in serving", tests/serving/faulty.py).
The verdicts and the checks' evidence are read from `GET /api/v1/pipelines/{name}/rollout`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from domain import entities as e
from domain.apikeys import Scope
from domain.canary_power import power_problems
from domain.settings import load_settings
from domain.spec import CanarySpec
from ml.data import split
from ml.demo_data import digits_tables
from ml.package import MANIFEST_FORMAT, save_package
from ml.standardizer import Standardizer, fit_standardizer
from ml.zoo import build_model
from retrainer import demo as story
from retrainer.service import free_port
from retrainer.traffic import Traffic
from storage import repositories as repo
from storage.artifacts import ArtifactRef, ArtifactStore, open_artifact_store
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import retrainer_serve

pytestmark = pytest.mark.integration


REPEATS = 20
HIDDEN = 32
CLASSES, FEATURES = 10, 64
POLICY = CanarySpec(
    confidence=0.95,
    steps=[50.0, 100.0],
    min_requests=100,
    interval_seconds=1.0,
    step_deadline_factor=10.0,  # a loaded machine may be slow to bring 200 requests; never a verdict
    failure_limit=1,
    max_error_rate=0.01,
    max_latency_p99_ratio=1.5,
    latency_p99_slack_ms=5.0,
    # At 100 vs 100 requests over 10 classes, identical models exceed a PSI of 0.3 in 9 % of windows:
    # the power check asks for at least 0.35 (asserted below, as `pipelines validate` does).
    max_prediction_psi=0.35,
)
RATE_PER_PIPELINE = 120.0  # requests per second: a 50 % step collects 100 + 100 in about 2 s
ROLLOUT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Case:
    pipeline: str
    architecture: str
    params: dict[str, Any]
    promoted: bool
    checks: frozenset[str]  # the checks expected to roll it back (any of them)


@dataclass(frozen=True)
class Package:
    ref: ArtifactRef
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    repetition: int
    status: str
    failed: tuple[str, ...]
    seconds: float
    steps: str
    reason: str
    evidence_problems: tuple[str, ...]
    evidence: tuple[str, ...]  # each step's decisive attempt: its checks, one line each
    first_step_p: dict[str, float]  # each check's p-value in the 50 % step's decisive window


@dataclass(frozen=True)
class Models:
    """The two trained MLPs, the held-out rows (the live traffic) and what the gate would measure."""

    champion: tuple[nn.Module, Standardizer]
    better: tuple[nn.Module, Standardizer]
    rows: np.ndarray
    disagreement: float
    flaky_feature: int
    flaky_threshold: float


def _fit(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[nn.Module, Standardizer]:
    standardizer = fit_standardizer(features)
    torch.manual_seed(seed)
    model = build_model("mlp", {"hidden_sizes": [HIDDEN]}, [FEATURES], CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(standardizer.transform(features)), torch.from_numpy(labels)
    for _ in range(150):  # full-batch: about a second on CPU
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model.eval(), standardizer


def _predict(trained: tuple[nn.Module, Standardizer], rows: np.ndarray) -> np.ndarray:
    model, standardizer = trained
    with torch.inference_mode():
        out: np.ndarray = model(torch.from_numpy(standardizer.transform(rows))).argmax(dim=1).numpy()
    return out


def _train() -> Models:
    digits = digits_tables().tables["v2"]
    parts = split(digits, validation_fraction=0.0, test_fraction=0.3, seed=3)
    x, y = digits.features, digits.labels
    few = parts.train[: len(parts.train) // 4]
    champion, better = _fit(x[few], y[few], seed=1), _fit(x[parts.train], y[parts.train], seed=2)
    rows = x[parts.test]
    accuracy = [float(np.mean(_predict(m, rows) == y[parts.test])) for m in (champion, better)]
    assert accuracy[1] > accuracy[0] + 0.03, accuracy  # the candidate really is better
    # The pixel and threshold that 10 % of the live rows exceed (in the candidate's standardized units).
    z = better[1].transform(rows)
    options = [
        (abs(float(np.mean(z[:, j] > t)) - 0.1), j, float(t))
        for j in range(FEATURES)
        for t in (np.unique(z[:, j])[:-1] + np.unique(z[:, j])[1:]) / 2
    ]
    _, feature, threshold = min(options)
    disagreement = float(np.mean(_predict(champion, rows) != _predict(better, rows)))
    return Models(champion, better, rows, disagreement, feature, threshold)


def _package(
    store: ArtifactStore,
    tmp: Path,
    name: str,
    architecture: str,
    params: dict[str, Any],
    trained: tuple[nn.Module, Standardizer],
) -> Package:
    """The trained weights as a model package under `architecture` (a faulty wrapper holds them as `inner`)."""
    weights, standardizer = trained
    module = build_model(architecture, params, [FEATURES], CLASSES)
    target = module if architecture == "mlp" else module.get_submodule("inner")
    target.load_state_dict(weights.state_dict())
    manifest = {
        "format": MANIFEST_FORMAT, "architecture": architecture, "params": params,
        "input_shape": [FEATURES], "output_classes": CLASSES, "variant": "none",
        "standardizer": standardizer.to_dict(), "feature_names": [f"p{i}" for i in range(FEATURES)],
    }  # fmt: skip
    ref = store.put_file(save_package(module.eval(), manifest, tmp / f"{name}.pt").path)
    return Package(ref, manifest)


def _cases(models: Models) -> list[Case]:
    faulty = "tests.serving.faulty"
    flaky = {"hidden": HIDDEN, "threshold": models.flaky_threshold, "feature": models.flaky_feature}
    return [
        Case("canary-good", "mlp", {"hidden_sizes": [HIDDEN]}, True, frozenset()),
        Case("canary-slow", f"{faulty}:SlowMLP", {"hidden": HIDDEN, "delay_ms": 30.0}, False, frozenset({"latency"})),
        Case(
            "canary-erroring", f"{faulty}:FlakyMLP", flaky, False, frozenset({"error_rate", "error_rate_vs_champion"})
        ),
        Case("canary-single-class", f"{faulty}:SkewedMLP", {"hidden": HIDDEN}, False, frozenset({"prediction_drift"})),
    ]


class Story:
    """Registers versions and starts rollouts in SQL as the gate does; reads verdicts from the API."""

    def __init__(self, sessions: sessionmaker[Session], api: httpx.Client, champion: Package, models: Models) -> None:
        self.sessions, self.api, self.champion, self.models = sessions, api, champion, models

    def _register(self, session: Session, pipeline: str, package: Package) -> e.ModelVersion:
        return repo.register_model_version(
            session, pipeline, artifact_uri=package.ref.uri, sha256=package.ref.sha256, size_bytes=package.ref.size,
            metrics={}, manifest=package.manifest,
        )  # fmt: skip

    def ensure_champion(self, session: Session, pipeline: str) -> e.ModelVersion:
        """The champion trained on fewer rows: a fresh version of it where a promotion replaced it."""
        current = repo.get_champion(session, pipeline)
        if current is not None and current.sha256 == self.champion.ref.sha256:
            return current
        fresh = self._register(session, pipeline, self.champion)
        repo.move_champion(
            session, pipeline, fresh.id, expected_from_version_id=current.id if current else None,
            actor="canary story", reason="the next repetition starts from the smaller-data champion",
        )  # fmt: skip
        return fresh

    def rollout(self, case: Case, candidate: Package, repetition: int) -> Outcome:
        started = time.monotonic()
        with transaction(self.sessions) as session:
            champion = self.ensure_champion(session, case.pipeline)
            version = self._register(session, case.pipeline, candidate)
            run, _ = repo.create_run(session, case.pipeline, e.TriggerKind.MANUAL, reason=f"canary story {repetition}")
            repo.update_run(session, run.id, status=e.RunStatus.RUNNING)
            measured = {
                "rate": self.models.disagreement,
                "rows": len(self.models.rows),
                "champion_version": champion.version,
            }
            repo.update_run(
                session, run.id, status=e.RunStatus.CANARY, model_version_id=version.id,
                evidence={"disagreement": measured},
            )  # fmt: skip
            repo.set_model_stage(session, version.id, e.ModelStage.CANARY)
            rollout_id = repo.start_rollout(
                session, case.pipeline, candidate_version_id=version.id, champion_version_id=champion.id,
                policy=POLICY.model_dump(mode="json"), run_id=run.id,
            ).id  # fmt: skip
        deadline = started + ROLLOUT_TIMEOUT_S
        while True:
            with transaction(self.sessions) as session:
                latest = repo.latest_rollout(session, case.pipeline)
            assert latest is not None and latest.id == rollout_id
            if latest.status is not e.RolloutStatus.ACTIVE:
                break
            assert time.monotonic() < deadline, f"{case.pipeline} rollout {rollout_id} still active: {latest.steps}"
            time.sleep(0.1)
        seconds = time.monotonic() - started
        answer = self.api.get(f"/api/v1/pipelines/{case.pipeline}/rollout")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["id"] == rollout_id and body["outcome"] is not None, body
        last = body["steps"][-1]["analysis"]["attempts"][-1]
        failed = tuple(c["check"] for c in last["evidence"] if c["outcome"] == "fail")
        steps = " ".join(f"{s['traffic_percent']:g}:{s['verdict']}" for s in body["steps"])
        reason = body["outcome"]["reason"] or ""
        evidence = tuple(
            f"{step['traffic_percent']:>3g} % {_evidence_line(c)}"
            for step in body["steps"]
            for c in step["analysis"]["attempts"][-1]["evidence"]
        )
        first = body["steps"][0]["analysis"]["attempts"][-1]["evidence"]
        p_values = {c["check"]: c["p_value"] for c in first if c["p_value"] is not None}
        problems = tuple(_evidence_problems(body))
        return Outcome(repetition, body["status"], failed, seconds, steps, reason, problems, evidence, p_values)


def _evidence_problems(body: dict[str, Any]) -> list[str]:
    """What a decisive attempt's evidence lacks: each check with outcome, alpha, p-value or interval
    and sample sizes (a rollout that ended without a decision has checks still `not_yet`)."""
    problems = []
    for step in body["steps"]:
        percent = step["traffic_percent"]
        expected = {"error_rate", "accuracy"} | (
            {"error_rate_vs_champion", "latency", "prediction_drift"} if percent < 100.0 else set()
        )
        for attempt in step["analysis"]["attempts"]:
            evidence = {c["check"]: c for c in attempt["evidence"]}
            if set(evidence) != expected:
                problems.append(f"{percent:g} %: checks {sorted(evidence)}, expected {sorted(expected)}")
            for name, check in evidence.items():
                if name == "accuracy":  # no labels are sent: optional feedback, never decisive here
                    continue
                decided = check["outcome"] in ("pass", "fail") and check["alpha"] > 0
                tested = check["p_value"] is not None or check["interval"] is not None
                # requests for the error and latency checks; answered predictions (fewer, when some
                # requests failed) for the drift check
                sizes = [check["canary_n"]] + ([] if name == "error_rate" else [check["champion_n"] or 0])
                least = POLICY.min_requests if name != "prediction_drift" else 1
                if not (decided and tested and min(sizes) >= least):
                    problems.append(f"{percent:g} % {name}: {check['outcome']}, {check['reason']}")
    return problems


def _evidence_line(check: dict[str, Any]) -> str:
    interval = "-" if check["interval"] is None else "[{:.3f}, {:.3f}]".format(*check["interval"])
    p_value = "-" if check["p_value"] is None else f"{check['p_value']:.3g}"
    sizes = f"n {check['canary_n']}/{check['champion_n']}"
    head = f"{check['check']:<23} {check['outcome']:<8} alpha {check['alpha']:.4f}"
    return f"{head}  p {p_value:<9} interval {interval:<16} {sizes}"


def _repeat(story_: Story, case: Case, candidate: Package, abandon: threading.Event) -> list[Outcome]:
    """The case's rollouts one after another; one that goes wrong ends every pipeline's series."""
    outcomes: list[Outcome] = []
    try:
        for repetition in range(1, REPEATS + 1):
            if abandon.is_set():
                raise RuntimeError(f"{case.pipeline}: stopped after {len(outcomes)} rollouts (another series failed)")
            outcomes.append(story_.rollout(case, candidate, repetition))
    except BaseException:
        abandon.set()
        raise
    return outcomes


def _table(results: dict[str, list[Outcome]], expected: dict[str, str]) -> str:
    lines = [f"{'pipeline':<20} {'#':>2} {'status':<12} {'s':>5}  {'steps':<22} failed checks / reason"]
    for pipeline, outcomes in results.items():
        for o in outcomes:
            why = ",".join(o.failed) or ("-" if o.status == "promoted" else o.reason[:160])
            lines.append(f"{pipeline:<20} {o.repetition:>2} {o.status:<12} {o.seconds:5.1f}  {o.steps:<22} {why}")
    for pipeline, outcomes in results.items():
        shown = [outcomes[0]] + [o for o in outcomes[1:] if o.status != expected[pipeline]]
        for o in shown:
            lines.append(f"{pipeline}, repetition {o.repetition}, each step's decisive window (GET .../rollout):")
            lines += [f"    {line}" for line in o.evidence]
        smallest = {c: f"{min(o.first_step_p.get(c, 1.0) for o in outcomes):.3g}" for c in outcomes[0].first_step_p}
        lines.append(f"    smallest p-value per check at the 50 % step over {len(outcomes)} rollouts: {smallest}")
    return "\n".join(lines)


@pytest.fixture
def serve_env(
    tmp_path: Path, e2e_database: str, s3_endpoint_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """RETRAINER_* for `retrainer serve` on the real services; yields the artifact root."""
    root = f"s3://retrainer-test/canary-story-{uuid.uuid4().hex[:8]}"
    env = {
        **story.demo_environment(tmp_path / "home"),
        "RETRAINER_DATABASE_URL": e2e_database,
        "RETRAINER_ARTIFACT_ROOT": root,
        "RETRAINER_S3_ENDPOINT_URL": s3_endpoint_url,
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_API_ADDRESS": f"127.0.0.1:{free_port()}",
        "RETRAINER_SERVING_ADDRESS": f"127.0.0.1:{free_port()}",
        "RETRAINER_CANARY_POLL_SECONDS": "0.2",
        "RETRAINER_LOG_LEVEL": "INFO",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the service starts its own Prefect server
    # the faulty candidates are loaded by import path (tests.serving.faulty) in the service's process
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(story.repo_root()), os.environ.get("PYTHONPATH")]))
    )
    story.create_topics(load_settings())
    yield root
    story.delete_topics(load_settings())


def test_canary_verdicts_over_twenty_rollouts_of_four_candidates(tmp_path: Path, serve_env: str) -> None:
    assert power_problems(POLICY, confidence=POLICY.confidence, classes=CLASSES) == []
    settings = load_settings()
    models = _train()
    cases = _cases(models)
    for case in cases:
        document = story.merged(story.DEMO_SPEC, {"name": case.pipeline, "dataset": case.pipeline})
        document["model"]["params"] = {"hidden_sizes": [HIDDEN]}
        document["canary"] = POLICY.model_dump(mode="json")
        story.write_spec(settings.pipelines_dir, document)  # `retrainer serve` validates them (power included)
    store = open_artifact_store(settings.artifact_root, settings)
    champion = _package(store, tmp_path, "champion", "mlp", {"hidden_sizes": [HIDDEN]}, models.champion)
    candidates = {
        c.pipeline: _package(store, tmp_path, c.pipeline, c.architecture, c.params, models.better) for c in cases
    }
    serving = f"http://{settings.serving_address}"

    with retrainer_serve(settings.api_address, tmp_path / "serve.log"), ExitStack() as stack:
        sessions = make_sessions(create_db_engine(settings.database_url))
        with transaction(sessions) as session:
            _key, api_key = repo.create_api_key(session, "canary-story", [Scope.READ, Scope.OPERATE])
        api = stack.enter_context(
            httpx.Client(base_url=f"http://{settings.api_address}", headers={"X-API-Key": api_key}, timeout=10)
        )
        story_ = Story(sessions, api, champion, models)
        for case in cases:
            with transaction(sessions) as session:
                story_.ensure_champion(session, case.pipeline)
            loaded = httpx.post(
                f"{serving}/v2/repository/models/{case.pipeline}/load", headers={"X-API-Key": api_key}, timeout=30
            )
            assert loaded.status_code == 200
        loads = [
            Traffic(serving, c.pipeline, models.rows, clients=3, rate_per_second=RATE_PER_PIPELINE, seed=i).start()
            for i, c in enumerate(cases)
        ]
        for load in loads:
            stack.callback(load.stop)
        started = time.monotonic()
        abandon = threading.Event()
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = {c.pipeline: pool.submit(_repeat, story_, c, candidates[c.pipeline], abandon) for c in cases}
            results = {name: future.result() for name, future in futures.items()}
        elapsed = time.monotonic() - started
        sent = {c.pipeline: load.stats.sent for c, load in zip(cases, loads, strict=True)}

    table = _table(results, {c.pipeline: "promoted" if c.promoted else "rolled_back" for c in cases})
    print(f"\n{table}\n{REPEATS} rollouts x {len(cases)} pipelines in {elapsed:.0f} s; requests sent: {sent}")
    incomplete = [
        (p, o.repetition, o.evidence_problems) for p, outs in results.items() for o in outs if o.evidence_problems
    ]
    assert not incomplete, f"decisive attempts without their evidence: {incomplete}\n{table}"
    for case in cases:
        outcomes = results[case.pipeline]
        if case.promoted:
            promoted = sum(o.status == "promoted" for o in outcomes)
            assert promoted >= REPEATS - 1, f"{case.pipeline}: promoted {promoted}/{REPEATS}\n{table}"
        else:
            wrong = [o for o in outcomes if o.status != "rolled_back" or not case.checks & set(o.failed)]
            assert not wrong, f"{case.pipeline}: not rolled back by {sorted(case.checks)}: {wrong}\n{table}"
