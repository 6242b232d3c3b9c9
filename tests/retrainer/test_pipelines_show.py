"""`retrainer pipelines show` lists the model-server replicas serving a pipeline and what each serves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from domain.evidence import ReplicaServing, ServingReplica
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.retrainer.test_cli_errors import run_cli


def test_pipelines_show_lists_each_replica_with_its_versions_weight_and_state(tmp_path: Path) -> None:
    assert run_cli("db", "upgrade", tmp_path=tmp_path).returncode == 0
    engine = create_db_engine(f"sqlite:///{tmp_path / '.retrainer' / 'retrainer.db'}")
    now = datetime.now(UTC)
    with transaction(make_sessions(engine)) as s:
        repo.upsert_pipeline(s, "digits", "digits", {"name": "digits"})
        for name, age in (("replica-a", 0.0), ("replica-b", 60.0)):
            serving = {
                "digits": ReplicaServing(champion_version="3", canary_version="4", canary_weight=25.0, since=now)
            }
            heard = now - timedelta(seconds=age)
            replica = ServingReplica(
                replica=name, address=f"http://{name}:8080", started_at=heard, heartbeat_at=heard,
                reports_windows=True, serving=serving,
            )  # fmt: skip
            repo.report_replica(s, replica, seq=1, window_start=heard)
    engine.dispose()

    shown = run_cli("pipelines", "show", "digits", tmp_path=tmp_path, COLUMNS="250")

    assert shown.returncode == 0, shown.stderr
    assert "digits (dataset digits): champion none yet" in shown.stdout
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if "replica-" in line}
    assert sorted(rows) == ["replica-a", "replica-b"]
    cells = [cell.strip() for cell in rows["replica-a"].strip("│ ").split("│")]
    assert cells[:5] == ["replica-a", "http://replica-a:8080", "3", "4", "25"] and cells[-1] == "live"
    assert rows["replica-b"].rstrip(" │").endswith("missing")


def test_pipelines_show_of_an_unknown_pipeline_fails_naming_it(tmp_path: Path) -> None:
    assert run_cli("db", "upgrade", tmp_path=tmp_path).returncode == 0
    shown = run_cli("pipelines", "show", "nope", tmp_path=tmp_path)
    assert shown.returncode != 0 and "nope" in shown.stderr
