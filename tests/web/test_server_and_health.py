"""The one server helper, the one error table and the /healthz + /metrics app, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette

from domain.errors import (
    ConfigurationError,
    InfrastructureError,
    NotFoundError,
    PayloadTooLargeError,
    RetrainerError,
    TransientInfraError,
)
from web.errors import MODEL_NOT_READY, InternalServerError, MethodNotAllowedError, status_for
from web.health import health_app
from web.server import parse_address, running


def test_parse_address_names_the_setting_it_was_given() -> None:
    assert parse_address("127.0.0.1:8083", "RETRAINER_HEALTH_ADDRESS") == ("127.0.0.1", 8083)
    assert parse_address("[::1]:0", "RETRAINER_API_ADDRESS") == ("::1", 0)
    with pytest.raises(ConfigurationError) as refused:
        parse_address("8083", "RETRAINER_HEALTH_ADDRESS")
    assert refused.value.code == "configuration_error"
    assert refused.value.message.startswith("RETRAINER_HEALTH_ADDRESS: must be HOST:PORT")


def test_a_taken_port_is_refused_naming_the_setting() -> None:
    app = health_app({})
    with running(app, "127.0.0.1:0", "RETRAINER_HEALTH_ADDRESS", name="one") as url:
        taken = url.removeprefix("http://")
        with (
            pytest.raises(InfrastructureError) as refused,
            running(app, taken, "RETRAINER_SERVING_ADDRESS", name="two"),
        ):
            pass
    assert refused.value.code == "infrastructure_error"
    assert refused.value.message.startswith(f"RETRAINER_SERVING_ADDRESS: cannot listen on {taken}")


def _starting(startup_s: float | None) -> Starlette:
    """An app whose start-up (lifespan) takes `startup_s` seconds, or fails when None."""

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if startup_s is None:
            raise RuntimeError("start-up failed")
        await asyncio.sleep(startup_s)
        yield

    return Starlette(lifespan=lifespan)


# uvicorn ends its thread with SystemExit(3) when start-up fails, which is the case provoked here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_server_that_cannot_start_is_refused_at_once() -> None:
    began = time.monotonic()
    with (
        pytest.raises(InfrastructureError) as failed,
        running(_starting(None), "127.0.0.1:0", "RETRAINER_API_ADDRESS", name="the API", lifespan="on"),
    ):
        pass
    assert time.monotonic() - began < 5  # its thread ended: no waiting out the 10 s
    assert failed.value.code == "infrastructure_error"
    assert failed.value.message.startswith("the API did not start on http://127.0.0.1:")
    assert failed.value.message.endswith(" within 10.0 s")


def test_a_slow_server_is_refused_after_the_timeout_and_a_started_one_answers() -> None:
    # starts after 0.6 s, given 0.5 s: refused, then stopped while `running` waits for its thread
    began = time.monotonic()
    with (
        pytest.raises(InfrastructureError) as slow,
        running(_starting(0.6), "127.0.0.1:0", "RETRAINER_API_ADDRESS", name="the API", start_timeout=0.5),
    ):
        pass
    assert time.monotonic() - began >= 0.5
    assert slow.value.message.endswith(" within 0.5 s")

    with running(_starting(0.3), "127.0.0.1:0", "RETRAINER_API_ADDRESS", name="the API") as url:
        assert httpx.get(f"{url}/nothing").status_code == 404  # waited until it accepted connections


def test_healthz_names_each_failing_probe_and_metrics_serve_the_registry() -> None:
    registry = CollectorRegistry()
    Counter("retrainer_test_passes", "passes", registry=registry).inc(3)
    healthy = {"ok": True}

    def topic() -> None:
        if not healthy["ok"]:
            raise TransientInfraError("topic 'retrainer.nowhere' does not exist")

    def crashes() -> None:
        raise ValueError("boom")

    app = health_app({"database": lambda: None, "kafka-consumer": topic}, registry=registry)
    with running(app, "127.0.0.1:0", "RETRAINER_HEALTH_ADDRESS", name="health") as url:
        fine = httpx.get(f"{url}/healthz")
        assert fine.status_code == 200
        assert fine.json() == {
            "status": "ok",
            "checks": {"database": {"status": "ok"}, "kafka-consumer": {"status": "ok"}},
        }
        healthy["ok"] = False
        failing = httpx.get(f"{url}/healthz")
        metrics = httpx.get(f"{url}/metrics")
    assert failing.status_code == 503
    body = failing.json()
    assert body["error"]["code"] == "unhealthy"
    assert "kafka-consumer: topic 'retrainer.nowhere' does not exist" in body["error"]["message"]
    assert body["checks"]["kafka-consumer"]["code"] == "infrastructure_unavailable"
    assert body["checks"]["database"] == {"status": "ok"}
    assert "retrainer_test_passes_total 3.0" in metrics.text

    app = health_app({"broken": crashes})
    with running(app, "127.0.0.1:0", "RETRAINER_HEALTH_ADDRESS", name="health") as url:
        crashed = httpx.get(f"{url}/healthz")
    assert crashed.status_code == 503
    assert crashed.json()["checks"]["broken"] == {
        "status": "failing",
        "code": "internal_error",
        "message": "ValueError: boom",
    }


class _NotReady(RetrainerError, code=MODEL_NOT_READY):
    """Stands for serving.registry.ModelNotReadyError (a layer above web/)."""


class _MissingThing(NotFoundError):
    """A new subclass with no entry of its own."""


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (PayloadTooLargeError("too big"), 413),
        (_NotReady("no champion"), 503),
        (_MissingThing("gone"), 404),  # inherits its parent's status
        (TransientInfraError("down"), 503),
        (RetrainerError("odd"), 500),
        (MethodNotAllowedError("infer takes POST", allow=("POST",)), 405),
        (InternalServerError("internal error (KeyError); see the server log"), 500),
    ],
)
def test_one_status_table_serves_the_api_and_the_model_server(error: RetrainerError, status: int) -> None:
    assert status_for(error) == status


def test_a_wrong_method_carries_the_allow_header_to_send() -> None:
    refused = MethodNotAllowedError("GET is not allowed on /x; use POST or PUT", allow=("POST", "PUT"))
    assert refused.code == "method_not_allowed"
    assert refused.headers == {"Allow": "POST, PUT"}
