"""The demo story, smaller, through `retrainer serve` (a subprocess) on the production-like stack:
PostgreSQL (a database of its own), MinIO for artifacts and data, Kafka for the events, a real
Prefect server and runner started by the service. Every decision is asserted, and read back from a
decisions topic of the test's own, where the service's decision relay publishes the outbox: every
decision exactly once after deduplication by CloudEvent id, keyed by the pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from domain import entities as e
from domain.decisions import DecisionType
from domain.evidence import CheckOutcome
from flows.records import decision_record
from retrainer import demo as story
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import production_stack, read_decisions, retrainer_serve

pytestmark = pytest.mark.integration

MIN_REQUESTS = story.DEMO_SPEC["canary"]["min_requests"]
SMALL = tuple(
    story.Act(a.key, a.data, a.story, a.expect, epochs, a.spec_changes)
    for a, epochs in zip(story.ACTS, (2, 12, 8, 12), strict=True)
)


def test_the_story_through_retrainer_serve(
    tmp_path: Path,
    e2e_database: str,
    s3_endpoint_url: str,
    kafka_bootstrap: str,
    decisions_topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ml.demo_data import digits_versions

    monkeypatch.setenv("RETRAINER_DECISIONS_TOPIC", decisions_topic)  # production_stack leaves it as set here
    files = digits_versions(tmp_path / "data")  # the data lives in S3 too
    stack = production_stack(
        tmp_path, monkeypatch, database=e2e_database, s3_endpoint_url=s3_endpoint_url,
        kafka_bootstrap=kafka_bootstrap, prefix="e2e", files=files,
    )  # fmt: skip
    settings, api, serving, data = stack.settings, stack.api, stack.serving, stack.data
    story.write_spec(settings.pipelines_dir, story.spec_for(SMALL[0]))

    with retrainer_serve(api, tmp_path / "serve.log") as health:
        assert set(health) == {
            "database", "prefect-server", "prefect-runner", "model-server", "model-follower",
            "kafka-consumer", "trigger-service", "canary-supervisor", "decision-relay", "webhook-deliveries",
        }  # fmt: skip
        sessions = make_sessions(create_db_engine(e2e_database))
        results = story.run_story(
            settings, sessions, serving_url=f"http://{serving}", data=data, traffic_rows=files["v2"], acts=SMALL,
            act_timeout_s=240,
        )  # fmt: skip
        summary = [(r.act.key, r.status, r.reason) for r in results]
        assert [r.status for r in results] == ["promoted", "promoted", "rejected", "rolled_back"], summary

        with transaction(sessions) as session:
            champion = repo.get_champion(session, story.PIPELINE)
            rollouts = repo.list_rollouts(session, story.PIPELINE)
            # keyed as ActResult.model_version is typed: a run that registered nothing has None
            versions: dict[int | None, e.ModelVersion] = {
                v.version: v for v in repo.list_model_versions(session, story.PIPELINE)
            }
            first = decision_record(session, results[0].run_id)
            good_run = repo.get_run(session, results[1].run_id)
        assert champion is not None and champion.version == results[1].model_version  # v2 is still champion
        assert first["trigger"]["kind"] == "event" and first["trigger"]["event_ids"] == [results[0].event_id]
        assert first["decision"]["dataset"]["uri"] == data["v1"] and first["decision"]["dataset"]["sha256"]
        assert versions[results[0].model_version].stage is e.ModelStage.RETIRED
        assert versions[results[2].model_version].stage is e.ModelStage.REJECTED
        assert versions[results[3].model_version].stage is e.ModelStage.ROLLED_BACK
        assert champion.artifact_uri.startswith(stack.settings.artifact_root + "/")

        slow, good = rollouts[0], rollouts[1]  # newest first
        assert good.status is e.RolloutStatus.PROMOTED and [s.verdict for s in good.steps] == [e.Verdict.PASS] * 3
        # rolled back during the canary: every earlier step passed, the last one failed
        assert slow.status is e.RolloutStatus.ROLLED_BACK
        assert [s.verdict for s in slow.steps] == [e.Verdict.PASS] * (len(slow.steps) - 1) + [e.Verdict.FAIL]
        assert "latency" in (slow.reason or ""), slow.reason
        failed = slow.steps[-1].analysis.attempts[-1]
        latency = next(c for c in failed.evidence if c.check == "latency")
        # judged on the planned sample: the policy's min_requests of canary latencies
        assert latency.outcome is CheckOutcome.FAIL and latency.canary_n >= MIN_REQUESTS, latency
        assert latency.p_value is not None and latency.p_value <= latency.alpha
        # the gate measured how often v2 and v1 disagree on the test rows; the drift check allowed that much
        measured = (good_run.evidence or {})["disagreement"]
        assert measured["champion_version"] == results[0].model_version and 0.0 <= measured["rate"] <= 1.0
        drift = next(c for c in good.steps[0].analysis.attempts[-1].evidence if c.check == "prediction_drift")
        assert drift.outcome is CheckOutcome.PASS and drift.measures["expected_disagreement"] == measured["rate"]
        assert results[1].traffic and results[3].traffic  # live traffic reached both canaries

        kinds = [
            r.trigger_kind for r in (repo.get_run(s, r.run_id) for s in [sessions()] for r in results)
        ]  # fmt: skip
        assert kinds == [e.TriggerKind.EVENT] * 4

        # the decisions topic, read from the beginning while the relay still runs
        with transaction(sessions) as session:
            outbox = {event.id: (event.type.value, event.data) for event in repo.outbox_events(session)}
        records = read_decisions(kafka_bootstrap, decisions_topic, set(outbox), timeout_s=30)
    assert settings.decisions_topic == decisions_topic
    deduped = {r.id: (r.type, r.data) for r in records}
    assert deduped == outbox  # none missing, none foreign, each as decided
    assert {r.key for r in records} == {story.PIPELINE.encode()}
    _assert_story_decisions(list(deduped.values()), results)
    story.delete_topics(settings)


def _assert_story_decisions(events: list[tuple[str, dict[str, Any]]], results: list[story.ActResult]) -> None:
    """The decisions of the four acts: each run created, started and finished with its status and
    gated; v1 promoted at once; v2's canary promoted step by step; v4's rolled back."""
    runs = {r.run_id: r.status for r in results}
    first, good, _flipped, slow = (r.run_id for r in results)

    def of(kind: DecisionType, field: str = "run_id") -> list[Any]:
        return [data[field] for type_, data in events if type_ == kind.value]

    assert sorted(of(DecisionType.RUN_CREATED)) == sorted(of(DecisionType.RUN_STARTED)) == sorted(runs)
    finished = {data["run_id"]: data["status"] for type_, data in events if type_ == DecisionType.RUN_FINISHED.value}
    assert finished == runs
    assert sorted(of(DecisionType.GATE_DECIDED)) == sorted(runs)
    assert sorted(of(DecisionType.MODEL_PROMOTED)) == sorted([first, good])
    assert sorted(of(DecisionType.ROLLOUT_FINISHED, "status")) == ["promoted", "rolled_back"]
    assert set(of(DecisionType.ROLLOUT_FINISHED)) == set(of(DecisionType.ROLLOUT_STEP_DECIDED)) == {good, slow}
    assert of(DecisionType.CHAMPION_ROLLED_BACK) == []
