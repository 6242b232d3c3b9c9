"""/healthz and /metrics: the health report of a set of probes, and the tiny app that serves both
for the processes that have no HTTP port of their own (`retrainer consume`, `retrainer triggers`,
`retrainer rollout supervise`) on RETRAINER_HEALTH_ADDRESS.

A probe is a callable that returns when its part works and raises (a RetrainerError naming the
part and the fix) when it does not. /healthz answers 200 `{"status": "ok", "checks": {...}}`, or
503 with every failing check and an `error` naming each (CONTRACT section 3). Both endpoints
are public, as on the API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from domain.errors import RetrainerError
from web.errors import ERROR_CODE_TO_HTTP_STATUS, INTERNAL_ERROR, UNHEALTHY

HealthProbe = Callable[[], None]


def health_report(probes: Mapping[str, HealthProbe]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /healthz after running every probe once."""
    checks: dict[str, dict[str, str]] = {}
    failing: list[str] = []
    for name, probe in probes.items():
        try:
            probe()
        except RetrainerError as err:
            checks[name] = {"status": "failing", "code": err.code, "message": err.message}
            failing.append(f"{name}: {err.message}")
        except Exception as err:  # a probe that crashes is a failing part, not a 500
            checks[name] = {"status": "failing", "code": INTERNAL_ERROR, "message": f"{type(err).__name__}: {err}"}
            failing.append(f"{name}: {type(err).__name__}: {err}")
        else:
            checks[name] = {"status": "ok"}
    if not failing:
        return 200, {"status": "ok", "checks": checks}
    body = {
        "status": "unavailable",
        "checks": checks,
        "error": {"code": UNHEALTHY, "message": "not ready: " + "; ".join(failing)},
    }
    return ERROR_CODE_TO_HTTP_STATUS[UNHEALTHY], body


def metrics_response(registry: CollectorRegistry = REGISTRY) -> Response:
    """The Prometheus text exposition of `registry`."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def health_app(probes: Mapping[str, HealthProbe], *, registry: CollectorRegistry = REGISTRY) -> Starlette:
    """GET /healthz (the probes) and GET /metrics (`registry`, by default the process's)."""

    async def healthz(_request: Request) -> JSONResponse:
        status, body = await run_in_threadpool(health_report, probes)  # probes may block on I/O
        return JSONResponse(body, status_code=status)

    async def metrics(_request: Request) -> Response:
        return metrics_response(registry)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics)])


def add_health_route(app: FastAPI, probes: Mapping[str, HealthProbe]) -> None:
    """Adds GET /healthz (the probes) to an app that has its own /metrics (the model server)."""

    def healthz() -> JSONResponse:
        status, body = health_report(probes)
        return JSONResponse(body, status_code=status)

    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
