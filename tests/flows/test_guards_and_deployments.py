"""Overrides (force-promotion, rollback, freeze, cooldown), Prefect deployments with the spec's
cron, the decision record on the CLI, and the whole flow against PostgreSQL and MinIO."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.errors import ConflictError, InvalidInputError
from domain.spec import parse_spec
from flows import champion as ops
from flows.pipeline import run_pipeline
from flows.registry import deployments, load_specs
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.flows.conftest import WEAK, event_run, spec

pytestmark = pytest.mark.integration


def run(sessions: sessionmaker[Session], document: dict[str, object], version: str, uri: Path) -> str:
    run_id = event_run(sessions, document, version, uri)
    run_pipeline("digits-classifier", run_id)
    with transaction(sessions) as session:
        return repo.get_run(session, run_id).status.value


def test_force_promotion_and_rollback_are_recorded(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    assert run(env, spec(**WEAK), "v1", digits["v1"]) == "promoted"
    assert run(env, spec(**WEAK), "v1-again", digits["v1"]) == "rejected"  # equal: the gate says no
    with transaction(env) as session, pytest.raises(InvalidInputError, match="justification"):
        ops.force_promote(session, "digits-classifier", 2, actor="ana", reason="ok")
    with transaction(env) as session:
        move = ops.force_promote(
            session, "digits-classifier", 2, actor="ana", reason="reviewed: same quality, newer data"
        )
    assert move.actor == "ana (force-promote)"
    with transaction(env) as session:
        back = ops.rollback(
            session, "digits-classifier", to_version=None, actor="bo", reason="latency regression seen in production"
        )
        assert repo.get_model_version_by_id(session, back.to_version_id or 0).version == 1
        assert repo.get_model_version(session, "digits-classifier", 2).stage is e.ModelStage.ROLLED_BACK
        history = [(m.actor, m.reason) for m in repo.alias_history(session, "digits-classifier")]
    assert history[0] == ("bo (rollback)", "latency regression seen in production")
    with transaction(env) as session, pytest.raises(ConflictError):
        ops.force_promote(session, "digits-classifier", 1, actor="ana", reason="already the champion, surely")


def test_freeze_and_cooldown_hold_a_passing_candidate(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    assert run(env, spec(**WEAK), "v1", digits["v1"]) == "promoted"
    with transaction(env) as session:
        ops.freeze(session, "digits-classifier", until=datetime.now(UTC) + timedelta(hours=1))
    assert run(env, spec(), "v2", digits["v2"]) == "skipped"  # gate passed, promotion held
    with transaction(env) as session:
        ops.freeze(session, "digits-classifier", until=None)
    cooled = spec()
    cooled["promotion"] = {"cooldown_seconds": 3600}
    assert run(env, cooled, "v2b", digits["v2"]) == "skipped"
    with transaction(env) as session:
        assert repo.get_champion(session, "digits-classifier").version == 1  # type: ignore[union-attr]


def test_each_pipeline_is_a_deployment_with_the_specs_cron(tmp_path: Path, prefect_server: None) -> None:
    document = spec()
    document["triggers"] = {"schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}}
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(document))
    other = copy.deepcopy(document)
    other["name"] = "digits-nightly"
    other["triggers"] = {}
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(other))
    specs = load_specs(tmp_path)
    built = {d.name: d for d in deployments(specs)}
    assert set(built) == {"digits-classifier", "digits-nightly"}
    deployment_id = built["digits-classifier"].apply()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.name == "digits-classifier" and stored.parameters == {"pipeline": "digits-classifier"}
    assert "pipeline:digits-classifier" in stored.tags
    (schedule,) = stored.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert built["digits-nightly"].schedules == []


def test_pipelines_deploy_puts_each_pipeline_on_a_work_pool(tmp_path: Path, prefect_server: str) -> None:
    """`retrainer pipelines deploy --pool` (the register-pipelines job of compose and k8s): registers the
    specs in SQL, creates the process work pool, and deploys each pipeline on it by module path."""
    document = spec()
    document["triggers"] = {"schedule": {"cron": "0 3 * * *", "timezone": "UTC"}}
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "digits.yaml").write_text(yaml.safe_dump(document))
    database = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(database)
    pool = f"test-pool-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, "PREFECT_API_URL": prefect_server, "RETRAINER_DATABASE_URL": database,
        "RETRAINER_PIPELINES_DIR": str(pipelines),
    }  # fmt: skip
    retrainer = str(Path(sys.executable).parent / "retrainer")
    for _ in range(2):  # again: the pool exists now, the deployment is updated
        done = subprocess.run(
            [retrainer, "pipelines", "deploy", "--pool", pool], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"deployment retrainer-pipeline/digits-classifier on work pool {pool}" in done.stdout

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        stored = client.read_deployment_by_name("retrainer-pipeline/digits-classifier")
    assert stored.work_pool_name == pool and stored.entrypoint == "flows.pipeline.run_pipeline"
    (schedule,) = stored.schedules
    assert schedule.schedule.cron == "0 3 * * *"
    with transaction(make_sessions(create_db_engine(database))) as session:
        assert repo.get_pipeline(session, "digits-classifier").dataset == document["dataset"]


def test_runs_show_prints_the_decision_record(env: sessionmaker[Session], digits: dict[str, Path]) -> None:
    run_id = event_run(env, spec(**WEAK), "v1", digits["v1"])
    run_pipeline("digits-classifier", run_id)
    retrainer = str(Path(sys.executable).parent / "retrainer")
    shown = subprocess.run(
        [retrainer, "runs", "show", run_id, "--json"], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["run_id"] == run_id and document["status"] == "promoted"
    assert document["decision"]["dataset"]["version"] == "v1" and document["decision"]["gate"]


def test_the_flow_on_postgresql_and_minio(
    digits: dict[str, Path],
    postgres_url: str,
    s3_endpoint_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    prefect_server: None,
) -> None:
    prefix = uuid.uuid4().hex
    monkeypatch.setenv("RETRAINER_DATABASE_URL", postgres_url)
    monkeypatch.setenv("RETRAINER_ARTIFACT_ROOT", f"s3://retrainer-test/flows/{prefix}")
    monkeypatch.setenv("RETRAINER_S3_ENDPOINT_URL", s3_endpoint_url)
    monkeypatch.setenv("RETRAINER_HOME_DIR", str(tmp_path / "home"))
    migrations.upgrade(postgres_url)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")
    s3.upload_file(str(digits["v1"]), "datasets", f"{prefix}/digits_v1.csv")
    document = spec(**WEAK)
    document["name"] = f"digits-{prefix[:8]}"  # the PostgreSQL database is shared by the suite
    parse_spec(document, source="test")
    sessions = make_sessions(create_db_engine(postgres_url))
    run_id = event_run(sessions, document, f"s3-{prefix}", f"s3://datasets/{prefix}/digits_v1.csv")
    outcome = run_pipeline(document["name"], run_id)
    assert outcome["status"] == "promoted"
    with transaction(sessions) as session:
        version = repo.get_model_version(session, document["name"], 1)
    assert version.artifact_uri.startswith(f"s3://retrainer-test/flows/{prefix}/sha256/")
    head = s3.head_object(Bucket="retrainer-test", Key=version.artifact_uri.split("retrainer-test/", 1)[1])
    assert head["Metadata"]["sha256"] == version.sha256
