"""A cron schedule really fires under `retrainer serve` (its own Prefect server and runner): the
scheduler creates the flow runs, the runner executes one at the minute, and the run is recorded as
a schedule trigger on the newest known dataset version."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import migrations
from domain import entities as e
from domain.settings import load_settings
from flows.records import decision_record
from retrainer import demo as story
from retrainer.service import free_port
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import retrainer_serve

pytestmark = pytest.mark.integration


def test_a_cron_schedule_fires_under_retrainer_serve(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml.demo_data import digits_versions

    api = f"127.0.0.1:{free_port()}"
    env = {
        **story.demo_environment(tmp_path / "home"),
        "RETRAINER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RETRAINER_API_ADDRESS": api,
        "RETRAINER_LOG_LEVEL": "INFO",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # the runner looks for due runs every 2 s (default 10)
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the service starts its own Prefect server
    settings = load_settings()
    story.create_topics(settings)

    spec = story.spec_for(story.Act("v1", "v1", "cron", "promoted", 2, {}))
    spec.pop("canary", None)
    spec["triggers"] = {"schedule": {"cron": "* * * * *", "timezone": "UTC"}, "manual": True}
    story.write_spec(settings.pipelines_dir, spec)
    data = digits_versions(tmp_path / "data")["v1"]
    migrations.upgrade(settings.database_url)
    sessions = make_sessions(create_db_engine(settings.database_url))
    with transaction(sessions) as session:  # a schedule trains on the newest known version of the dataset
        repo.record_dataset_version(session, spec["dataset"], "v1", data.as_uri())

    with retrainer_serve(api, tmp_path / "serve.log"):
        # The next minute boundary, then the runner's poll; the run itself takes seconds.
        deadline = time.monotonic() + 150
        run = None
        while time.monotonic() < deadline:
            with transaction(sessions) as session:
                runs = repo.list_runs(session, spec["name"], limit=10)
            scheduled = [r for r in runs if r.trigger_kind is e.TriggerKind.SCHEDULE]
            if scheduled and scheduled[-1].status.is_final:
                run = scheduled[-1]
                break
            time.sleep(2)
        assert run is not None, f"no finished scheduled run within 150 s; runs: {runs}"
        assert run.status is e.RunStatus.PROMOTED, run
        assert run.reason == "cron schedule" and run.event_ids == ()
        with transaction(sessions) as session:
            record = decision_record(session, run.id)
            champion = repo.get_champion(session, spec["name"])
        assert record["trigger"]["kind"] == "schedule"
        assert champion is not None and champion.id == run.model_version_id
    story.delete_topics(settings)
