"""Issue 15's split deployment: every part as its own process on loopback, against PostgreSQL (a
database of the test's own), MinIO, Kafka (a topic with 3 partitions) and a standalone
`prefect server start`:

    retrainer api · 2 x retrainer consume (one group) · retrainer triggers
    retrainer pipelines deploy → 2 x prefect worker start --pool retrainer (one run at a time each)
    2 x retrainer serve-models behind nginx · retrainer rollout supervise (through nginx)

The story: v1 events for two pipelines at once train on both workers at the same time and are
promoted; one consumer is SIGKILLed, then v2 events for both arrive (the other consumer takes the
partitions over: every event in the inbox exactly once); pipeline A's better candidate goes
through a canary with traffic sent through nginx, judged on both replicas' reports, and after its
first step one replica is SIGKILLed: the rollout completes on the other. Pipeline B's worker is
SIGKILLed while it trains its v2 run, after its first checkpoint is stored: Prefect marks that flow
run CRASHED, and the trigger service's reconciler (flows/reconcile.py) submits the run again; the
surviving worker resumes it from the checkpoint to a gate verdict.
Finally a worse candidate (v3, flipped labels) is rejected and every live replica still serves the
champion.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from flows.records import decision_record
from retrainer import demo as story
from retrainer.service import free_port
from retrainer.traffic import Traffic
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import SqlEvent
from tests.integration.split import Fleet, answered_by_upstream, bin_path, start_nginx, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # a dozen processes on two cores

PIPELINES = {"split-a": "digits-split-a", "split-b": "digits-split-b"}  # pipeline → dataset
EPOCHS = {"v1": 3, "v2": 12, "v3": 8}  # as the end-to-end story: v2 beats v1 with confidence
CANARY = {
    "steps": [50, 100],
    "interval_seconds": 2,
    "min_requests": 150,
    "max_prediction_psi": 0.25,
    "max_latency_p99_ratio": 1.5,
    "latency_p99_slack_ms": 10.0,
    "step_deadline_factor": 10.0,
}
# one flow run at a time per worker: two runs at once must land on both
WORKER = ["worker", "start", "--pool", "retrainer", "--type", "process", "--limit", "1", "--with-healthcheck"]
RUN_TIMEOUT_S = 240.0
CRASH_BOUND_S = 240.0  # the run whose worker died must be final by then: crash seen, resubmitted, resumed


def _spec(pipeline: str, version: str) -> dict[str, Any]:
    # only A rolls out through a canary: B's resumed v2 run is judged by its gate alone, with no traffic of its own
    canary = CANARY if pipeline == "split-a" else None
    document = story.merged(story.DEMO_SPEC, {"name": pipeline, "dataset": PIPELINES[pipeline], "canary": canary})
    document["hyperparameters"]["epochs"] = EPOCHS[version]
    return document


@contextmanager
def _fleet(tmp_path: Path, env: dict[str, str]) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path / "logs", env)
    try:
        yield fleet
    finally:
        fleet.close()


def _runs(sessions: sessionmaker[Session], pipeline: str) -> list[e.Run]:
    with transaction(sessions) as session:
        return repo.list_runs(session, pipeline, limit=20)


def _run_of(sessions: sessionmaker[Session], pipeline: str, event_id: str) -> e.Run | None:
    return next((r for r in _runs(sessions, pipeline) if event_id in r.event_ids), None)


def _why(sessions: sessionmaker[Session], run: e.Run) -> str:
    with transaction(sessions) as session:
        record = decision_record(session, run.id)
    outcome = record["decision"].get("outcome") or {}
    return f"{run.pipeline} run {run.id}: {record['status']}: {outcome.get('reason') or record.get('error')}"


def _worker_of(prefect_api: str, flow_run_id: str) -> str | None:
    """The worker that started the flow run, from Prefect's own record: the
    `prefect.worker.submitted-flow-run` event (a worker that lost the race for a run never emits it)."""
    answer = httpx.post(
        f"{prefect_api}/events/filter",
        json={
            "filter": {
                "event": {"name": ["prefect.worker.submitted-flow-run"]},
                "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            },
            "limit": 50,
        },
        timeout=10,
    )
    answer.raise_for_status()
    for event in answer.json()["events"]:
        runs = [r["prefect.resource.id"] for r in event["related"] if r.get("prefect.resource.role") == "flow-run"]
        if f"prefect.flow-run.{flow_run_id}" in runs:
            return str(event["resource"]["prefect.resource.name"])
    return None


def _training(prefect_api: str, flow_run_id: str) -> bool:
    """Whether the flow run's `train` task is running now (Prefect's task run state)."""
    answer = httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={
            "flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"name": {"like_": "train-"}, "state": {"type": {"any_": ["RUNNING"]}}},
        },
        timeout=10,
    )
    answer.raise_for_status()
    return bool(answer.json())


def _flow_runs(prefect_api: str, deployment: str) -> list[dict[str, Any]]:
    """Prefect's flow runs of `retrainer-pipeline/<deployment>`."""
    found = httpx.get(f"{prefect_api}/deployments/name/retrainer-pipeline/{deployment}", timeout=10)
    found.raise_for_status()
    answer = httpx.post(
        f"{prefect_api}/flow_runs/filter", json={"deployments": {"id": {"any_": [found.json()["id"]]}}}, timeout=10
    )
    answer.raise_for_status()
    runs: list[dict[str, Any]] = answer.json()
    return runs


def _served_version(url: str, pipeline: str) -> str:
    answer = httpx.get(f"{url}/v2/models/{pipeline}", timeout=5)
    assert answer.status_code == 200, answer.text
    versions: list[str] = [str(v) for v in answer.json()["versions"]]  # champion (and canary, while one is out)
    return ",".join(versions)


def test_the_split_deployment(
    tmp_path: Path, e2e_database: str, s3_endpoint_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumers.publisher import data_changed_event, publish_data_changed
    from ml.demo_data import digits_versions

    suffix, began = uuid.uuid4().hex[:8], datetime.now(UTC)
    files = digits_versions(tmp_path / "data")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)
    data = {}
    for key, path in files.items():
        s3.upload_file(str(path), "datasets", f"split-{suffix}/{path.name}")
        data[key] = f"s3://datasets/split-{suffix}/{path.name}"
    prefect_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RETRAINER_", "PREFECT_"))},
        **story.demo_environment(tmp_path / "home"),
        "RETRAINER_DATABASE_URL": e2e_database,
        "RETRAINER_ARTIFACT_ROOT": f"s3://retrainer-test/split-{suffix}",
        "RETRAINER_S3_ENDPOINT_URL": s3_endpoint_url,
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_API_ADDRESS": f"127.0.0.1:{free_port()}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a worker polls its pool every 10 s by default
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from domain.settings import load_settings

    settings = load_settings()
    story.create_topics(settings)  # 3 partitions
    for pipeline in PIPELINES:
        story.write_spec(settings.pipelines_dir, _spec(pipeline, "v1"))
    sessions = make_sessions(create_db_engine(e2e_database))
    published: list[str] = []

    def publish(pipeline: str, version: str) -> str:
        story.write_spec(settings.pipelines_dir, _spec(pipeline, version))
        with transaction(sessions) as session:  # what `retrainer pipelines sync` does after a spec edit
            repo.upsert_pipeline(session, pipeline, PIPELINES[pipeline], _spec(pipeline, version))
        event = data_changed_event(
            PIPELINES[pipeline], data[version], version=version, source="//retrainer/split-test",
            event_id=f"split-{pipeline}-{version}-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        published.append(publish_data_changed(settings.kafka_bootstrap_servers, settings.kafka_topic, event))
        return published[-1]

    with _fleet(tmp_path, env) as fleet:

        def final_run(pipeline: str, event_id: str, timeout_s: float = RUN_TIMEOUT_S) -> e.Run:
            def look() -> e.Run | None:
                run = _run_of(sessions, pipeline, event_id)
                return run if run is not None and run.status.is_final else None

            found = wait_for(look, timeout_s, fleet.logs_tail, every_s=1.0)
            assert isinstance(found, e.Run)
            return found

        fleet.once("migrate", "db", "upgrade")
        fleet.start(
            "prefect-server",
            [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            health=f"http://127.0.0.1:{prefect_port}/api/health",
        )
        assert "retrainer-pipeline/split-a" in fleet.once("deploy", "pipelines", "deploy", "--pool", "retrainer")
        workers = [
            fleet.start(
                f"worker-{i}",
                [bin_path("prefect"), *WORKER, "--name", f"worker-{i}"],
                extra={"PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port)},
                health=f"http://127.0.0.1:{port}/health",
            )
            for i, port in ((1, free_port()), (2, free_port()))
        ]
        api = fleet.retrainer("api", "api", health=f"http://{env['RETRAINER_API_ADDRESS']}/healthz")
        consumers = [fleet.with_health(f"consume-{i}", "consume") for i in (1, 2)]
        fleet.with_health("triggers", "triggers", "--interval", "0.5")
        replica_addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        replicas = [
            fleet.retrainer(
                f"serve-models-{i}",
                "serve-models",
                extra={"RETRAINER_SERVING_ADDRESS": address},
                health=f"http://{address}/healthz",
            )
            for i, address in enumerate(replica_addresses, start=1)
        ]
        _nginx, balanced = start_nginx(fleet, replica_addresses)
        fleet.with_health("rollout-supervise", "rollout", "supervise", "--serving-url", balanced)
        assert api.alive

        # --- act 1: two pipelines at once, on different workers, trained at the same time
        first = {pipeline: publish(pipeline, "v1") for pipeline in PIPELINES}
        runs = {pipeline: final_run(pipeline, event) for pipeline, event in first.items()}
        assert {p: r.status for p, r in runs.items()} == dict.fromkeys(PIPELINES, e.RunStatus.PROMOTED), [
            _why(sessions, r) for r in runs.values()
        ]
        by_worker = {p: _worker_of(env["PREFECT_API_URL"], str(r.prefect_flow_run_id)) for p, r in runs.items()}
        assert set(by_worker.values()) == {"worker-1", "worker-2"}, by_worker
        spans = [(r.started_at, r.finished_at) for r in runs.values()]
        starts, ends = [s for s, _ in spans if s is not None], [f for _, f in spans if f is not None]
        assert len(starts) == len(ends) == 2 and max(starts) < min(ends), f"the two runs did not overlap: {spans}"

        # --- act 2: one consumer dies; v2 for both; B's worker dies while it trains; a replica dies mid-canary
        consumers[0].kill()
        second = {pipeline: publish(pipeline, "v2") for pipeline in PIPELINES}

        def training_b() -> e.Run | None:
            """B's v2 run while its train task runs, once a checkpoint of it is in the artifact store."""
            run = _run_of(sessions, "split-b", second["split-b"])
            if run is None or run.status is not e.RunStatus.RUNNING or not run.prefect_flow_run_id:
                return None
            stored = s3.list_objects_v2(Bucket="retrainer-test", Prefix=f"split-{suffix}/runs/{run.id}/checkpoints/")
            if not stored.get("KeyCount"):
                return None
            return run if _training(env["PREFECT_API_URL"], str(run.prefect_flow_run_id)) else None

        b_run = wait_for(training_b, RUN_TIMEOUT_S, fleet.logs_tail)
        assert isinstance(b_run, e.Run)
        b_worker = next(
            w for w in workers if w.name == _worker_of(env["PREFECT_API_URL"], str(b_run.prefect_flow_run_id))
        )
        b_worker.kill()

        def canary_a() -> e.Rollout | None:
            with transaction(sessions) as session:
                rollout = repo.active_rollout(session, "split-a")
            return rollout

        rollout = wait_for(canary_a, RUN_TIMEOUT_S, fleet.logs_tail)
        assert isinstance(rollout, e.Rollout)
        rows, _labels = story.read_rows(files["v2"])
        traffic = Traffic(balanced, "split-a", rows, clients=3, rate_per_second=120, rows_per_request=4).start()
        try:

            def first_step_passed() -> bool:
                with transaction(sessions) as session:
                    current = repo.list_rollouts(session, "split-a", limit=1)[0]
                return current.current_step >= 1 or current.status is not e.RolloutStatus.ACTIVE

            wait_for(first_step_passed, RUN_TIMEOUT_S, fleet.logs_tail)
            replicas[1].kill()
            a_run = final_run("split-a", second["split-a"])
        finally:
            sent = traffic.stop()
        assert a_run.status is e.RunStatus.PROMOTED, _why(sessions, a_run)
        with transaction(sessions) as session:
            done = repo.list_rollouts(session, "split-a", limit=1)[0]
            champion_a = repo.get_champion(session, "split-a")
        assert done.status is e.RolloutStatus.PROMOTED and champion_a is not None
        assert champion_a.id == a_run.model_version_id
        judged = done.steps[0].analysis.decisive
        assert judged is not None and done.steps[0].verdict is e.Verdict.PASS, done.steps[0]
        shares = {s.replica: s for s in judged.replicas}
        assert len(shares) == 2 and all(s.canary_requests > 0 and s.champion_requests > 0 for s in shares.values()), (
            shares
        )
        assert sum(s.canary_requests for s in shares.values()) == judged.canary.requests, judged
        assert sum(s.champion_requests for s in shares.values()) == judged.champion.requests, judged
        last = done.steps[-1].analysis.decisive
        assert last is not None and len(last.replicas) == 1, last  # completed on the remaining replica
        assert sent.sent > 0 and sent.by_version, sent
        time.sleep(3)  # the live replica's last report
        with transaction(sessions) as session:
            # every window of split-a since the test began: all its traffic is the test's, and a report
            # that opened before the rollout did may hold its first requests
            reported = repo.fleet_windows(session, "split-a", began)
        reported_by_pid = {int(r.rsplit("-", 2)[-2]): sum(w.requests for w in ws) for r, ws in reported.items()}
        through_nginx = answered_by_upstream(fleet, "/infer")
        assert sum(through_nginx.values()) == sum(sent.by_version.values()), (through_nginx, sent)
        live, dead = (reported_by_pid[r.popen.pid] for r in replicas)
        live_nginx, dead_nginx = (through_nginx[a] for a in replica_addresses)
        # every request the live replica answered is in its reports (±2 %); the killed one lost at
        # most its last unreported second
        assert abs(live - live_nginx) <= 0.02 * live_nginx, (live, live_nginx)
        assert 0 < dead <= dead_nginx, (dead, dead_nginx)

        # B's worker died mid-training. Prefect's process worker runs the flow in a child process whose
        # output it streams; the child outlives the SIGKILL but then exits (SystemExit 1) and Prefect
        # marks the flow run CRASHED, rescheduling nothing. The flow's handler leaves a crash alone; the
        # trigger service's reconciler submits the run again as a new flow run (idempotency key
        # `{run_id}:1`), which the surviving worker resumes from the stored checkpoint to a verdict.
        b_final = final_run("split-b", second["split-b"], CRASH_BOUND_S)
        assert b_final.status in (e.RunStatus.PROMOTED, e.RunStatus.REJECTED), _why(sessions, b_final)
        crashed = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{b_run.prefect_flow_run_id}", timeout=10).json()
        assert crashed["state_type"] == "CRASHED", crashed["state"]
        assert b_final.evidence is not None
        [resubmit] = b_final.evidence["resubmits"]
        assert resubmit["attempt"] == 1 and resubmit["crashed_flow_run"] == b_run.prefect_flow_run_id, resubmit
        assert b_final.evidence["training"]["resumed_from_step"], b_final.evidence["training"]  # not from scratch
        survivor = next(w.name for w in workers if w is not b_worker)
        assert b_final.prefect_flow_run_id != b_run.prefect_flow_run_id
        assert _worker_of(env["PREFECT_API_URL"], str(b_final.prefect_flow_run_id)) == survivor

        # --- act 3: a worse candidate is rejected; the champion is untouched on every live replica
        third = publish("split-a", "v3")
        bad = final_run("split-a", third)
        assert bad.status is e.RunStatus.REJECTED, _why(sessions, bad)
        with transaction(sessions) as session:
            after = repo.get_champion(session, "split-a")
            champion_b = repo.get_champion(session, "split-b")
            inbox = session.scalar(
                select(func.count()).select_from(SqlEvent).where(SqlEvent.dataset.in_(PIPELINES.values()))
            )
            rollouts = repo.list_rollouts(session, "split-a")
        assert after is not None and after.version == champion_a.version
        b_champion = b_final if b_final.status is e.RunStatus.PROMOTED else runs["split-b"]  # else v1's is kept
        assert champion_b is not None and champion_b.id == b_champion.model_version_id
        assert [len(_runs(sessions, p)) for p in PIPELINES] == [3, 2]  # one run per event, B's retried in place
        # one flow run per run, plus the one B's crashed run was submitted again as
        assert [len(_flow_runs(env["PREFECT_API_URL"], p)) for p in PIPELINES] == [3, 3]
        assert [r.status for r in rollouts] == [e.RolloutStatus.PROMOTED], rollouts
        for replica, address in zip(replicas, replica_addresses, strict=True):
            if replica.alive:
                assert _served_version(f"http://{address}", "split-a") == str(champion_a.version)
        assert _served_version(balanced, "split-a") == str(champion_a.version)
        # a replica started now (the killed one's replacement) loads the same champions
        fresh = f"127.0.0.1:{free_port()}"
        fleet.retrainer(
            "serve-models-3",
            "serve-models",
            extra={"RETRAINER_SERVING_ADDRESS": fresh},
            health=f"http://{fresh}/healthz",
        )
        assert _served_version(f"http://{fresh}", "split-a") == str(champion_a.version)
        assert _served_version(f"http://{fresh}", "split-b") == str(champion_b.version)
        # no event lost or doubled across the consumer's death and the rebalance
        assert inbox == len(published) == 5, (inbox, published)
        assert all(c.alive for c in consumers[1:]) and not consumers[0].alive
    story.delete_topics(settings)
