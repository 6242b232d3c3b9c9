"""schemathesis against the API's own /openapi.json (issue 16): for every operation, generated
requests that fit the schema (positive) and requests that break it (negative) go to a real server
(free port) on a throwaway SQLite database, and the answers must hold: no 500, every status,
content type and body as the schema declares, nothing that breaks the schema accepted, nothing
that fits it refused except by the state (404, 409 and the STATE_REFUSALS below).

The database holds the pipeline with versions 1-3, v1 then v2 champion, v3 in an active canary and
one run, and path parameters and versions are drawn mostly from those, so promote, rollback,
freeze and the rollout actions reach their real code paths, not only their 404s; each operation
must succeed at least once. The key's rate limit is raised so that no example is answered 429.
Seeded and bounded (MAX_EXAMPLES per operation and mode), so CI sends the same requests every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.server import running_api
from domain import entities as e
from domain.settings import Settings
from storage import repositories as repo
from storage.db import transaction
from tests.api.approval_runs import APPROVAL_SPEC, waiting_run
from tests.api.conftest import PIPELINE

MAX_EXAMPLES = 30
RATE_LIMIT_PER_MINUTE = 1_000_000  # schemathesis sends thousands of requests a minute with one key
# A valid request may still meet the state: an unknown run or a version that is already champion.
ACCEPTED = ["2xx", "404", "409"]
# Refusals that depend on the server's state, by operation: (status, error code).
STATE_REFUSALS = {
    # the Idempotency-Key was sent before with another body (the contract's 422)
    ("POST", "/api/v1/trigger/train"): (422, "idempotency_key_reused"),
    # a cursor this server never gave out: it is opaque, so any string of the right length fits the schema
    ("GET", "/api/v1/runs"): (400, "invalid_input"),
}
SEEDED_RUN = "0f0e5eed-0000-4000-8000-000000000001"
SPARE_KEY = "spare-reader"  # an API key that DELETE /api/v1/apikeys/{key_name} can revoke (never the test's own)


def seed(sessions: sessionmaker[Session]) -> None:
    """Versions 1-3 of the pipeline, v1 then v2 champion, v3 in an active canary, and one manual run
    awaiting approval of its v4."""
    with transaction(sessions) as session:
        versions = [
            repo.register_model_version(
                session, PIPELINE, artifact_uri=f"file:///tmp/m/{n}", sha256=f"{n:x}" * 64, size_bytes=1, metrics={}
            )
            for n in (1, 2, 3)
        ]
        previous = None
        for version in versions[:2]:
            repo.move_champion(
                session, PIPELINE, version.id, expected_from_version_id=previous, actor="seed", reason="passed the gate"
            )
            previous = version.id
        repo.start_rollout(
            session,
            PIPELINE,
            candidate_version_id=versions[2].id,
            champion_version_id=versions[1].id,
            policy={"steps": [50, 100]},
        )
        # the run awaits approval (v4) under a spec that asks for it, so approve and reject can succeed
        repo.upsert_pipeline(session, PIPELINE, "digits", APPROVAL_SPEC)
        waiting_run(session, run_id=SEEDED_RUN)
        repo.create_api_key(session, SPARE_KEY, ["read"])


# Values drawn for a parameter most of the time (the rest are generated), so requests meet the seeded state.
DICTIONARIES: dict[str, list[Any]] = {
    "pipelines": [PIPELINE],
    "runs": [SEEDED_RUN],
    "versions": [1, 2, 3],
    "keys": [SPARE_KEY],
}
BINDINGS = {
    "path.name": ("pipelines", 0.8),
    "path.run_id": ("runs", 0.8),
    "query.pipeline": ("pipelines", 0.5),
    "body.pipeline": ("pipelines", 0.8),
    "body.version": ("versions", 0.8),
    "body.to_version": ("versions", 0.5),
    "path.key_name": ("keys", 0.8),
}
CONFIG = SchemathesisConfig.from_dict(
    {
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
        "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
        "dictionaries": {name: {"values": entries} for name, entries in DICTIONARIES.items()},
        "parameters": {key: {"dictionary": name, "probability": p} for key, (name, p) in BINDINGS.items()},
    }
)


def openapi_document() -> dict[str, Any]:
    """The API's /openapi.json; it depends on no database, so an unbound app serves it at import time
    (schemathesis' fixture-based loading does not run under pytest 9: `Function._nodeid` is gone)."""
    app = create_app(sessions=sessionmaker(), settings=Settings(), submit=None, health_probes={})
    return app.openapi()


schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)


@pytest.fixture
def api_url(make_app: Callable[..., FastAPI], sessions: sessionmaker[Session], pipeline: e.Pipeline) -> Iterator[str]:
    """A real server (free port) on this test's database, seeded; schemathesis' own probes (e.g.
    the same request without the key) go to the base URL too."""
    seed(sessions)
    with running_api(make_app(rate_limit_per_minute=RATE_LIMIT_PER_MINUTE)) as url:
        yield url


@pytest.fixture
def statuses() -> Iterator[list[int]]:
    """The statuses one operation answered; at least one success, or the fuzz never got past the refusals."""
    seen: list[int] = []
    yield seen
    assert any(200 <= status < 300 for status in seen), f"no request succeeded: {sorted(set(seen))}"


def state_refusal(case: Any, response: Any) -> bool:
    """A refusal that depends on what the server holds, not on the request's shape (so no schema
    can state it), and that the operation documents."""
    code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
    return STATE_REFUSALS.get((case.method.upper(), case.path)) == (response.status_code, code)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_its_schema_says(case: Any, api_url: str, api_key: str, statuses: list[int]) -> None:
    headers = {"X-API-Key": api_key}
    response = case.call(base_url=api_url, headers=headers)
    statuses.append(response.status_code)
    case.validate_response(
        response,
        headers=headers,
        excluded_checks=[positive_data_acceptance] if state_refusal(case, response) else [],
        transport_kwargs={"base_url": api_url, "headers": headers},
    )


def test_rolling_back_to_the_champion_itself_is_a_conflict_not_bad_input(api_url: str, api_key: str) -> None:
    """Found by the fuzz above: the alias history refused a schema-valid rollback with 400."""
    reason = {"reason": "latency regression seen in production"}
    for version, says in [(2, "is the champion already"), (3, "was never a champion")]:
        response = httpx.post(
            f"{api_url}/api/v1/pipelines/{PIPELINE}/rollback",
            json={"to_version": version, **reason},
            headers={"X-API-Key": api_key},
        )
        assert response.status_code == 409 and response.json()["error"]["code"] == "conflict", response.text
        assert says in response.json()["error"]["message"]


def test_a_body_that_is_not_utf8_is_an_invalid_request_like_bad_json(api_url: str, api_key: str) -> None:
    """Found by the fuzz above: FastAPI answered such a body 400 `http_400`, a status the schema does not list."""
    for body in [b"\xff", b'{"pipeline": "\xff"}']:
        response = httpx.post(
            f"{api_url}/api/v1/trigger/train",
            content=body,
            headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", response.text
        assert "UTF-8 JSON" in response.json()["error"]["message"]
