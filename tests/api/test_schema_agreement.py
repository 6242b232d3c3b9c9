"""The OpenAPI document states every rule the API enforces on request bodies, and the API accepts
nothing it forbids (issue 16, schemathesis): each test reads the property's schema from the real
app's /openapi.json and sends the request through the app."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.schemas import MAX_VERSION
from domain import entities as e
from storage import repositories as repo
from storage.db import transaction
from tests.api.conftest import PIPELINE, error_code

BASE = f"/api/v1/pipelines/{PIPELINE}"
JUSTIFIED = ["/promote", "/rollback", "/rollout/abort", "/rollout/promote"]


def body_property(client: TestClient, path: str, name: str) -> dict[str, Any]:
    """The schema of property `name` of the JSON body of POST `path`, $refs resolved."""
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")  # JSON Schema 2020-12: 2.0 is an integer
    operation = document["paths"][path.replace(PIPELINE, "{name}")]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    prop: dict[str, Any] = schema["properties"][name]
    assert schema["additionalProperties"] is False
    return prop


def register_versions(sessions: sessionmaker[Session], count: int) -> None:
    with transaction(sessions) as session:
        for n in range(1, count + 1):
            repo.register_model_version(
                session, PIPELINE, artifact_uri=f"file:///tmp/m/{n}", sha256=f"{n:x}" * 64, size_bytes=1, metrics={}
            )


def test_freeze_until_is_an_rfc3339_string_never_a_number(client: TestClient) -> None:
    until = body_property(client, BASE + "/freeze", "until")
    assert {"type": "string", "format": "date-time"} in until["anyOf"]
    assert {"type": "integer"} not in until["anyOf"] and {"type": "number"} not in until["anyOf"]
    for refused in [0, 1700000000, "0", "1700000000", "2030-01-01 00:00:00Z", "2030-01-01T00:00Z", True]:
        response = client.post(BASE + "/freeze", json={"until": refused, "reason": "holiday freeze"})
        assert response.status_code == 422 and error_code(response) == "invalid_request", refused
        assert "RFC 3339" in response.json()["error"]["message"]
    assert client.get("/api/v1/pipelines").json()["pipelines"][0]["frozen_until"] is None  # not 1970
    naive = client.post(BASE + "/freeze", json={"until": "2030-01-01T00:00:00", "reason": "holiday freeze"})
    assert naive.status_code == 422 and error_code(naive) == "invalid_request"
    for accepted, stored in [
        ("2030-01-01T00:00:00Z", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01t01:30:00.5+01:30", datetime(2030, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ]:
        response = client.post(BASE + "/freeze", json={"until": accepted, "reason": "holiday freeze"})
        assert response.status_code == 200, response.json()
        assert datetime.fromisoformat(response.json()["frozen_until"]) == stored
    lifted = client.post(BASE + "/freeze", json={"until": None, "reason": "holiday over"})
    assert lifted.status_code == 200 and lifted.json()["frozen_until"] is None


@pytest.mark.parametrize("route", JUSTIFIED)
def test_justification_of_10_characters_is_in_the_schema_and_enforced_with_400(client: TestClient, route: str) -> None:
    reason = body_property(client, BASE + route, "reason")
    assert reason["minLength"] == 10 and reason["maxLength"] == 2000
    # 10 characters once ASCII whitespace is stripped, a rule Python and ECMA 262 regexes read alike
    assert reason["pattern"] == r"[^ \t\n\r\f\v][\s\S]{8,}[^ \t\n\r\f\v]"
    body: dict[str, Any] = {"version": 1} if route == "/promote" else {}
    for short in ["too short", " " * 12, "   short    "]:
        response = client.post(BASE + route, json={**body, "reason": short})
        assert response.status_code == 400 and error_code(response) == "invalid_input", short
        assert "needs a justification of at least 10 characters" in response.json()["error"]["message"]
    # Ten characters pass the check: what answers next is the pipeline's state, not the reason. A control
    # character such as \x1c counts (str.strip() would take it, the schema's regex would not).
    for enough in [" ten chars! ", "\x1cnine char"]:
        response = client.post(BASE + route, json={**body, "reason": enough})
        assert response.status_code in (404, 409) and error_code(response) in ("not_found", "conflict"), enough
    too_long = client.post(BASE + route, json={**body, "reason": "x" * 2001})
    assert too_long.status_code == 422 and error_code(too_long) == "invalid_request"


def test_versions_are_json_integers_in_range(client: TestClient, sessions: sessionmaker[Session]) -> None:
    register_versions(sessions, 3)
    version = body_property(client, BASE + "/promote", "version")
    assert version == {**version, "type": "integer", "minimum": 1, "maximum": MAX_VERSION}
    to_version = body_property(client, BASE + "/rollback", "to_version")
    assert {"type": "integer", "minimum": 1, "maximum": MAX_VERSION} in to_version["anyOf"]
    reason = "reviewed the evidence by hand"
    for refused in [2.5, "2", True, 0, MAX_VERSION + 1, 10**30]:
        for route, field in [("/promote", "version"), ("/rollback", "to_version")]:
            response = client.post(BASE + route, json={field: refused, "reason": reason})
            assert response.status_code == 422 and error_code(response) == "invalid_request", (route, refused)
    # 2.0 is an integer in JSON Schema 2020-12 (OpenAPI 3.1), so the API takes it as 2.
    promoted = client.post(BASE + "/promote", json={"version": 2.0, "reason": reason})
    assert promoted.status_code == 200 and promoted.json()["champion_version"] == 2
    promoted = client.post(BASE + "/promote", json={"version": 3, "reason": reason})
    assert promoted.status_code == 200 and promoted.json()["champion_version"] == 3
    rolled = client.post(BASE + "/rollback", json={"to_version": 2.0, "reason": "latency regression"})
    assert rolled.status_code == 200 and rolled.json()["champion_version"] == 2


def test_strings_are_measured_as_sent_then_stripped(client: TestClient, pipeline: e.Pipeline) -> None:
    name = body_property(client, "/api/v1/trigger/train", "pipeline")
    filled = r"[^ \t\n\r\f\v]"  # not only ASCII whitespace (what is stripped)
    assert name["minLength"] == 1 and name["maxLength"] == 200 and name["pattern"] == filled
    assert body_property(client, BASE + "/freeze", "reason")["pattern"] == filled
    blank = client.post("/api/v1/trigger/train", json={"pipeline": "   "})
    assert blank.status_code == 422 and error_code(blank) == "invalid_request"
    padded = client.post("/api/v1/trigger/train", json={"pipeline": f"  {pipeline.name} "})
    assert padded.status_code == 202
    # 2001 characters as sent are over maxLength even if stripping would bring them under it.
    long_reason = client.post("/api/v1/trigger/train", json={"pipeline": PIPELINE, "reason": " " * 10 + "x" * 1991})
    assert long_reason.status_code == 422 and error_code(long_reason) == "invalid_request"
    blank_reason = client.post(BASE + "/freeze", json={"until": None, "reason": "  "})
    assert blank_reason.status_code == 422 and error_code(blank_reason) == "invalid_request"
