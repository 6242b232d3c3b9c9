"""The one door submits to the pipeline's real Prefect deployment, once per Run row."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.spec import parse_spec
from flows.registry import deployments, load_specs, sync_pipelines
from flows.triggers import (
    BUSY_RETRY_DELAYS_S,
    DeploymentNotFoundError,
    TriggerRequest,
    prefect_submitter,
    request_run,
    submit_unsubmitted_runs,
)
from storage import repositories as repo
from storage.db import transaction
from tests.flows.conftest import spec
from tests.retrainer.test_triggers_process import _pipe as pipe

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


def _deploy(env: sessionmaker[Session], name: str) -> None:
    with transaction(env) as session:
        repo.upsert_pipeline(session, name, "digits", {**spec(), "name": name})
    deployments([parse_spec({**spec(), "name": name}, source="test")])[0].apply()


def _queued_run(env: sessionmaker[Session], name: str) -> e.Run:
    with transaction(env) as session:
        return repo.create_run(session, name, e.TriggerKind.MANUAL)[0]


def test_a_re_created_deployment_is_looked_up_again_and_a_deleted_one_fails_the_run(
    env: sessionmaker[Session],
) -> None:
    from prefect.client.orchestration import get_client

    name = "redeployed"
    _deploy(env, name)
    submit = prefect_submitter()
    first = submit(_queued_run(env, name))  # resolves and caches the deployment's id
    with get_client(sync_client=True) as client:
        old = client.read_deployment_by_name(f"retrainer-pipeline/{name}")
        client.delete_deployment(old.id)
        _deploy(env, name)  # the same name, a new id
        again = _queued_run(env, name)
        second = submit(again)
        assert first and second and second != first
        flow_run = client.read_flow_run(UUID(second))
        new = client.read_deployment_by_name(f"retrainer-pipeline/{name}")
        assert flow_run.deployment_id == new.id != old.id
        assert submit(again) == second  # the same run again: the same flow run (idempotency key)
        client.delete_deployment(new.id)
    gone = _queued_run(env, name)
    assert submit_unsubmitted_runs(env, submit) == []  # the cached id is stale and the name is gone: no retry
    with transaction(env) as session:
        failed = repo.get_run(session, gone.id)
    assert failed.status is e.RunStatus.FAILED and failed.error is not None
    assert f"no deployment 'retrainer-pipeline/{name}'" in failed.error and "retrainer pipelines deploy" in failed.error


class _Relay:
    """A TCP relay on 127.0.0.1 to `target` that can be cut: a Prefect API that goes away."""

    def __init__(self, target: str) -> None:
        parsed = urlsplit(target)
        self.target = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = parsed._replace(netloc=f"127.0.0.1:{self.server.getsockname()[1]}").geturl()
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_prefect_outage_fails_the_kept_open_client_fast_and_it_recovers(
    env: sessionmaker[Session], prefect_server: str
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = "outage"
    _deploy(env, name)
    relay = _Relay(prefect_server)
    with temporary_settings({PREFECT_API_URL: relay.url}):
        submit = prefect_submitter()
        assert submit(_queued_run(env, name))  # connected once: Prefect's client would now retry refusals
        relay.cut()
        run = _queued_run(env, name)
        started = time.monotonic()
        request = TriggerRequest(e.TriggerKind.MANUAL, idempotency_key="k-outage", request_sha256="d" * 64)
        deferred = request_run(env, name, request, submit)
        assert time.monotonic() - started < 15  # not the client's minute of back-off
        assert deferred.run.status is e.RunStatus.QUEUED and deferred.run.prefect_flow_run_id is None
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        assert set(submit_unsubmitted_runs(env, prefect_submitter())) >= {run.id, deferred.run.id}


class _BusyPrefect(ThreadingHTTPServer):
    """An HTTP proxy to the real Prefect API that answers its first `busy` flow-run creations 503 without
    Retry-After, as Prefect's server does while its SQLite database is busy; everything else goes through."""

    def __init__(self, upstream: str, busy: int) -> None:
        parsed = urlsplit(upstream)
        self.upstream, self.api_path = f"{parsed.scheme}://{parsed.netloc}", parsed.path
        self.busy, self.refused = busy, 0
        super().__init__(("127.0.0.1", 0), _BusyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}{self.api_path}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _BusyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _BusyPrefect

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "POST" and self.path.endswith("/create_flow_run") and self.server.busy > 0:
            self.server.busy, self.server.refused = self.server.busy - 1, self.server.refused + 1
            self._answer(503, [("Content-Type", "application/json")], b'{"exception_message": "Service Unavailable"}')
            return
        hop = {"host", "content-length", "connection", "transfer-encoding", "content-encoding", "accept-encoding"}
        headers = {key: value for key, value in self.headers.items() if key.lower() not in hop}
        answer = httpx.request(self.command, self.server.upstream + self.path, headers=headers, content=body)
        kept = [(key, value) for key, value in answer.headers.items() if key.lower() not in hop]
        self._answer(answer.status_code, kept, answer.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def test_a_busy_prefect_is_asked_again_soon_and_a_lasting_one_leaves_the_run_queued(
    env: sessionmaker[Session], prefect_server: str
) -> None:
    """Prefect's own client waits 2 s (then 4) after a 503 without Retry-After; the submitter retries it after
    BUSY_RETRY_DELAYS_S with the same idempotency key, so two busy answers cost tens of milliseconds."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = "busy"
    _deploy(env, name)
    busy = _BusyPrefect(prefect_server, busy=2)
    try:
        with temporary_settings({PREFECT_API_URL: busy.url}):
            submit = prefect_submitter()
            started = time.monotonic()
            first = _queued_run(env, name)
            flow_run_id = submit(first)  # the bare submitter: the Run row does not record it
            took = time.monotonic() - started
            assert flow_run_id and busy.refused == 2
            assert took < 3  # Prefect's client alone would have slept about 6 s

            busy.busy, busy.refused = 100, 0  # busy for longer than the submitter's retries
            request = TriggerRequest(e.TriggerKind.MANUAL, idempotency_key="k-busy", request_sha256="e" * 64)
            deferred = request_run(env, name, request, submit)
            assert busy.refused == len(BUSY_RETRY_DELAYS_S) + 1
            assert deferred.run.status is e.RunStatus.QUEUED and deferred.run.prefect_flow_run_id is None
            busy.busy = 0  # Prefect answers again: the next pass submits it
            assert set(submit_unsubmitted_runs(env, submit)) == {first.id, deferred.run.id}
    finally:
        busy.shutdown()
        busy.server_close()
