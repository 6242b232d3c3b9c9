"""Dashboard pages against a long history: each page's p50/p99 with 100,000 runs in PostgreSQL
against the same page on an empty database. Target: p99 < 300 ms on the full one (issue 17).

Both databases are built as bench/flat_cost.py builds them (its `seed_pipelines` and `fill_history`):
200 pipelines, each with a champion, and pipeline p000's 120 probe runs as the newest; the full
database adds `--runs` older runs (10 linked events each, every tenth with a model version, an alias
move and a gate row). On both, probe run 110 has an active canary rollout at its first step. Pages,
signed in with a `read` key, in-process (`fastapi.testclient`), interleaved empty/full:

- /ui/ (pipelines: 200 cards, each with its last runs, rollout, schedule);
- /ui/runs/{id} (a run's decision record, with its canary);
- /ui/pipelines/p000/models (versions and alias history);
- /ui/pipelines/p000/rollout.json (what the live rollout page polls).

    .venv/bin/python bench/dashboard.py [--runs 100000] [--repeats 100]

The databases are created on RETRAINER_BENCH_POSTGRES_URL's server (default the local test server)
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench import flat_cost  # noqa: E402  (its fill: the same history as the flat-cost figures)
from bench.support.databases import postgres_database  # noqa: E402
from bench.support.measures import percentile  # noqa: E402

TARGET_P99_MS = 300.0
PROBE_RUN = flat_cost.run_id_of("probe", flat_cost.PROBE_RECORD_RUN)
PAGES: dict[str, str] = {
    "pipelines /ui/": "/ui/",
    "a run /ui/runs/{id}": f"/ui/runs/{PROBE_RUN}",
    "models /ui/pipelines/p000/models": "/ui/pipelines/p000/models",
    "rollout JSON .../rollout.json": "/ui/pipelines/p000/rollout.json",
}


@dataclass
class Database:
    label: str
    client: Any
    close: Callable[[], None]
    times: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, page: str) -> float:
        start = time.perf_counter()
        answer = self.client.get(PAGES[page])
        elapsed = (time.perf_counter() - start) * 1000
        assert answer.status_code == 200, (page, answer.status_code, answer.text[:500])
        return elapsed


def prepare(label: str, url: str, root: Path, runs: int) -> Database:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from domain.settings import load_settings
    from storage import repositories as repo
    from storage.artifacts.local import LocalArtifactStore
    from storage.db import create_db_engine, make_sessions, transaction

    work = root / label
    work.mkdir()
    engine = create_db_engine(url)
    sessions = make_sessions(engine)
    flat_cost.seed_pipelines(sessions, LocalArtifactStore((work / "artifacts").as_uri()), work)
    now = datetime.now(UTC)
    began = time.perf_counter()
    if runs:
        flat_cost.fill_history(
            engine, "bulk", runs=runs, spread=flat_cost.PIPELINES, newest=now - timedelta(days=1), base=2_000_000
        )
    flat_cost.fill_history(engine, "probe", runs=flat_cost.PROBE_RUNS, spread=1, newest=now, base=1_000_000)
    with transaction(sessions) as session:
        run = repo.get_run(session, PROBE_RUN)
        champion = repo.get_champion(session, "p000")
        assert run.model_version_id is not None and champion is not None
        rollout = repo.start_rollout(
            session, "p000", candidate_version_id=run.model_version_id, champion_version_id=champion.id,
            policy={"steps": [10.0, 50.0, 100.0]}, run_id=run.id,
        )  # fmt: skip
        repo.begin_rollout_step(session, rollout.id, traffic_percent=10.0)
        _key, secret = repo.create_api_key(session, "bench-reader")  # scope `read`
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    print(f"{label}: filled in {time.perf_counter() - began:.1f} s ({runs:,} runs of history)", flush=True)
    app = create_app(
        sessions=sessions, settings=load_settings(database_url=url, home_dir=work), submit=None,
        rate_limit_per_minute=10**9,
    )  # fmt: skip
    client = TestClient(app)
    signed = client.post("/ui/session", data={"api_key": secret}, follow_redirects=False)
    assert signed.status_code == 303, signed.text

    def close() -> None:
        client.close()
        engine.dispose()

    return Database(label, client, close)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=100_000, help=f"Runs of the full database ({flat_cost.EVENTS_PER_RUN} events each)."
    )
    parser.add_argument("--repeats", type=int, default=100, help="Measurements per page and database.")
    args = parser.parse_args()

    databases = postgres_database("dashboard_empty"), postgres_database("dashboard_full")
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp, databases[0] as empty_url, databases[1] as url:
        measure_all(prepare("empty", empty_url, Path(tmp), 0), prepare("full", url, Path(tmp), args.runs), args)


def measure_all(empty: Database, full: Database, args: argparse.Namespace) -> None:
    """Warm-up, then `--repeats` rounds of every page, empty and full interleaved; prints the table."""
    try:
        for _ in range(3):  # warm-up: connections, template compilation, caches
            for db in (empty, full):
                for page in PAGES:
                    db.measure(page)
        for repeat in range(args.repeats):
            for page in PAGES:
                for db in (empty, full) if repeat % 2 == 0 else (full, empty):
                    db.times.setdefault(page, []).append(db.measure(page))
        report(empty, full, args)
    finally:
        empty.close()
        full.close()


def report(empty: Database, full: Database, args: argparse.Namespace) -> None:
    print(
        f"\ndashboard pages: full = {args.runs:,} runs ({args.runs * flat_cost.EVENTS_PER_RUN:,} events), "
        f"{flat_cost.PIPELINES} pipelines; "
        f"empty = the same pipelines and probe runs only; {args.repeats} repeats, interleaved (ms)"
    )
    print(f"{'page':<36} | {'empty p50':>9} | {'empty p99':>9} | {'full p50':>9} | {'full p99':>9}")
    print("-" * 86)
    worst = 0.0
    for page in PAGES:
        e50, e99 = percentile(empty.times[page], 50), percentile(empty.times[page], 99)
        f50, f99 = percentile(full.times[page], 50), percentile(full.times[page], 99)
        worst = max(worst, f99)
        print(f"{page:<36} | {e50:9.1f} | {e99:9.1f} | {f50:9.1f} | {f99:9.1f}")
    verdict = "met" if worst < TARGET_P99_MS else "NOT met"
    print(f"\nworst full p99 {worst:.1f} ms (target < {TARGET_P99_MS:.0f} ms): {verdict}")


if __name__ == "__main__":
    main()
