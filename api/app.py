"""`create_app(...)`: the HTTP API as one FastAPI application, with its dependencies passed in.

Nothing here reads the environment or opens connections of its own: the caller (`retrainer
serve`, a test) hands over the sessions, the settings, the run submitter and, optionally, the
health probes, so the same app runs against SQLite in a test and PostgreSQL in production.

Request path, outermost first: ApiKeyMiddleware (401, 429) → BodySizeLimitMiddleware (413) →
FastAPI (routing, validation, the exception handlers of `api.errors`) → a route.

OpenAPI: FastAPI's public /openapi.json, /docs and /redoc are switched off; /openapi.json is
served by a route of our own, behind the API key like everything but /healthz and /metrics.
/docs stays off because a browser cannot send X-API-Key; point any OpenAPI viewer at
/openapi.json with the header instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from api import apikeys, approvals  # noqa: F401 - importing them adds their routes to add_routes' table
from api.dashboard import Dashboard, add_dashboard
from api.errors import install_error_handlers
from api.middleware import PUBLIC_PATHS, ApiKeyMiddleware, BodySizeLimitMiddleware, TokenBucketLimiter
from api.routes import ApiState, HealthProbe, add_routes
from domain.settings import Settings
from flows.triggers import RunSubmitter
from storage.db import database_probe
from web.dashboard_views import DeadLetters

DEFAULT_RATE_LIMIT_PER_MINUTE = 120
DEFAULT_MAX_BODY_BYTES = 64 * 1024


def _package_version() -> str:
    try:
        return version("retrainer")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        return "0.0.0"


def create_app(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    submit: RunSubmitter | None,
    health_probes: Mapping[str, HealthProbe] | None = None,
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    dead_letters: Callable[[], DeadLetters] | None = None,
) -> FastAPI:
    """The API application.

    - `submit` starts the flow run of a newly created run (None: runs stay queued for another
      process to pick up).
    - `health_probes` maps a dependency's name to a callable that raises a RetrainerError when it
      does not answer; default: the database only.
    - `rate_limit_per_minute` applies per API key, in this process; `max_body_bytes` to every body.
    - `dead_letters` reads the dead-letter topic for the dashboard (`consumers.dead_letters.dead_letter_reader`;
      None: its page says Kafka is not configured for this process).
    """
    probes = dict(health_probes) if health_probes is not None else {"database": database_probe(sessions)}
    app = FastAPI(
        title="Retrainer API",
        version=_package_version(),
        description="Triggers, runs and their decision records, model versions, rollouts and overrides. "
        f"Every route except {', '.join(sorted(PUBLIC_PATHS))} needs the X-API-Key header.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.retrainer = ApiState(sessions=sessions, settings=settings, submit=submit, health_probes=probes)
    add_routes(app)
    # /ui: the web dashboard, behind its own sign-in (api/dashboard.py)
    add_dashboard(app, Dashboard(prefect_ui_url=settings.prefect_ui_url or None, dead_letters=dead_letters))
    install_error_handlers(app)
    # add_middleware wraps: the last one added is the outermost, so the key is checked first.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, sessions=sessions, limiter=TokenBucketLimiter(rate_limit_per_minute))
    return app
