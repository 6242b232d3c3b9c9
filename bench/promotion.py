"""Promotion → served: how long after the champion alias moves in PostgreSQL a separate
`retrainer serve-models` process serves the new version, pushed (the move's NOTIFY wakes the
server's follower, storage/notify.py) vs polled (a move that notifies nobody waits for the
follower's refresh, `--refresh`, 10 s by default as in `retrainer serve-models`).

Each promotion alternates the champion between two registered versions and polls the server's
`GET /v2/models/{pipeline}` every 2 ms until its first version is the new champion. Target: <= 1 s
(issue 15, item 3).

    .venv/bin/python bench/promotion.py [--pushed 100] [--polled 10] [--refresh 10]

The database is created on RETRAINER_BENCH_POSTGRES_URL's server (default the local test server)
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.support.databases import postgres_database  # noqa: E402
from bench.support.measures import percentile  # noqa: E402

PIPELINE, FEATURES, CLASSES = "promo", 4, 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def register_versions(sessions: Any, store: Any, work: Path) -> list[tuple[int, int]]:
    """Two tiny models registered for PIPELINE, the first as champion: [(version id, version)]."""
    import numpy as np
    import torch

    from ml.data import Standardizer
    from ml.package import MANIFEST_FORMAT, save_package
    from ml.zoo import build_model
    from storage import repositories as repo
    from storage.db import transaction

    scale = Standardizer(mean=np.zeros(FEATURES, np.float32), std=np.ones(FEATURES, np.float32))
    manifest = {"format": MANIFEST_FORMAT, "architecture": "mlp", "params": {"hidden_sizes": [8]}, "variant": "none",
                "input_shape": [FEATURES], "output_classes": CLASSES, "standardizer": scale.to_dict(),
                "feature_names": [f"x{i}" for i in range(FEATURES)]}  # fmt: skip
    versions = []
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, PIPELINE, {"name": PIPELINE})
    for seed in (1, 2):
        torch.manual_seed(seed)
        module = build_model("mlp", {"hidden_sizes": [8]}, [FEATURES], CLASSES)
        ref = store.put_file(save_package(module, manifest, work / f"m{seed}.pt").path)
        with transaction(sessions) as session:
            version = repo.register_model_version(
                session,
                PIPELINE,
                artifact_uri=ref.uri,
                sha256=ref.sha256,
                size_bytes=ref.size,
                metrics={},
                manifest=manifest,
            )
        versions.append((version.id, version.version))
    with transaction(sessions) as session:
        repo.move_champion(
            session, PIPELINE, versions[0][0], expected_from_version_id=None, actor="bench", reason="first"
        )
    return versions


def served_version(url: str) -> str | None:
    try:
        answer = httpx.get(f"{url}/v2/models/{PIPELINE}", timeout=2.0)
    except httpx.HTTPError:
        return None
    return str(answer.json()["versions"][0]) if answer.status_code == 200 else None


def promotions(count: int, versions: list[tuple[int, int]], url: str, move: Callable[[int, int], None]) -> list[float]:
    """`count` promotions, each timed from just before `move(from_id, to_id)` commits to the
    server's first answer naming the new champion (ms)."""
    latencies = []
    for i in range(count):
        (from_id, _), (to_id, to_version) = versions[i % 2], versions[(i + 1) % 2]
        started = time.perf_counter()
        move(from_id, to_id)
        while served_version(url) != str(to_version):
            if time.perf_counter() - started > 60:
                raise TimeoutError(f"v{to_version} not served within 60 s of its promotion")
            time.sleep(0.002)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushed", type=int, default=100, help="Promotions through move_champion (NOTIFY).")
    parser.add_argument("--polled", type=int, default=10, help="Promotions that notify nobody.")
    parser.add_argument("--refresh", type=float, default=10.0, help="The model server's refresh interval (s).")
    args = parser.parse_args()

    from sqlalchemy import text

    from domain.settings import load_settings
    from storage import repositories as repo
    from storage.artifacts import open_artifact_store
    from storage.db import create_db_engine, make_sessions, transaction

    work = Path(tempfile.mkdtemp(prefix="retrainer-bench-promotion-"))
    with postgres_database("retrainer_bench_promotion") as database_url:
        sessions = make_sessions(create_db_engine(database_url))
        artifacts = f"file://{work / 'artifacts'}"
        versions = register_versions(sessions, open_artifact_store(artifacts, load_settings()), work)
        address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "RETRAINER_DATABASE_URL": database_url, "RETRAINER_ARTIFACT_ROOT": artifacts,
               "RETRAINER_SERVING_ADDRESS": address}  # fmt: skip
        command = [str(Path(sys.executable).with_name("retrainer")), "serve-models", "--refresh", str(args.refresh)]
        with (work / "serve-models.log").open("wb") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{address}"
        try:
            deadline = time.monotonic() + 120
            while served_version(url) != str(versions[0][1]):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve-models did not serve v{versions[0][1]}; see {work / 'serve-models.log'}")
                time.sleep(0.1)
            time.sleep(1.0)  # its listener is connected

            def pushed(from_id: int, to_id: int) -> None:
                with transaction(sessions) as session:
                    repo.move_champion(
                        session, PIPELINE, to_id, expected_from_version_id=from_id, actor="bench", reason="bench"
                    )

            def polled(_from_id: int, to_id: int) -> None:  # a move nobody is told about: the fallback
                with transaction(sessions) as session:
                    session.execute(
                        text("UPDATE pipelines SET champion_version_id = :to WHERE name = :name"),
                        {"to": to_id, "name": PIPELINE},
                    )

            push = promotions(args.pushed, versions, url, pushed)
            poll = promotions(args.polled, versions, url, polled)
        finally:
            server.terminate()
            server.wait(30)
            sessions.kw["bind"].dispose()

    print(f"\nPromotion → served by a separate `retrainer serve-models` (PostgreSQL, refresh {args.refresh:g} s)\n")
    print(f"{'measure':<52}{'p50 / p99 (ms)':>18}  target p99 <= 1000 ms")
    for label, values in ((f"pushed: LISTEN/NOTIFY ({len(push)} promotions)", push),
                          (f"polled: refresh only ({len(poll)} promotions)", poll)):  # fmt: skip
        p50, p99 = percentile(values, 50), percentile(values, 99)
        print(f"{label:<52}{p50:>8.1f} /{p99:>8.1f}  {'met' if p99 <= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
