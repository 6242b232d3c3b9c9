"""The HTML report: collected from a real (SQLite) metadata database and written atomically.

Rendering (templates, charts, escaping) is tested from hand-built views in tests/web/."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.canary_stats import Tally, error_rate_check, error_rate_vs_champion_check, latency_check
from domain.errors import NotFoundError
from domain.evidence import CanaryAction, CanaryAttempt, CheckEvidence, StepAnalysis, VariantWindow
from domain.histogram import LatencyHistogram
from domain.sequential import SpendingPlan, alpha_for
from domain.spec import CanarySpec
from retrainer.report import collect_report, runs_table_rows, write_report
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import Base
from web.views import GateRow, MetricPair, Quantization, ReportData

PIPELINE = "digits"
EVIL = "<script>alert('x')</script>"
GENERATED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

# ------------------------------------------------------------------------------------ the story


def report(accuracy: float, latency: float = 1.0, size: float = 40_000.0) -> dict[str, Any]:
    metrics = {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "latency_p99_ms": latency, "size_bytes": size}
    return {"n_examples": 360, "num_classes": 10, "metrics": metrics, "per_class": {}, "confusion_matrix": []}


def quantization(chosen: str, reason: str) -> dict[str, Any]:
    return {
        "chosen": chosen,
        "reason": reason,
        "max_accuracy_drop": 0.01,
        "results": [
            {
                "variant": "none",
                "available": True,
                "eligible": True,
                "reason": "float baseline",
                "score": {"accuracy": 0.95, "latency_p50_ms_b32": 0.8, "size_bytes": 40_000},
            },
            {
                "variant": "dynamic_int8",
                "available": True,
                "eligible": chosen == "dynamic_int8",
                "reason": "1.6x faster, 3.1x smaller",
                "score": {"accuracy": 0.948, "latency_p50_ms_b32": 0.5, "size_bytes": 13_000},
            },
        ],
    }


def window(version: str, requests: int, errors: int, p99: float, counts: dict[str, int]) -> VariantWindow:
    return VariantWindow(
        version=version,
        requests=requests,
        errors=errors,
        latency_p50_ms=p99 / 3,
        latency_p99_ms=p99,
        class_counts=counts,
    )


def check(
    metric: str, verdict: str, reason: str, value: float | None, champion: float | None, threshold: float
) -> e.GateCheck:
    return e.GateCheck(metric, "canary", e.Verdict(verdict), reason, value, champion, threshold)


def attempt(
    action: str,
    reason: str,
    canary: VariantWindow,
    champion: VariantWindow,
    checks: list[e.GateCheck],
    server_error: str | None = None,
    evidence: tuple[CheckEvidence, ...] = (),
) -> CanaryAttempt:
    return CanaryAttempt(
        action=CanaryAction(action),
        reason=reason,
        elapsed_seconds=31.2,
        at=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
        traffic_percent=0.0 if action == "rollback" else 50.0,
        canary=canary,
        champion=champion,
        checks=tuple(checks) or tuple(c.to_gate_check() for c in evidence),
        server_error=server_error,
        evidence=evidence,
    )


def passing_checks(psi: float) -> list[e.GateCheck]:
    return [
        check("error_rate", "pass", "error rate 0.00 % <= 1.00 %", 0.0, None, 0.01),
        check("latency_p99_ratio", "pass", "p99 ratio 1.05 <= 1.20", 1.05, None, 1.2),
        check("prediction_psi", "pass", f"PSI {psi:.3f} <= 0.200", psi, None, 0.2),
        check("accuracy", "skipped", "fewer than 50 labels per variant", None, None, 0.02),
    ]


# the 50 % step's level per check: 1 - confidence split over the steps, then equally over the checks
ALPHA = alpha_for(SpendingPlan.for_policy([10.0, 50.0, 100.0], 0.95), 1, "latency", 1, final=True)


def slow_canary_evidence() -> tuple[CheckEvidence, ...]:
    """The rolled-back window's tests: errors within the limit and the champion's, latency 3x slower."""
    canary = LatencyHistogram.of([9.8 - (i % 4) * 0.1 for i in range(1000)])
    champion = LatencyHistogram.of([3.3 - (i % 4) * 0.1 for i in range(1000)])
    return (
        error_rate_check(3, 1000, max_error_rate=0.01, alpha=ALPHA, final=True),
        error_rate_vs_champion_check(Tally(3, 1000), Tally(1, 1000), alpha=ALPHA, final=True),
        latency_check(canary, champion, max_ratio=1.2, slack_ms=0.0, alpha=ALPHA, final=True),
    )


def record_step(
    session: Session, rollout_id: int, index: int, traffic: float, verdict: e.Verdict, *attempts: CanaryAttempt
) -> None:
    """A finished step as the controller stores it (the last attempt decided it)."""
    analysis = StepAnalysis(attempts=attempts, action=attempts[-1].action, reason=attempts[-1].reason)
    repo.record_rollout_step(
        session,
        rollout_id,
        step_index=index,
        traffic_percent=traffic,
        verdict=verdict,
        analysis=analysis,
    )


@dataclass(frozen=True)
class Story:
    runs: tuple[str, str, str]  # first model, promoted through a canary, rolled back
    rollouts: tuple[int, int]


def finish_run(
    session: Session,
    run_id: str,
    dataset_version_id: int,
    *,
    accuracy: float,
    champion: dict[str, Any] | None,
    gate: list[e.GateCheck],
    status: e.RunStatus,
    reason: str,
    quant: tuple[str, str] = ("dynamic_int8", "fastest variant within 1 % accuracy"),
) -> e.ModelVersion:
    repo.update_run(session, run_id, status=e.RunStatus.RUNNING, dataset_version_id=dataset_version_id)
    version = repo.register_model_version(
        session,
        PIPELINE,
        artifact_uri=f"file:///tmp/artifacts/{run_id}.pt",
        sha256=f"{len(run_id) + int(accuracy * 1000):064x}",
        size_bytes=13_000,
        metrics=report(accuracy)["metrics"],
        run_id=run_id,
    )
    repo.record_gate_checks(session, run_id, gate, model_version_id=version.id)
    evidence = {"candidate": report(accuracy), "champion": champion, "quantization": quantization(*quant)}
    repo.update_run(session, run_id, model_version_id=version.id, evidence=evidence)
    repo.update_run(session, run_id, status=status, evidence={"outcome": {"status": status.value, "reason": reason}})
    return version


def build_story(sessions: sessionmaker[Session]) -> Story:
    with transaction(sessions) as s:
        repo.upsert_pipeline(s, PIPELINE, "digits", {"name": PIPELINE})
        repo.upsert_pipeline(s, "other", "iris", {"name": "other"})
        datasets = [
            repo.record_dataset_version(s, "digits", f"v{i}", f"file:///data/digits-v{i}.csv") for i in (1, 2, 3)
        ]
        repo.add_to_inbox(
            s, event_id="ev-1", source="//test", type="retrainer.data.changed", dataset="digits", payload={}
        )

        run1, _ = repo.create_run(s, PIPELINE, e.TriggerKind.EVENT, reason="first data", event_ids=["ev-1"])
        v1 = finish_run(
            s,
            run1.id,
            datasets[0].id,
            accuracy=0.91,
            champion=None,
            gate=[e.GateCheck("accuracy", "min", e.Verdict.PASS, "accuracy 0.9100 >= 0.9000", 0.91, None, 0.9)],
            status=e.RunStatus.PROMOTED,
            reason="all gate checks passed (first model)",
        )
        repo.move_champion(
            s, PIPELINE, v1.id, expected_from_version_id=None, actor="gate", reason="first model", run_id=run1.id
        )

        run2, _ = repo.create_run(s, PIPELINE, e.TriggerKind.MANUAL, reason="more data")
        v2 = finish_run(
            s,
            run2.id,
            datasets[1].id,
            accuracy=0.95,
            champion={"version": 1, "report": report(0.91, latency=1.1), "error": None},
            gate=[
                e.GateCheck("accuracy", "min", e.Verdict.PASS, "accuracy 0.9500 >= 0.9000", 0.95, None, 0.9),
                e.GateCheck("accuracy", "vs_champion", e.Verdict.PASS, "+0.04 better than champion", 0.95, 0.91, 0.0),
            ],
            status=e.RunStatus.CANARY,
            reason="gate passed; awaiting the canary rollout",
        )
        policy = {"steps": [10.0, 50.0, 100.0], "max_error_rate": 0.01, "max_latency_p99_ratio": 1.2}
        promoted = repo.start_rollout(
            s, PIPELINE, candidate_version_id=v2.id, champion_version_id=v1.id, policy=policy, run_id=run2.id
        )
        for index, (traffic, requests) in enumerate([(10.0, 220), (50.0, 900), (100.0, 1800)]):
            ok = attempt(
                "promote" if traffic == 100 else "advance",
                f"all checks passed at {traffic:g} %",
                window("2", requests, 0, 3.4, {"0": requests // 2, "1": requests - requests // 2}),
                window("1", 2000 - requests, 1, 3.2, {"0": 1000, "1": 1000 - requests}),
                passing_checks(0.01 * (index + 1)),
            )
            if index == 1:  # one repeated window: too little traffic first
                thin = attempt(
                    "repeat",
                    "only 40 canary requests (< 200); extending the step",
                    window("2", 40, 0, 3.0, {"0": 20, "1": 20}),
                    window("1", 400, 0, 3.1, {"0": 200, "1": 200}),
                    [],
                    server_error="stats endpoint timed out",
                )
                record_step(s, promoted.id, index, traffic, e.Verdict.PASS, thin, ok)
            else:
                record_step(s, promoted.id, index, traffic, e.Verdict.PASS, ok)
        repo.move_champion(
            s, PIPELINE, v2.id, expected_from_version_id=v1.id, actor="canary", reason="canary passed", run_id=run2.id
        )
        repo.finish_rollout(s, promoted.id, e.RolloutStatus.PROMOTED, "all 3 steps passed; v2 is champion")
        repo.update_run(s, run2.id, status=e.RunStatus.PROMOTED)

        run3, _ = repo.create_run(s, PIPELINE, e.TriggerKind.SCHEDULE, reason="cron schedule")
        v3 = finish_run(
            s,
            run3.id,
            datasets[2].id,
            accuracy=0.96,
            champion={"version": 2, "report": report(0.95), "error": None},
            gate=[
                e.GateCheck("accuracy", "min", e.Verdict.PASS, "accuracy 0.9600 >= 0.9000", 0.96, None, 0.9),
                e.GateCheck("latency_p99_ms", "max", e.Verdict.FAIL, f"latency too high {EVIL}", 7.0, None, 5.0),
            ],
            status=e.RunStatus.CANARY,
            reason=f"gate passed; {EVIL}",
        )
        # rolled out since the checks are tests: the policy names its confidence, the windows their evidence
        tested = CanarySpec(steps=[10.0, 50.0, 100.0]).model_dump(mode="json")
        rolled = repo.start_rollout(
            s, PIPELINE, candidate_version_id=v3.id, champion_version_id=v2.id, policy=tested, run_id=run3.id
        )
        record_step(
            s,
            rolled.id,
            0,
            10.0,
            e.Verdict.PASS,
            attempt(
                "advance",
                "all checks passed at 10 %",
                window("3", 250, 0, 3.5, {"0": 125, "1": 125}),
                window("2", 2250, 2, 3.3, {"0": 1125, "1": 1125}),
                passing_checks(0.02),
            ),
        )
        slow = "canary p99 latency 9.80 ms is 2.97x the champion's 3.30 ms (limit 1.20x)"
        record_step(
            s,
            rolled.id,
            1,
            50.0,
            e.Verdict.FAIL,
            attempt(
                "rollback",
                slow,
                window("3", 1000, 3, 9.8, {"0": 500, "1": 500}),
                window("2", 1000, 1, 3.3, {"0": 500, "1": 500}),
                [],
                evidence=slow_canary_evidence(),
            ),
        )
        repo.finish_rollout(s, rolled.id, e.RolloutStatus.ROLLED_BACK, f"rolled back at step 1: {slow}")
        repo.set_model_stage(s, v3.id, e.ModelStage.ROLLED_BACK)
        repo.update_run(s, run3.id, status=e.RunStatus.ROLLED_BACK)
        return Story(runs=(run1.id, run2.id, run3.id), rollouts=(promoted.id, rolled.id))


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sessionmaker[Session], Story]]:
    engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('report') / 'retrainer.db'}")
    Base.metadata.create_all(engine)
    sessions = make_sessions(engine)
    story = build_story(sessions)
    yield sessions, story
    engine.dispose()


@pytest.fixture(scope="module")
def data(db: tuple[sessionmaker[Session], Story]) -> ReportData:
    with transaction(db[0]) as session:
        return collect_report(session)


# ---------------------------------------------------------------------------------- collecting


def test_collects_runs_oldest_first_with_versions_and_evidence(
    data: ReportData, db: tuple[sessionmaker[Session], Story]
) -> None:
    story = db[1]
    assert [p.name for p in data.pipelines] == ["digits", "other"]
    digits = data.pipelines[0]
    assert digits.champion_version == 2
    assert [r.run_id for r in digits.runs] == list(story.runs)
    first, second, third = digits.runs
    assert (first.trigger_kind, first.event_count, first.dataset_version, first.candidate_version) == (
        "event",
        1,
        "v1",
        1,
    )
    assert first.champion_version is None and first.metric("accuracy") is not None
    assert second.status == "promoted" and second.champion_version == 1
    # the gate's outcome said "awaiting the canary"; the finished rollout decided the final status
    assert second.decision_reason == "all 3 steps passed; v2 is champion"
    accuracy = second.metric("accuracy")
    assert accuracy is not None and accuracy.candidate == 0.95 and accuracy.champion == 0.91 and accuracy.improved
    latency = second.metric("latency_p99_ms")
    assert latency is not None and latency.improved  # lower is better
    assert third.status == "rolled_back" and [g.verdict for g in third.gate] == ["pass", "fail"]
    assert third.gate[1] == GateRow("latency_p99_ms", "max", "fail", f"latency too high {EVIL}", 7.0, None, 5.0)
    assert third.quantization is not None and third.quantization.chosen == "dynamic_int8"
    assert all(r.duration_seconds is not None and r.duration_seconds >= 0 for r in digits.runs)


def test_collects_alias_history_and_rollouts_oldest_first(data: ReportData, db: tuple[Any, Story]) -> None:
    digits = data.pipelines[0]
    assert [(m.from_version, m.to_version, m.actor) for m in digits.alias_moves] == [
        (None, 1, "gate"),
        (1, 2, "canary"),
    ]
    promoted, rolled = digits.rollouts
    assert [promoted.id, rolled.id] == list(db[1].rollouts)
    assert (promoted.status, promoted.candidate_version, promoted.champion_version) == ("promoted", 2, 1)
    assert [s.traffic_percent for s in promoted.steps] == [10.0, 50.0, 100.0]
    assert [len(s.attempts) for s in promoted.steps] == [1, 2, 1]
    decisive = promoted.steps[1].decisive
    assert decisive is not None and decisive.action == "advance" and decisive.canary.requests == 900
    assert decisive.psi == pytest.approx(0.02)
    assert (rolled.status, len(rolled.steps), rolled.steps[1].analysis.action) == ("rolled_back", 2, "rollback")
    last = rolled.steps[1].decisive
    assert last is not None and last.canary.error_rate == pytest.approx(0.003)
    # the evidence came back from SQL as stored, beside its flat checks
    assert last.evidence == slow_canary_evidence()
    assert [(c.metric, c.verdict) for c in last.checks] == [
        ("error_rate", "pass"),
        ("error_rate_vs_champion", "pass"),
        ("latency", "fail"),
    ]
    assert promoted.false_rollback_budget is None  # its policy predates canary.confidence
    assert rolled.false_rollback_budget == pytest.approx(0.05)


def test_pipeline_filter_and_unknown_pipeline(db: tuple[sessionmaker[Session], Story]) -> None:
    with transaction(db[0]) as session:
        only = collect_report(session, ["other"])
        assert [p.name for p in only.pipelines] == ["other"]
        assert only.pipelines[0].runs == () and only.pipelines[0].champion_version is None
        with pytest.raises(NotFoundError):
            collect_report(session, ["nope"])


def test_runs_table_rows_for_the_cli(data: ReportData, db: tuple[Any, Story]) -> None:
    rows = runs_table_rows(data)
    assert [row[1] for row in rows] == [run_id[:8] for run_id in db[1].runs]
    assert rows[0] == (
        "digits",
        db[1].runs[0][:8],
        "event",
        "v1",
        "v1",
        "promoted",
        "all gate checks passed (first model)",
    )
    assert rows[2][2:6] == ("schedule", "v3", "v3", "rolled_back")
    assert all(len(row) == 7 and all(isinstance(cell, str) and cell for cell in row) for row in rows)


# ------------------------------------------------------------------------------------- writing


def test_missing_run_evidence_and_steps_without_windows_are_collected_as_unknown(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'sparse.db'}")
    Base.metadata.create_all(engine)
    sessions = make_sessions(engine)
    with transaction(sessions) as s:
        repo.upsert_pipeline(s, PIPELINE, "digits", {})
        repo.create_run(s, PIPELINE, e.TriggerKind.MANUAL)  # queued: no evidence at all
        version = repo.register_model_version(
            s, PIPELINE, artifact_uri="file:///x.pt", sha256="a" * 64, size_bytes=1, metrics={}
        )
        odd, _ = repo.create_run(s, PIPELINE, e.TriggerKind.EVENT, reason="odd evidence")
        repo.update_run(
            s,
            odd.id,
            model_version_id=version.id,
            evidence={
                "candidate": {"metrics": {"accuracy": "high", "macro_f1": None}},
                "champion": {"version": "two", "report": None, "error": "champion v2 unreadable"},
                "quantization": {"chosen": None, "results": "none"},
                "outcome": "not a dict",
            },
        )
        repo.update_run(s, odd.id, status=e.RunStatus.FAILED, error="RuntimeError: boom")
        rollout = repo.start_rollout(s, PIPELINE, candidate_version_id=version.id, champion_version_id=None, policy={})
        repo.record_rollout_step(s, rollout.id, step_index=0, traffic_percent=10.0, verdict=None)
        repo.record_rollout_step(s, rollout.id, step_index=1, traffic_percent=25.0, verdict=None, finished=False)
        repo.finish_rollout(s, rollout.id, e.RolloutStatus.ABORTED, "aborted by operator")
    with transaction(sessions) as s:
        (pipeline,) = collect_report(s).pipelines
    path = write_report(sessions, tmp_path / "out" / "report.html", generated_at=GENERATED)
    engine.dispose()

    queued, failed = pipeline.runs
    assert (queued.status, queued.evaluated, queued.gate, queued.quantization) == ("queued", False, (), None)
    assert failed.metric("accuracy") == MetricPair("accuracy", None, None, True)  # "high" is not a number
    assert (failed.champion_recorded, failed.champion_version, failed.champion_error) == (
        True,
        None,
        "champion v2 unreadable",
    )
    assert failed.quantization == Quantization(None, None, None, ())
    assert (failed.candidate_version, failed.decision_reason) == (1, "RuntimeError: boom")
    (aborted,) = pipeline.rollouts
    assert [s.analysis for s in aborted.steps] == [StepAnalysis(), StepAnalysis()]  # no window analysed
    assert (aborted.status, aborted.reason, aborted.steps[1].finished_at) == ("aborted", "aborted by operator", None)
    document = path.read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>") and "aborted by operator" in document
    assert [p for p in (tmp_path / "out").iterdir()] == [path]  # no temporary file left behind
    assert runs_table_rows(ReportData(pipelines=())) == []


def test_the_written_report_shows_each_checks_evidence_and_old_windows_flat(
    db: tuple[sessionmaker[Session], Story], tmp_path: Path
) -> None:
    path = write_report(db[0], tmp_path / "report.html", pipelines=["digits"], generated_at=GENERATED)
    document = html.unescape(re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))
    errors, versus, latency = slow_canary_evidence()
    assert latency.statistic is not None and latency.p_value is not None
    for shown in (
        f"p99 ratio {latency.statistic:.2f}x (limit 1.20x)",
        f"p = {latency.p_value:.3g}",
        "rate 0.30 % (limit 1.00 %)",
        f"p = {errors.p_value:.3g}",
        f"p = {versus.p_value:.3g}",
        f"{ALPHA:.3g}",  # the level each check spent
        "1000 / 1000",  # canary n / champion n
        latency.reason,
        "False-rollback budget 5.00 %",
    ):
        assert shown in document, shown
    # windows stored before the checks were tests still show their flat checks
    assert "prediction_psi" in document and "p99 ratio 1.05 <= 1.20" in document


def test_write_report_replaces_an_existing_file(db: tuple[sessionmaker[Session], Story], tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old", encoding="utf-8")
    written = write_report(db[0], target, pipelines=["digits"], title="Demo", generated_at=GENERATED)
    assert written == target
    content = target.read_text(encoding="utf-8")
    assert (
        content.startswith("<!DOCTYPE html>") and "<title>Demo</title>" in content and "Pipeline other" not in content
    )
