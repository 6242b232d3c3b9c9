"""Everything a request passes before a route: the API key on every route, OpenAPI behind it,
the per-key rate limit and the body size limit."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from api.dashboard import PUBLIC_PATHS as DASHBOARD_PUBLIC_PATHS
from api.middleware import DASHBOARD_PREFIX, BodySizeLimitMiddleware, TokenBucketLimiter
from domain import entities as e
from storage import repositories as repo
from storage.db import transaction
from tests.api.conftest import PIPELINE, error_code

PUBLIC = {"/healthz", "/metrics", *DASHBOARD_PUBLIC_PATHS}  # the dashboard's sign-in page and static files
CONTRACT_ROUTES = {
    ("POST", "/api/v1/trigger/train"),
    ("GET", "/api/v1/runs/{run_id}"),
    ("GET", "/api/v1/runs"),
    ("GET", "/api/v1/pipelines"),
    ("GET", "/api/v1/pipelines/{name}/models"),
    ("GET", "/api/v1/pipelines/{name}/rollout"),
    ("POST", "/api/v1/pipelines/{name}/promote"),
    ("POST", "/api/v1/pipelines/{name}/rollback"),
    ("POST", "/api/v1/pipelines/{name}/freeze"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
}


def registered(app: FastAPI) -> set[tuple[str, str]]:
    found = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        for method in route.methods or ():
            found.add((method, route.path))
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", PIPELINE, path)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": ""}, {"X-API-Key": "rt_deadbeef_not-a-real-key"}, {"X-API-Key": "garbage"}],
    ids=["missing", "empty", "wrong", "malformed"],
)
def test_every_route_but_healthz_and_metrics_needs_a_key(
    app: FastAPI, pipeline: e.Pipeline, api_key: str, headers: dict[str, str]
) -> None:
    routes = registered(app)
    assert routes >= CONTRACT_ROUTES
    with TestClient(app) as anonymous:
        for method, path in sorted(routes):
            response = anonymous.request(method, concrete(path), headers=headers, json={"pipeline": PIPELINE})
            if path in PUBLIC:
                assert response.status_code == 200, (method, path, response.text)
                continue
            assert response.status_code == 401, (method, path, response.text)
            if path.startswith(DASHBOARD_PREFIX):  # a sign-in page, not JSON: tests/web/test_dashboard.py
                continue
            assert error_code(response) == "unauthorized"
            assert "retrainer apikey create" in response.json()["error"]["message"]
            assert response.headers["WWW-Authenticate"].startswith("ApiKey")
        # Unknown paths and disabled pages say nothing to a caller without a key either.
        for path in ("/docs", "/redoc", "/api/v1/nope", "/"):
            assert anonymous.get(path, headers=headers).status_code == 401


def test_a_revoked_key_is_refused(client: TestClient, sessions: sessionmaker[Session]) -> None:
    assert client.get("/api/v1/pipelines").status_code == 200
    with transaction(sessions) as session:
        repo.revoke_api_key(session, "ci-bot")
    response = client.get("/api/v1/pipelines")
    assert response.status_code == 401 and error_code(response) == "unauthorized"


def test_openapi_is_served_with_a_key_and_every_route_has_a_summary(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "Created with `retrainer apikey create NAME`.",
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), (method, path)
            if path.startswith("/api/v1/"):
                assert operation["security"] == [{"APIKeyHeader": []}], (method, path)
    assert "/api/v1/trigger/train" in schema["paths"]
    assert client.get("/docs").status_code == 404  # a browser cannot send the header: off


def test_unknown_route_with_a_key_is_a_json_404(client: TestClient) -> None:
    response = client.get("/api/v1/nope")
    assert response.status_code == 404 and error_code(response) == "not_found"
    response = client.delete("/api/v1/pipelines")
    assert response.status_code == 405 and error_code(response) == "method_not_allowed"


# ------------------------------------------------------------------------------ rate limit


def test_rate_limit_per_key_answers_429_with_retry_after(
    make_app: Callable[..., FastAPI], api_key: str, pipeline: e.Pipeline, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        _other, other_key = repo.create_api_key(session, "other-bot")
    with TestClient(make_app(rate_limit_per_minute=2)) as client:
        for _ in range(2):
            assert client.get("/api/v1/pipelines", headers={"X-API-Key": api_key}).status_code == 200
        limited = client.get("/api/v1/pipelines", headers={"X-API-Key": api_key})
        assert limited.status_code == 429
        assert error_code(limited) == "rate_limited"
        assert "ci-bot" in limited.json()["error"]["message"]
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 30  # 2 per minute: one token every 30 s
        # Another key has its own bucket; the public endpoints are not limited.
        assert client.get("/api/v1/pipelines", headers={"X-API-Key": other_key}).status_code == 200
        for _ in range(5):
            assert client.get("/healthz").status_code == 200


def test_token_bucket_refills_evenly() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(60, clock=lambda: now[0])  # one per second, burst 60
    assert all(limiter.acquire(1) == 0.0 for _ in range(60))
    assert limiter.acquire(1) == pytest.approx(1.0)
    assert limiter.acquire(2) == 0.0  # keys do not share buckets
    now[0] += 0.5
    assert limiter.acquire(1) == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire(1) == 0.0
    now[0] += 3600  # a long pause refills to the burst, never beyond
    assert sum(limiter.acquire(1) == 0.0 for _ in range(100)) == 60
    with pytest.raises(ValueError, match="at least 1"):
        TokenBucketLimiter(0)


# ------------------------------------------------------------------------------- body size


def test_a_body_over_the_limit_is_refused_before_parsing(
    make_app: Callable[..., FastAPI], api_key: str, pipeline: e.Pipeline, submitter: object
) -> None:
    with TestClient(make_app(max_body_bytes=200), headers={"X-API-Key": api_key}) as client:
        small = client.post("/api/v1/trigger/train", json={"pipeline": PIPELINE, "reason": "fits"})
        assert small.status_code == 202
        big = client.post("/api/v1/trigger/train", json={"pipeline": PIPELINE, "reason": "x" * 500})
        assert big.status_code == 413
        assert error_code(big) == "payload_too_large"
        assert "200 bytes" in big.json()["error"]["message"]
        # Not even parsed: an invalid JSON body over the limit is still a 413, not a 422.
        garbage = client.post(
            "/api/v1/trigger/train", content=b"{" * 1000, headers={"Content-Type": "application/json"}
        )
        assert garbage.status_code == 413
        streamed = client.post(
            "/api/v1/trigger/train",
            content=iter([b"{" * 150, b"{" * 150]),
            headers={"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413 and error_code(streamed) == "payload_too_large"


def test_streamed_body_is_counted_chunk_by_chunk() -> None:
    called: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    chunks: list[Message] = [{"type": "http.request", "body": b"a" * 60, "more_body": True} for _ in range(5)]
    sent: list[Message] = []

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = BodySizeLimitMiddleware(app, max_body_bytes=100)
    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/x", "headers": []}, receive, send))
    assert not called
    assert sent[0]["status"] == 413
    assert len(chunks) == 3  # stopped reading at the first chunk past the limit


def test_a_body_under_the_limit_reaches_the_app_whole() -> None:
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        seen.append(message["body"])

    chunks: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError(message)

    middleware = BodySizeLimitMiddleware(app, max_body_bytes=4)
    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/x", "headers": []}, receive, send))
    assert seen == [b"abcd"]


def test_api_routes_are_fastapi_routes(app: FastAPI) -> None:
    # The walk above relies on every /api/v1 route being an APIRoute with a summary.
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/api/v1/"):
            assert route.summary, route.path
