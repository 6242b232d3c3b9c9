"""The one door submits to the pipeline's real Prefect deployment, once per Run row."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.registry import deployments, load_specs, sync_pipelines
from flows.triggers import (
    DeploymentNotFoundError,
    TriggerRequest,
    prefect_submitter,
    request_run,
    submit_unsubmitted_runs,
)
from storage import repositories as repo
from storage.db import transaction
from tests.flows.conftest import spec

pytestmark = pytest.mark.integration


def test_a_manual_trigger_creates_one_run_and_one_flow_run(env: sessionmaker[Session], tmp_path: Path) -> None:
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "digits.yaml").write_text(yaml.safe_dump(spec()))
    specs = load_specs(tmp_path / "pipelines")
    with transaction(env) as session:
        sync_pipelines(session, specs)
    for deployment in deployments(specs):
        deployment.apply()
    submit = prefect_submitter()
    request = TriggerRequest(e.TriggerKind.MANUAL, reason="test", idempotency_key="key-1", request_sha256="a" * 64)
    first = request_run(env, "digits-classifier", request, submit)
    again = request_run(env, "digits-classifier", request, submit)
    assert first.created and not again.created and again.run.id == first.run.id
    assert first.run.prefect_flow_run_id

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first.run.prefect_flow_run_id)
        deployment = client.read_deployment(flow_run.deployment_id)  # type: ignore[arg-type]
    assert deployment.name == "digits-classifier"
    assert flow_run.parameters == {"pipeline": "digits-classifier", "run_id": first.run.id}
    assert {"pipeline:digits-classifier", "trigger:manual"} <= set(flow_run.tags)
    # Prefect's own idempotency: submitting the same Run row again returns the same flow run
    assert submit(first.run) == first.run.prefect_flow_run_id
    with transaction(env) as session:
        assert len(repo.list_runs(session, "digits-classifier")) == 1


def test_a_failed_submission_is_retried_by_the_next_identical_request(env: sessionmaker[Session]) -> None:
    with transaction(env) as session:
        repo.upsert_pipeline(session, "digits-classifier", "digits", spec())
    calls: list[str] = []

    def flaky(run: e.Run) -> str | None:
        calls.append(run.id)
        if len(calls) == 1:
            raise ConnectionError("Prefect API unavailable")
        return "flow-run-1"

    request = TriggerRequest(e.TriggerKind.MANUAL, idempotency_key="k-retry", request_sha256="b" * 64)
    first = request_run(env, "digits-classifier", request, flaky)  # Prefect down: queued, not an error
    assert first.created and first.run.status is e.RunStatus.QUEUED and first.run.prefect_flow_run_id is None
    retried = request_run(env, "digits-classifier", request, flaky)
    assert not retried.created and retried.run.prefect_flow_run_id == "flow-run-1"
    assert calls == [retried.run.id, retried.run.id]
    request_run(env, "digits-classifier", request, flaky)
    assert len(calls) == 2  # once submitted, never again


def test_a_pipeline_without_a_deployment_fails_its_run_naming_the_deployment_and_the_fix(
    env: sessionmaker[Session],
) -> None:
    name = "never-deployed"  # the session's Prefect server has the other tests' deployments
    with transaction(env) as session:
        repo.upsert_pipeline(session, name, "digits", {**spec(), "name": name})  # registered, never deployed
        run, _ = repo.create_run(session, name, e.TriggerKind.MANUAL)
    assert submit_unsubmitted_runs(env, prefect_submitter()) == []  # a permanent refusal: no retry, no error
    with transaction(env) as session:
        failed = repo.get_run(session, run.id)
    assert failed.status is e.RunStatus.FAILED and failed.prefect_flow_run_id is None
    assert failed.error is not None
    assert f"no deployment 'retrainer-pipeline/{name}'" in failed.error
    assert "retrainer pipelines deploy" in failed.error

    request = TriggerRequest(e.TriggerKind.MANUAL, idempotency_key="k-none", request_sha256="c" * 64)
    with pytest.raises(DeploymentNotFoundError) as refused:  # the API's door says it too
        request_run(env, name, request, prefect_submitter())
    assert refused.value.code == "deployment_not_found"
