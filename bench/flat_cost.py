"""Flat cost: every per-pass and per-request figure on a PostgreSQL database holding a long history
(1,000,000 inbox events, 100,000 runs over 200 pipelines) against the same figure on an empty one.
Target: full within 2x of empty (issue 15, item 7).

Both databases hold the same 200 pipelines (two per dataset, debounce 0, `while_running: supersede`),
each with a champion (all 200 share one tiny registered package, so the follow pass loads real
models without 200 trainings), and the same probe history of pipeline p000: 120 runs of 10 events
each, the newest runs of both databases, so each figure does the same work on both and only the
size of the tables around it differs. The full database adds the long history behind it (older runs,
all events linked, every tenth run with a model version, an alias move and a gate row), filled with
INSERT … SELECT generate_series. Figures, interleaved empty/full repeat by repeat:

- debouncer pass: `process_pending_events` over 10 fresh events of 5 datasets (10 runs created);
- trigger latency: one event into the inbox → its Run row, through `process_pending_events`;
- API (in-process, `fastapi.testclient`): the newest page of GET /api/v1/runs, one pipeline's page,
  a page far into the history through `?cursor=`, and GET /api/v1/runs/{id} (the decision record);
- follow pass: `serving.loader.sync_from_metadata` over the 200 pipelines' champions (steady state).

    .venv/bin/python bench/flat_cost.py [--events 1000000] [--runs 100000] [--repeats 40]
    .venv/bin/python bench/flat_cost.py --schema 0005   # the same, without revision 0006's indexes

`--explain` prints EXPLAIN ANALYZE of the queries that grow with the history, on the full database.
The databases are created on RETRAINER_BENCH_POSTGRES_URL's server (default the local test server)
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from bench.support.databases import postgres_database  # noqa: E402
from bench.support.measures import percentile  # noqa: E402

PIPELINES = 200
EVENTS_PER_RUN = 10
PROBE_RUNS = 120  # p000's newest runs on both databases: more than two pages of 50
PAGE = 50
DEBOUNCE_DATASETS = 5  # datasets d010.. get two fresh events each per debouncer pass
PROBE_RECORD_RUN = 110  # a probe run with a model version, an alias move and a gate row


def pipeline_name(index: int) -> str:
    return f"p{index:03d}"


def run_id_of(tag: str, number: int) -> str:
    """The id the fill gives run `number` of a history: md5(tag || number) as a UUID (as in SQL)."""
    return str(uuid.UUID(hashlib.md5(f"{tag}{number}".encode()).hexdigest()))  # noqa: S324 - an id, not security


# ----------------------------------------------------------------------------------------- fill

# One history: `runs` runs spread over the first `spread` pipelines, the newest at :newest, one a
# minute before it; EVENTS_PER_RUN linked events each; every tenth run a retired model version (number
# :base + g), the alias move to it and its gate row. Every statement is one INSERT … SELECT.
_HISTORY = (
    """
    INSERT INTO runs (id, pipeline_id, trigger_kind, status, reason, dedupe_key, prefect_flow_run_id,
                      evidence, created_at, started_at, finished_at)
    SELECT md5(:tag || g)::uuid::text, p.id, 'event', 'promoted', 'bench history', 'events:' || :tag || g,
           'flow-' || :tag || g, '{"outcome": "promoted", "training": {"epochs": 3}}'::jsonb,
           at.t, at.t + interval '1 second', at.t + interval '50 seconds'
    FROM generate_series(0, :runs - 1) AS g
    JOIN pipelines p ON p.name = 'p' || lpad((g % :spread)::text, 3, '0')
    CROSS JOIN LATERAL (SELECT CAST(:newest AS timestamptz) - (:runs - 1 - g) * interval '1 minute' AS t) AS at
    """,
    """
    INSERT INTO events (event_id, source, type, dataset, topic, partition, "offset", status, payload, received_at)
    SELECT :tag || '-ev-' || g, 'bench', 'retrainer.dataset.changed',
           'd' || lpad((((g / :per_run) % :spread) / 2)::text, 3, '0'), 'retrainer.data-changes', 0, g, 'linked',
           jsonb_build_object('version', g),
           CAST(:newest AS timestamptz) - (:runs * :per_run - g) * interval '6 seconds'
    FROM generate_series(0, :runs * :per_run - 1) AS g
    """,
    """
    INSERT INTO run_events (run_id, event_pk)
    SELECT md5(:tag || (e."offset" / :per_run))::uuid::text, e.id FROM events e WHERE e.event_id LIKE :tag || '-ev-%'
    """,
    """
    INSERT INTO model_versions (pipeline_id, version, run_id, artifact_uri, sha256, size_bytes, metrics, stage,
                                created_at, stage_changed_at)
    SELECT r.pipeline_id, :base + g, r.id, 'file:///bench/history', repeat('0', 64), 1, '{"accuracy": 0.9}',
           'retired', r.finished_at, r.finished_at
    FROM generate_series(0, :runs - 1, 10) AS g JOIN runs r ON r.id = md5(:tag || g)::uuid::text
    """,
    """
    UPDATE runs SET model_version_id = mv.id FROM model_versions mv
    WHERE mv.run_id = runs.id AND mv.version >= :base AND mv.version < :base + 1000000
    """,
    """
    INSERT INTO alias_history (pipeline_id, alias, to_version_id, run_id, actor, reason, moved_at)
    SELECT mv.pipeline_id, 'champion', mv.id, mv.run_id, 'bench', 'bench history', mv.created_at
    FROM model_versions mv WHERE mv.version >= :base AND mv.version < :base + 1000000
    """,
    """
    INSERT INTO gate_decisions (run_id, model_version_id, metric, "check", verdict, candidate_value, champion_value,
                                threshold, reason, created_at)
    SELECT r.id, r.model_version_id, 'accuracy', 'min_improvement', 'pass', 0.91, 0.9, 0.0, 'bench', r.finished_at
    FROM runs r WHERE r.model_version_id IS NOT NULL AND r.dedupe_key LIKE 'events:' || :tag || '%'
    """,
)


def fill_history(engine: Engine, tag: str, *, runs: int, spread: int, newest: datetime, base: int) -> None:
    params = {"tag": tag, "runs": runs, "spread": spread, "newest": newest, "base": base, "per_run": EVENTS_PER_RUN}
    with engine.begin() as conn:
        for statement in _HISTORY:
            conn.execute(text(statement), params)


def seed_pipelines(sessions: sessionmaker[Session], store: Any, work: Path) -> None:
    """The 200 pipelines, each with a champion: one tiny MLP package shared by every version row."""
    import numpy as np
    import torch

    from ml.package import MANIFEST_FORMAT, save_package
    from ml.standardizer import Standardizer
    from ml.zoo import build_model
    from storage import repositories as repo
    from storage.db import transaction
    from storage.orm import SqlModelVersion, SqlPipeline

    torch.manual_seed(0)
    features = 4
    manifest = {
        "format": MANIFEST_FORMAT,
        "architecture": "mlp",
        "params": {"hidden_sizes": [4]},
        "variant": "none",
        "input_shape": [features],
        "output_classes": 2,
        "standardizer": Standardizer(np.zeros(features, np.float32), np.ones(features, np.float32)).to_dict(),
        "feature_names": [f"f{i}" for i in range(features)],
    }
    module = build_model("mlp", {"hidden_sizes": [4]}, [features], 2)
    ref = store.put_file(save_package(module, manifest, work / "tiny.pt").path)
    events = {"debounce_seconds": 0, "max_wait_seconds": 600, "while_running": "supersede"}
    with transaction(sessions) as session:
        for index in range(PIPELINES):
            name = pipeline_name(index)
            spec = {"name": name, "dataset": f"d{index // 2:03d}", "triggers": {"events": events}}
            pipeline = repo.upsert_pipeline(session, name, f"d{index // 2:03d}", spec)
            champion = SqlModelVersion(
                pipeline_id=pipeline.id, version=1, artifact_uri=ref.uri, sha256=ref.sha256, size_bytes=ref.size,
                metrics={}, manifest=manifest, stage="champion",
            )  # fmt: skip
            session.add(champion)
            session.flush()
            session.get_one(SqlPipeline, pipeline.id).champion_version_id = champion.id


# ---------------------------------------------------------------------------------- measurement


@dataclass
class Database:
    label: str
    url: str
    sessions: sessionmaker[Session]
    engine: Engine
    client: Any = None
    registry: Any = None
    store: Any = None
    deep_cursor: str = ""
    fresh: int = 0  # events added so far (unique ids)
    times: dict[str, list[float]] = field(default_factory=dict)

    def record(self, figure: str, seconds: float) -> None:
        self.times.setdefault(figure, []).append(seconds * 1000)


def _new_events(db: Database, datasets: list[str]) -> list[Any]:
    from storage import repositories as repo

    events = []
    for dataset in datasets:
        db.fresh += 1
        events.append(
            repo.NewInboxEvent(f"fresh-{db.fresh}", "bench", "retrainer.dataset.changed", dataset, {"n": db.fresh})
        )
    return events


def debouncer_pass(db: Database) -> float:
    from flows.triggers import process_pending_events
    from storage import repositories as repo
    from storage.db import transaction

    datasets = [f"d{10 + i:03d}" for i in range(DEBOUNCE_DATASETS)] * 2
    with transaction(db.sessions) as session:
        repo.add_many_to_inbox(session, _new_events(db, datasets))
    start = time.perf_counter()
    results = process_pending_events(db.sessions)
    elapsed = time.perf_counter() - start
    assert sum(r.created for r in results) == 2 * DEBOUNCE_DATASETS, results
    return elapsed


def trigger_latency(db: Database) -> float:
    from flows.triggers import process_pending_events
    from storage import repositories as repo
    from storage.db import transaction

    start = time.perf_counter()
    with transaction(db.sessions) as session:
        repo.add_many_to_inbox(session, _new_events(db, ["d020"]))
    results = process_pending_events(db.sessions)
    elapsed = time.perf_counter() - start
    assert [r.run.pipeline for r in results if r.created] == ["p040", "p041"], results
    return elapsed


def _get(db: Database, path: str, **params: str | int) -> float:
    start = time.perf_counter()
    response = db.client.get(path, params=params)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    body = response.json()
    assert "decision" in body or len(body["runs"]) == PAGE, (path, params, len(body.get("runs", [])))
    return elapsed


def follow_pass(db: Database) -> float:
    from serving.loader import sync_from_metadata

    start = time.perf_counter()
    report = sync_from_metadata(db.registry, db.sessions, db.store)
    elapsed = time.perf_counter() - start
    assert len(report) == PIPELINES and all(line.startswith("unchanged") for line in report.values()), report
    return elapsed


FIGURES: dict[str, Callable[[Database], float]] = {
    "debouncer pass (10 events, 5 datasets)": debouncer_pass,
    "trigger latency (event -> Run row)": trigger_latency,
    "GET /runs newest page": lambda db: _get(db, "/api/v1/runs", limit=PAGE),
    "GET /runs?pipeline= page": lambda db: _get(db, "/api/v1/runs", pipeline="p000", limit=PAGE),
    "GET /runs?cursor= deep page": lambda db: _get(db, "/api/v1/runs", limit=PAGE, cursor=db.deep_cursor),
    "GET /runs/{id} decision record": lambda db: _get(db, f"/api/v1/runs/{run_id_of('probe', PROBE_RECORD_RUN)}"),
    f"follow pass ({PIPELINES} champions)": follow_pass,
}


# ---------------------------------------------------------------------------------------- setup


def prepare(label: str, url: str, work: Path, *, events: int, runs: int, schema: str) -> Database:
    import migrations
    from api.app import create_app
    from api.paging import encode_run_cursor
    from domain.settings import load_settings
    from serving.loader import sync_from_metadata
    from serving.registry import ModelRegistry
    from storage import repositories as repo
    from storage.artifacts.local import LocalArtifactStore
    from storage.db import create_db_engine, make_sessions, transaction

    engine = create_db_engine(url)
    db = Database(label, url, make_sessions(engine), engine)
    db.store = LocalArtifactStore((work / "artifacts").as_uri())
    seed_pipelines(db.sessions, db.store, work)
    now = datetime.now(UTC)
    began = time.perf_counter()
    if runs:
        fill_history(engine, "bulk", runs=runs, spread=PIPELINES, newest=now - timedelta(days=1), base=2_000_000)
        assert runs * EVENTS_PER_RUN == events, "--events must be --runs x 10 (each run links 10 events)"
    fill_history(engine, "probe", runs=PROBE_RUNS, spread=1, newest=now, base=1_000_000)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    print(f"{label}: filled in {time.perf_counter() - began:.1f} s", flush=True)
    if schema != "head":
        migrations.downgrade(url, schema)
        # the API of this checkout reads API keys' scopes (revision 0007); the bench measures indexes only
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE api_keys ADD COLUMN scopes VARCHAR(200) NOT NULL DEFAULT 'read'"))
    with transaction(db.sessions) as session:
        _key, secret = repo.create_api_key(session, "bench")
        # Far into the history: the full database's middle run; on the empty one, a probe run with a
        # full page of older probe runs behind it.
        tag, number = ("bulk", runs // 2) if runs else ("probe", PAGE + 10)
        middle = repo.get_run(session, run_id_of(tag, number))
    db.deep_cursor = encode_run_cursor(repo.RunPosition(middle.created_at, middle.id))
    from fastapi.testclient import TestClient

    settings = load_settings(database_url=url, home_dir=work)
    app = create_app(sessions=db.sessions, settings=settings, submit=None, rate_limit_per_minute=10**9)
    db.client = TestClient(app, headers={"X-API-Key": secret})
    db.registry = ModelRegistry()
    sync_from_metadata(db.registry, db.sessions, db.store)  # loads the 200 champions once
    return db


def explain(db: Database) -> None:
    """EXPLAIN ANALYZE of the queries whose cost could grow with the history."""
    queries = {
        "datasets with pending events": "SELECT DISTINCT dataset FROM events WHERE status = 'received'",
        "a dataset's pending events": "SELECT id FROM events WHERE dataset = 'd010' AND status = 'received' "
        "ORDER BY id FOR UPDATE SKIP LOCKED",
        "runs page": "SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 51",
        "pipeline's runs page": "SELECT id FROM runs WHERE pipeline_id = (SELECT id FROM pipelines WHERE name = "
        "'p000') ORDER BY created_at DESC, id DESC LIMIT 51",
        "alias moves of a run": "SELECT id FROM alias_history WHERE run_id = :run_id",
    }
    run_id = run_id_of("probe", PROBE_RECORD_RUN)
    with db.engine.connect() as conn:
        for title, query in queries.items():
            plan = conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF) " + query), {"run_id": run_id}).scalars().all()
            print(f"\n-- {title}\n" + "\n".join(plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="Inbox events of the full database.")
    parser.add_argument("--runs", type=int, default=100_000, help="Runs of the full database (10 events each).")
    parser.add_argument("--repeats", type=int, default=150, help="Measurements per figure and database.")
    parser.add_argument("--schema", default="head", help="Measure at this revision, e.g. 0005 (no 0006 indexes).")
    parser.add_argument("--explain", action="store_true", help="Print the full database's query plans.")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="flat-cost-") as tmp,
        postgres_database("flat_cost_empty") as empty_url,
        postgres_database("flat_cost_full") as full_url,
    ):
        work = Path(tmp)
        (work / "empty").mkdir()
        (work / "full").mkdir()
        empty = prepare("empty", empty_url, work / "empty", events=0, runs=0, schema=args.schema)
        full = prepare("full", full_url, work / "full", events=args.events, runs=args.runs, schema=args.schema)
        for _ in range(3):  # warm-up: connections, caches, the app's first requests
            for db in (empty, full):
                for measure in FIGURES.values():
                    measure(db)
        for repeat in range(args.repeats):
            for figure, measure in FIGURES.items():
                for db in (empty, full) if repeat % 2 == 0 else (full, empty):
                    db.record(figure, measure(db))
        if args.explain:
            explain(full)
        report(empty, full, args)
        for db in (empty, full):
            db.client.close()
            db.engine.dispose()


def report(empty: Database, full: Database, args: argparse.Namespace) -> None:
    print(
        f"\nflat cost at schema {args.schema}: full = {args.events:,} events, {args.runs:,} runs, {PIPELINES} "
        f"pipelines; empty = the same pipelines and probe runs only; {args.repeats} repeats, interleaved (ms)"
    )
    print(f"{'figure':<48} | {'empty':>8} | {'full':>8} | {'ratio':>6}")
    print("-" * 80)
    worst = 0.0
    for figure in FIGURES:
        for q in (50, 99):
            small, big = percentile(empty.times[figure], q), percentile(full.times[figure], q)
            ratio = big / small
            worst = max(worst, ratio)
            print(f"{figure + f' p{q}':<48} | {small:8.2f} | {big:8.2f} | {ratio:5.2f}x")
    print(f"\nworst ratio {worst:.2f}x (target <= 2x): {'met' if worst <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
