"""Webhook deliveries to a real HTTP receiver on loopback: each try signed and verified, retried after
a 500, recorded failed after the last try or when the address resolves to nothing, never raised."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain import entities as e
from domain.decisions import SIGNATURE_HEADER, DecisionType, DeliveryStatus, signature_matches
from domain.notification_spec import WebhookSpec
from domain.settings import load_settings
from flows.relay import DecisionRelay
from flows.webhooks import DeliveryPolicy, WebhookDispatcher
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction

PIPELINE = "hooked"
SECRET = "s3cret-for-tests"
FAST = DeliveryPolicy(attempts=3, timeout_s=2, backoff_s=0.01, max_backoff_s=0.05)


@dataclass
class Receiver:
    """Answers each POST with the next status of `answers` (then 200), keeping what it received."""

    answers: list[int]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # quiet: no line per request
                return

        return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver([])
    server = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def stage(
    tmp_path: Path, webhooks: Sequence[Mapping[str, object]], every_pipeline: Sequence[WebhookSpec] = ()
) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'hooks.db'}"
    migrations.upgrade(url)
    sessions = make_sessions(create_db_engine(url))
    spec = {
        "name": PIPELINE,
        "dataset": "d",
        "model": {"architecture": "mlp"},
        "notifications": {"webhooks": list(webhooks)},
    }
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, "d", spec)
        run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL)
        repo.update_run(session, run.id, status=e.RunStatus.RUNNING)
    DecisionRelay(sessions, None, webhooks=every_pipeline).run_once()  # Kafka off: to the webhooks only
    return sessions


def deliveries(sessions: sessionmaker[Session]) -> list[tuple[DeliveryStatus, int, int | None, str]]:
    with transaction(sessions) as session:
        return [(d.status, d.attempts, d.response_status, d.event.type.value) for d in repo.webhook_deliveries(session)]


def test_every_try_is_signed_and_a_500_is_retried(
    tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = receiver
    state.answers = [500, 500]  # the first event's first two tries fail
    sessions = stage(tmp_path, [{"url": url, "events": ["*"], "secret_env": "HOOK_SECRET"}])
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    dispatcher = WebhookDispatcher(sessions, replace(FAST, concurrency=1))  # in order: the 500s go to the first
    finished = dispatcher.run_once()
    assert [(d.status, d.event.type) for d in finished] == [
        (DeliveryStatus.DELIVERED, DecisionType.RUN_CREATED),
        (DeliveryStatus.DELIVERED, DecisionType.RUN_STARTED),
    ]
    assert [d.attempts for d in finished] == [3, 1]
    assert len(state.received) == 4
    for headers, body in state.received:
        assert headers["Content-Type"].startswith("application/cloudevents+json")
        assert signature_matches(SECRET, body, headers[SIGNATURE_HEADER], now=time.time())
        assert not signature_matches("another secret", body, headers[SIGNATURE_HEADER], now=time.time())
        assert not signature_matches(SECRET, body, headers[SIGNATURE_HEADER], now=time.time() + 3600)  # replayed
    ids = [json.loads(body)["id"] for _, body in state.received]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # a retry carries the same event id
    assert {d.event.id for d in finished} == set(ids)
    assert dispatcher.run_once() == []  # delivered once: nothing pending


def test_failed_after_the_last_try_and_filtered_by_type(
    tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = receiver
    state.answers = [500] * 10
    hooks = [
        {"url": url, "events": [DecisionType.RUN_STARTED.value], "secret_env": "HOOK_SECRET"},
        {"url": "http://no-such-host.invalid/hook", "events": ["*"], "secret_env": "HOOK_SECRET"},
        {"url": f"{url}?unsigned", "events": ["*"], "secret_env": "HOOK_SECRET_UNSET"},
    ]
    sessions = stage(tmp_path, hooks)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.delenv("HOOK_SECRET_UNSET", raising=False)
    finished = WebhookDispatcher(sessions, FAST).run_once()
    assert all(d.status is DeliveryStatus.FAILED for d in finished)
    by_url = {(d.url, d.event.type): d for d in finished}
    answered_500 = by_url[(url, DecisionType.RUN_STARTED)]
    assert (answered_500.attempts, answered_500.response_status) == (3, 500)  # run.created was not wanted
    assert (url, DecisionType.RUN_CREATED) not in by_url
    nowhere = by_url[("http://no-such-host.invalid/hook", DecisionType.RUN_CREATED)]
    assert nowhere.attempts == 3 and nowhere.response_status is None and "no-such-host.invalid" in str(nowhere.error)
    unsigned = by_url[(f"{url}?unsigned", DecisionType.RUN_CREATED)]
    assert unsigned.attempts == 0 and "HOOK_SECRET_UNSET" in str(unsigned.error)
    assert len(state.received) == 3  # only the 500s: no unsigned request was ever sent
    assert len(deliveries(sessions)) == 5 and {s for s, *_ in deliveries(sessions)} == {DeliveryStatus.FAILED}


def test_settings_webhooks_get_every_pipelines_events_besides_the_specs(
    tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = receiver
    everywhere = [
        {"url": url, "events": ["*"], "secret_env": "HOOK_SECRET"},  # the spec names it too: delivered once
        {"url": f"{url}?all", "events": [DecisionType.RUN_STARTED.value], "secret_env": "HOOK_SECRET"},
    ]
    monkeypatch.setenv("RETRAINER_WEBHOOKS", json.dumps(everywhere))
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    settings = load_settings()
    sessions = stage(tmp_path, [{"url": url, "events": ["*"], "secret_env": "HOOK_SECRET"}], settings.webhooks)
    finished = WebhookDispatcher(sessions, FAST).run_once()
    assert sorted((d.url, d.event.type.value, d.status.value) for d in finished) == [
        (url, DecisionType.RUN_CREATED.value, "delivered"),
        (url, DecisionType.RUN_STARTED.value, "delivered"),
        (f"{url}?all", DecisionType.RUN_STARTED.value, "delivered"),
    ]
