"""The real pipeline flow, run by a real Prefect on tiny data, with every decision asserted."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.canary import expected_disagreement
from flows.pipeline import run_pipeline
from flows.records import decision_record
from storage import repositories as repo
from storage.artifacts.local import path_from_file_uri
from storage.db import transaction
from tests.flows.conftest import WEAK, event_run, spec

pytestmark = pytest.mark.integration


def record(sessions: sessionmaker[Session], run_id: str) -> dict[str, Any]:
    with transaction(sessions) as session:
        return decision_record(session, run_id)


def champion_version(sessions: sessionmaker[Session]) -> int | None:
    with transaction(sessions) as session:
        champion = repo.get_champion(session, "digits-classifier")
    return champion.version if champion else None


def run(sessions: sessionmaker[Session], document: dict[str, Any], version: str, uri: Path) -> dict[str, Any]:
    run_id = event_run(sessions, document, version, uri)
    run_pipeline("digits-classifier", run_id)
    return record(sessions, run_id)


def test_first_model_then_a_better_one_is_promoted(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    first = run(env, spec(**WEAK), "v1", digits["v1"])
    assert first["status"] == "promoted", json.dumps(first["decision"]["gate"])
    assert champion_version(env) == 1
    assert [g["verdict"] for g in first["decision"]["gate"] if g["check"] == "vs_champion"] == ["skipped"]

    better = run(env, spec(), "v2", digits["v2"])
    assert better["status"] == "promoted", better["decision"]["outcome"]
    assert champion_version(env) == 2
    accuracy = next(g for g in better["decision"]["gate"] if g["check"] == "vs_champion")
    assert accuracy["verdict"] == "pass" and accuracy["ci_low"] > 0
    chain = better["decision"]
    assert chain["dataset"]["version"] == "v2" and chain["dataset"]["sha256"]
    assert (
        chain["champion"]["version"] == 1
        and chain["champion"]["report"]["n_examples"] == chain["candidate"]["n_examples"]
    )
    assert chain["quantization"]["chosen"] in ("none", "dynamic")
    assert [m["actor"] for m in chain["alias_moves"]] == ["gate"]
    with transaction(env) as session:
        assert repo.get_model_version(session, "digits-classifier", 1).stage is e.ModelStage.RETIRED


def test_the_gate_records_how_often_candidate_and_champion_disagree(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    """What the canary's drift check allows (flows.canary.expected_disagreement): the share of the
    gate's test rows on which the candidate and this champion predict different classes."""
    first = run(env, spec(**WEAK), "v1", digits["v1"])
    assert first["decision"]["disagreement"] is None  # no champion to disagree with
    better = run(env, spec(), "v2", digits["v2"])
    chain = better["decision"]
    measured = chain["disagreement"]
    assert measured["champion_version"] == 1 and measured["rows"] == chain["candidate"]["n_examples"] > 0
    rate = measured["rate"]
    assert 0.0 < rate < 1.0  # a model trained longer on more data changes some predictions, not all
    # Two models that disagree on a share d of the rows differ by at most d in accuracy and in each
    # predicted class's share (total variation): what the canary relies on.
    candidate, champion = chain["candidate"], chain["champion"]["report"]
    assert abs(candidate["metrics"]["accuracy"] - champion["metrics"]["accuracy"]) <= rate + 1e-9
    predicted = [[sum(column) for column in zip(*r["confusion_matrix"], strict=True)] for r in (candidate, champion)]
    total_variation = sum(abs(a - b) for a, b in zip(*predicted, strict=True)) / (2 * measured["rows"])
    assert total_variation <= rate + 1e-9

    with transaction(env) as session:
        stored = repo.get_run(session, better["run_id"])
        assert expected_disagreement(stored, 1) == rate
        assert expected_disagreement(stored, 2) is None  # measured against another champion: not this one's
        assert expected_disagreement(stored, None) is None
        assert expected_disagreement(repo.get_run(session, first["run_id"]), 1) is None
    assert expected_disagreement(None, 1) is None


def test_a_worse_candidate_is_rejected_and_the_champion_stays(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    run(env, spec(), "v2", digits["v2"])
    worse = run(env, spec(**WEAK), "v2b", digits["v2"])
    assert worse["status"] == "rejected"
    assert champion_version(env) == 1
    assert any(g["verdict"] == "fail" and g["check"] == "vs_champion" for g in worse["decision"]["gate"])


def test_an_equal_candidate_is_not_promoted_in_superiority_mode(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    run(env, spec(), "v2", digits["v2"])
    same = run(env, spec(), "v2-again", digits["v2"])  # same data, same seed: the same model
    assert same["status"] == "rejected" and champion_version(env) == 1
    check = next(g for g in same["decision"]["gate"] if g["check"] == "vs_champion")
    assert check["ci_low"] <= 0 <= check["ci_high"]


def test_poisoned_labels_are_rejected(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    document = spec()
    document["gates"]["min"]["accuracy"] = 0.85
    run(env, document, "v2", digits["v2"])
    poisoned = run(env, document, "v3", digits["v3"])
    assert poisoned["status"] == "rejected" and champion_version(env) == 1
    floor = next(g for g in poisoned["decision"]["gate"] if g["check"] == "min")
    assert floor["verdict"] == "fail" and floor["candidate"] < 0.85


def test_a_missing_champion_artifact_fails_closed(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    run(env, spec(**WEAK), "v1", digits["v1"])
    with transaction(env) as session:
        champion = repo.get_champion(session, "digits-classifier")
    assert champion is not None
    path_from_file_uri(champion.artifact_uri).unlink()
    after = run(env, spec(), "v2", digits["v2"])
    assert after["status"] == "rejected" and champion_version(env) == 1
    assert "does not exist" in after["decision"]["champion"]["error"]
    assert any("champion unusable" in g["reason"] for g in after["decision"]["gate"])


def test_training_killed_mid_run_resumes_from_its_checkpoint(
    env: sessionmaker[Session], digits: dict[str, Path], tmp_path: Path
) -> None:
    document = spec()
    document["model"] = {
        "architecture": "tests.flows.crashy:CrashOnce",
        "params": {"marker": str(tmp_path / "crashed"), "crash_at_call": 30},
        "input_shape": [64],
        "output_classes": 10,
    }
    result = run(env, document, "v2", digits["v2"])
    assert (tmp_path / "crashed").exists(), "the first attempt did not crash"
    assert result["status"] == "promoted"
    training = result["decision"]["training"]
    assert training["resumed_from_step"] == 25  # the last checkpoint before the crash at step 30


def test_two_racing_runs_yield_one_promotion(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    run(env, spec(**WEAK), "v1", digits["v1"])
    run_ids = [event_run(env, spec(), f"v2-{i}", digits["v2"]) for i in range(2)]
    errors: list[BaseException] = []

    def go(run_id: str) -> None:
        try:
            run_pipeline("digits-classifier", run_id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=go, args=(rid,)) for rid in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    statuses = sorted(record(env, rid)["status"] for rid in run_ids)
    assert statuses == ["promoted", "rejected"]
    with transaction(env) as session:
        assert len(repo.alias_history(session, "digits-classifier")) == 2  # first model + exactly one more


def test_the_flow_run_is_named_tagged_and_leaves_a_markdown_report(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result = run(env, spec(**WEAK), "v1", digits["v1"])
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result["prefect_flow_run_id"])
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"run-{result['run_id'][:8]}"]))
        )
        progress = [a for a in client.read_artifacts() if a.type == "progress" and a.flow_run_id == flow_run.id]
    assert flow_run.name == "digits-classifier·event·v1"
    assert {"pipeline:digits-classifier", "trigger:event", "dataset-version:v1"} <= set(flow_run.tags)
    (report,) = artifacts
    assert "## Gate" in str(report.data) and "promoted" in str(report.data)
    assert progress and progress[0].data == 100.0


def test_a_failing_run_is_marked_failed_and_the_champion_stays(
    env: sessionmaker[Session], digits: dict[str, Path], tmp_path: Path
) -> None:
    run(env, spec(**WEAK), "v1", digits["v1"])
    run_id = event_run(env, spec(), "v9", tmp_path / "missing.csv")
    with pytest.raises(Exception, match="does not exist"):
        run_pipeline("digits-classifier", run_id)
    failed = record(env, run_id)
    assert failed["status"] == "failed" and "does not exist" in failed["error"]
    assert failed["finished_at"] is not None and champion_version(env) == 1


def test_with_a_canary_section_a_passing_candidate_starts_one_rollout(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    assert run(env, spec(**WEAK), "v1", digits["v1"])["status"] == "promoted"
    # the smallest min_requests that `retrainer pipelines validate` accepts for these steps (10 classes)
    canary = {**spec(), "canary": {"steps": [20, 100], "interval_seconds": 5, "min_requests": 106}}
    better = run(env, canary, "v2", digits["v2"])
    assert better["status"] == "canary", better["decision"]["outcome"]
    assert "canary rollout" in better["decision"]["outcome"]["reason"]
    assert champion_version(env) == 1  # the champion moves only when the rollout promotes
    with transaction(env) as session:
        rollout = repo.active_rollout(session, "digits-classifier")
        assert rollout is not None and rollout.run_id == better["run_id"]
        assert rollout.policy["steps"] == [20.0, 100.0] and rollout.current_step == 0
        assert repo.get_model_version_by_id(session, rollout.candidate_version_id).stage is e.ModelStage.CANARY

    again = run(env, canary, "v2b", digits["v2"])  # passes the gate too, but one rollout at a time
    assert again["status"] == "skipped"
    assert "already has an active rollout" in again["decision"]["outcome"]["reason"]
