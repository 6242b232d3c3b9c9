"""API keys on the model server (`serving/keys.py`), over real HTTP and gRPC: feedback needs a
`feedback` key, stats and load an `operate` key, inference an `infer` key when required; a refused
request changes no statistic; a revoked key is refused at once, even when its verdict was cached."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton  # type: ignore[import-untyped]
from sqlalchemy.orm import Session, sessionmaker

import migrations
from domain.apikeys import Scope
from domain.errors import UnauthorizedError
from serving.app import create_serving_app
from serving.grpc_server import running_grpc_server
from serving.keys import KeyCheck
from serving.registry import ModelRegistry
from serving.server import running_server
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.flows.test_trigger_service import _own_postgresql  # noqa: F401
from tests.serving.conftest import tiny_model
from tests.serving.test_grpc import refusal, tensor_of
from tests.serving.test_server import INFER, body, rows_of

FEEDBACK = "/v2/models/digits/feedback"
STATS = "/v2/models/digits/stats"


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    migrations.upgrade(url)
    engine = create_db_engine(url)
    yield make_sessions(engine)
    engine.dispose()


def key(sessions: sessionmaker[Session], name: str, *scopes: Scope) -> dict[str, str]:
    with transaction(sessions) as session:
        _key, plaintext = repo.create_api_key(session, name, scopes)
    return {"X-API-Key": plaintext}


class Server:
    def __init__(self, sessions: sessionmaker[Session], *, require_for_infer: bool) -> None:
        self.registry = ModelRegistry(["digits"], rng=random.Random(1))  # noqa: S311
        self.registry.set_champion(tiny_model("1"))
        self.keys = KeyCheck(sessions, require_for_infer=require_for_infer).start()
        self.app = create_serving_app(self.registry, reload=lambda: {}, keys=self.keys)

    def close(self) -> None:
        self.keys.stop()
        self.registry.close()


@pytest.fixture
def server(sessions: sessionmaker[Session]) -> Iterator[Server]:
    server = Server(sessions, require_for_infer=False)
    yield server
    server.close()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with running_server(server.app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def labelled(http: httpx.Client, operator: dict[str, str]) -> tuple[int, int]:
    stats = http.get(STATS, headers=operator)
    assert stats.status_code == 200, stats.text
    (window,) = [v for v in stats.json()["variants"] if v["version"] == "1"]
    return window["labelled"], window["correct"]


def test_feedback_needs_a_feedback_key_and_a_refusal_changes_no_statistic(
    sessions: sessionmaker[Session], http: httpx.Client
) -> None:
    operator, labeller = key(sessions, "controller", Scope.OPERATE), key(sessions, "labels", Scope.FEEDBACK)
    reader = key(sessions, "dashboard", Scope.READ)
    answer = http.post(INFER, json=body(rows_of(1), id="u-1"))  # inference stays open by default
    assert answer.status_code == 200
    label = {"request_id": "u-1", "label": answer.json()["outputs"][1]["data"][0]}

    anonymous = http.post(FEEDBACK, json=label)
    assert anonymous.status_code == 401 and "'feedback'" in anonymous.json()["error"]
    wrong_key = http.post(FEEDBACK, json=label, headers={"X-API-Key": "rt_00000000_not-a-key"})
    assert wrong_key.status_code == 401
    forbidden = http.post(FEEDBACK, json=label, headers=reader)
    assert forbidden.status_code == 403 and "lacks the 'feedback' scope" in forbidden.json()["error"]
    assert labelled(http, operator) == (0, 0)

    accepted = http.post(FEEDBACK, json=label, headers=labeller)
    assert accepted.status_code == 200 and accepted.json()["correct"] == 1
    assert labelled(http, operator) == (1, 1)


def test_stats_and_load_need_an_operate_key(sessions: sessionmaker[Session], http: httpx.Client) -> None:
    labeller, operator = key(sessions, "labels", Scope.FEEDBACK), key(sessions, "ops", Scope.OPERATE)
    assert http.get(STATS).status_code == 401
    refused = http.get(STATS, headers=labeller)
    assert refused.status_code == 403 and "'operate'" in refused.json()["error"]
    load = "/v2/repository/models/digits/load"
    assert http.post(load, headers=labeller).status_code == 403
    assert http.post(load, headers=operator).status_code == 200
    assert http.get("/v2/health/ready").status_code == 200  # health and metadata stay public
    assert http.get("/v2/models/digits").status_code == 200


def test_a_revoked_key_is_refused_at_once_though_its_verdict_was_cached(
    sessions: sessionmaker[Session], server: Server, http: httpx.Client
) -> None:
    operator = key(sessions, "ops", Scope.OPERATE)
    assert http.get(STATS, headers=operator).status_code == 200
    assert server.keys.cached(operator["X-API-Key"]) is not None  # the next request would not ask the database
    with transaction(sessions) as session:
        repo.revoke_api_key(session, "ops")
    revoked = http.get(STATS, headers=operator)
    assert revoked.status_code == 401 and "not a valid, unrevoked" in revoked.json()["error"]


def test_a_cached_verdict_expires_after_its_ttl(sessions: sessionmaker[Session]) -> None:
    now = [0.0]
    keys = KeyCheck(sessions, ttl_s=5.0, clock=lambda: now[0])
    plaintext = key(sessions, "ops", Scope.OPERATE)["X-API-Key"]
    found = keys.lookup(plaintext)
    assert found is not None and keys.cached(plaintext) == found
    now[0] = 5.1
    assert keys.cached(plaintext) is None
    assert keys.lookup("rt_00000000_nope") is None and keys.cached("rt_00000000_nope") is None


def test_inference_needs_an_infer_key_when_required_over_http_and_grpc(sessions: sessionmaker[Session]) -> None:
    server = Server(sessions, require_for_infer=True)
    inferrer, labeller = key(sessions, "app", Scope.INFER), key(sessions, "labels", Scope.FEEDBACK)
    rows = rows_of(2)
    try:
        with running_server(server.app) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert http.post(INFER, json=body(rows)).status_code == 401
            forbidden = http.post(INFER, json=body(rows), headers=labeller)
            assert forbidden.status_code == 403 and "'infer'" in forbidden.json()["error"]
            assert http.post(INFER, json=body(rows), headers=inferrer).status_code == 200
        with running_grpc_server(server.app.state.inference) as target:
            client = triton.InferenceServerClient(url=target)
            try:
                status, message = refusal(client.infer, "digits", [tensor_of(rows)])
                assert status == "StatusCode.UNAUTHENTICATED" and "'infer'" in message
                status, _ = refusal(
                    client.infer, "digits", [tensor_of(rows)], headers={"x-api-key": labeller["X-API-Key"]}
                )
                assert status == "StatusCode.PERMISSION_DENIED"
                answer = client.infer("digits", [tensor_of(rows)], headers={"x-api-key": inferrer["X-API-Key"]})
                assert np.asarray(answer.as_numpy("predicted_class")).shape == (2,)
            finally:
                client.close()
        # only the two answered requests count; the refused ones reached no model
        (window,) = server.app.state.metrics.snapshot("digits", 60.0)
        assert (window.requests, window.rejected) == (2, 0)
    finally:
        server.close()


def test_authorize_without_a_key_names_the_scope(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(UnauthorizedError, match="'feedback' scope"):
        asyncio.run(KeyCheck(sessions).authorize(None, Scope.FEEDBACK))


@pytest.mark.integration
def test_a_revocation_by_another_process_reaches_the_cache_over_notify(request: pytest.FixtureRequest) -> None:
    database_url: str = request.getfixturevalue("_own_postgresql")
    engine = create_db_engine(database_url)
    sessions = make_sessions(engine)
    keys = KeyCheck(sessions).start()
    try:
        assert keys._revocations.listener is not None and keys._revocations.listener.connected.wait(10)
        time.sleep(0.2)  # a (re)connection drops every verdict once (a NOTIFY may have been missed): let it pass
        keys.cached("")
        name = f"ops-{uuid.uuid4().hex[:8]}"
        plaintext = key(sessions, name, Scope.OPERATE)["X-API-Key"]
        assert keys.lookup(plaintext) is not None and keys.cached(plaintext) is not None
        env = {**os.environ, "RETRAINER_DATABASE_URL": database_url}
        revoked = subprocess.run(
            [str(Path(sys.executable).with_name("retrainer")), "apikey", "revoke", name],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 2.0  # NOTIFY arrives in milliseconds; the TTL (5 s) would be later
        while keys.cached(plaintext) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keys.cached(plaintext) is None and keys.lookup(plaintext) is None
    finally:
        keys.stop()
        engine.dispose()
