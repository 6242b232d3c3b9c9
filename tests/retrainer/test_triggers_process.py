"""`retrainer triggers` as a real subprocess rides out a Prefect outage: the run created while the
Prefect API is unreachable is submitted once it answers, and the process never exits for it.

The outage is a relay in front of the session's real Prefect server that starts listening only
after OUTAGE_S: every request the process makes meanwhile gets "connection refused", as from a
Prefect server that is down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from flows.registry import deployments, load_specs, sync_pipelines
from retrainer.service import free_port
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.repositories.runs import SUBMITTING
from tests.flows.conftest import spec

pytestmark = pytest.mark.integration

OUTAGE_S = 10.0
T = TypeVar("T")


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            end.close()


@contextmanager
def relay_after(delay_s: float, port: int, target: tuple[str, int]) -> Iterator[None]:
    """Forwards 127.0.0.1:`port` to `target`, listening only from `delay_s` seconds on."""
    stop = threading.Event()

    def serve() -> None:
        if stop.wait(delay_s):
            return
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_a_run_created_during_a_prefect_outage_is_submitted_once_prefect_answers(
    prefect_server: str, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    sessions = make_sessions(create_db_engine(url))
    document = spec()
    document["triggers"] = {"events": {"debounce_seconds": 0, "max_wait_seconds": 600}}
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "digits.yaml").write_text(yaml.safe_dump(document))
    specs = load_specs(tmp_path / "pipelines")
    with transaction(sessions) as session:
        sync_pipelines(session, specs)
    for deployment in deployments(specs):
        deployment.apply()  # on the real server, reached directly

    upstream = urlsplit(prefect_server)
    relay_port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{relay_port}/api",
        "RETRAINER_DATABASE_URL": url,
        "RETRAINER_PIPELINES_DIR": str(tmp_path / "pipelines"),
        "RETRAINER_HEALTH_ADDRESS": f"127.0.0.1:{health_port}",
        "RETRAINER_LOG_FORMAT": "console",
    }
    log_path = tmp_path / "triggers.log"
    command = [str(Path(sys.executable).parent / "retrainer"), "triggers", "--interval", "0.5"]
    with (
        relay_after(OUTAGE_S, relay_port, (upstream.hostname or "127.0.0.1", upstream.port or 4200)),
        log_path.open("wb") as log,
    ):
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with transaction(sessions) as session:
                repo.add_to_inbox(
                    session,
                    event_id=f"evt-{uuid.uuid4()}",
                    source="//tests",
                    type="retrainer.data.changed",
                    dataset="digits",
                    payload={"data": {"dataset": "digits", "version": "v1", "uri": "file:///data/v1.csv"}},
                )
            run = _wait_for(lambda: _only_run(sessions), process, log_path, "the run to be created")
            assert run.prefect_flow_run_id in (None, SUBMITTING)  # Prefect is unreachable: created, not submitted
            health = _wait_for(
                lambda: (h := _failing_health(health_port)) and "trigger-service" in h["error"]["message"] and h,
                process,
                log_path,
                "/healthz to report the failed pass",
                timeout_s=OUTAGE_S,
            )
            assert "trigger-service: last pass failed" in health["error"]["message"]
            assert health["checks"]["prefect"]["status"] == "failing"

            submitted = _wait_for(
                lambda: (r := _only_run(sessions)) and r.prefect_flow_run_id not in (None, SUBMITTING) and r,
                process,
                log_path,
                "the run to be submitted after the outage",
                timeout_s=OUTAGE_S + 60,
            )
            assert process.poll() is None, "the trigger service exited during the outage"
            assert httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=5).status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
    assert code == 0, log_path.read_text()[-3000:]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(submitted.prefect_flow_run_id))
    assert flow_run.parameters == {"pipeline": "digits-classifier", "run_id": submitted.id}
    assert "failed, retrying in" in log_path.read_text()


def _only_run(sessions: sessionmaker[Session]) -> e.Run | None:
    with transaction(sessions) as session:
        runs = repo.list_runs(session, "digits-classifier")
    assert len(runs) <= 1, "one event window, one run"
    return runs[0] if runs else None


def _failing_health(port: int) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 503 else None


def _wait_for(
    check: Callable[[], T | bool | None],
    process: subprocess.Popen[bytes],
    log_path: Path,
    what: str,
    timeout_s: float = 60.0,
) -> T:
    deadline = time.monotonic() + timeout_s
    while (found := check()) in (None, False, ""):
        assert process.poll() is None, f"retrainer triggers exited: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}: {log_path.read_text()[-3000:]}"
        time.sleep(0.25)
    return found  # type: ignore[return-value]


def test_triggers_refuse_to_submit_without_a_prefect_api_url(tmp_path: Path) -> None:
    """An ephemeral Prefect has no deployments, so every submission would fail for ever: refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RETRAINER_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "RETRAINER_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    retrainer = str(Path(sys.executable).parent / "retrainer")
    refused = subprocess.run([retrainer, "triggers"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "PREFECT_API_URL is not set" in line and "--no-submit" in line
    # creating runs only needs no Prefect: --no-submit --once makes one pass and exits 0
    migrations.upgrade(env["RETRAINER_DATABASE_URL"])
    once = subprocess.run(
        [retrainer, "triggers", "--no-submit", "--once"], env=env, capture_output=True, text=True, timeout=120
    )
    assert once.returncode == 0, once.stderr
