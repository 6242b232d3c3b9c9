"""API key management over HTTP (api/apikeys.py): list, create and revoke need the `admin` scope (403
naming it); a list never shows a secret or its hash; a created key works at once; a revoked key is
refused at once by the API and by a model server that had cached its verdict; a key cannot revoke
itself as the last admin key (409 with the fix)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.apikeys import hash_api_key
from serving.app import create_serving_app
from serving.keys import KeyCheck
from serving.registry import ModelRegistry
from storage import repositories as repo
from storage.db import transaction
from tests.api.conftest import KEY_NAME, error_code
from tests.api.test_scopes import new_key
from tests.serving.conftest import tiny_model

KEYS = "/api/v1/apikeys"


@pytest.fixture
def model_server(sessions: sessionmaker[Session]) -> Iterator[TestClient]:
    """A model server whose keys are the API's (one metadata database), serving `digits` v1."""
    registry = ModelRegistry(["digits"], rng=random.Random(1))  # noqa: S311
    registry.set_champion(tiny_model("1"))
    keys = KeyCheck(sessions).start()
    try:
        with TestClient(create_serving_app(registry, keys=keys)) as client:
            yield client
    finally:
        keys.stop()
        registry.close()


def test_keys_are_listed_without_their_secrets_and_created_keys_work_at_once(
    client: TestClient, api_key: str, sessions: sessionmaker[Session]
) -> None:
    created = client.post(KEYS, json={"name": "ci-trigger", "scopes": ["trigger", "read", "trigger"]})
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    assert created.json()["scopes"] == ["read", "trigger"] and created.json()["revoked_at"] is None
    assert client.get("/api/v1/pipelines", headers={"X-API-Key": secret}).status_code == 200
    default = client.post(KEYS, json={"name": "dashboard"})
    assert default.status_code == 201 and default.json()["scopes"] == ["read"]  # least privilege by default

    listed = client.get(KEYS)
    assert listed.status_code == 200
    keys = {item["name"]: item for item in listed.json()["keys"]}
    assert list(keys) == ["ci-bot", "ci-trigger", "dashboard"]
    assert set(keys["ci-trigger"]) == {"name", "scopes", "created_at", "last_used_at", "revoked_at"}
    assert keys["ci-trigger"]["scopes"] == ["read", "trigger"] and keys["ci-trigger"]["last_used_at"] is not None
    assert keys[KEY_NAME]["scopes"] == ["read", "trigger", "operate", "admin"]
    for plaintext in (secret, api_key):
        assert plaintext not in listed.text and hash_api_key(plaintext) not in listed.text

    again = client.post(KEYS, json={"name": "ci-trigger", "scopes": ["read"]})
    assert again.status_code == 409 and error_code(again) == "conflict"
    bad_scope = client.post(KEYS, json={"name": "x", "scopes": ["root"]})
    assert bad_scope.status_code == 422 and "scopes" in bad_scope.text
    for name in ("a/b", " ", "", "x" * 201):
        assert client.post(KEYS, json={"name": name}).status_code == 422, name
    assert client.post(KEYS, json={"name": "empty", "scopes": []}).status_code == 422
    wrong_method = client.put(KEYS)  # the path has two routes: Allow names both (api/errors.py)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET, POST"
    with transaction(sessions) as session:
        assert [key.name for key in repo.list_api_keys(session)] == ["ci-bot", "ci-trigger", "dashboard"]


def test_each_operation_needs_the_admin_scope_and_403_names_it(
    make_app: Callable[..., FastAPI], sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    operator = {"X-API-Key": new_key(sessions, "alice", "read", "operate", "trigger")}
    with TestClient(make_app(), headers=operator) as client:
        for refused in (
            client.get(KEYS),
            client.post(KEYS, json={"name": "mine", "scopes": ["admin"]}),
            client.delete(f"{KEYS}/alice"),
        ):
            assert refused.status_code == 403 and error_code(refused) == "forbidden"
            message = refused.json()["error"]["message"]
            assert "'admin'" in message and "alice" in message and "--scope admin" in message
        assert client.get(KEYS, headers={"X-API-Key": "rt_00000000_not-a-key"}).status_code == 401
    with transaction(sessions) as session:
        assert [(k.name, k.revoked_at) for k in repo.list_api_keys(session)] == [("alice", None)]


def test_a_revoked_key_is_refused_at_once_by_the_api_and_the_model_server(
    client: TestClient, sessions: sessionmaker[Session], model_server: TestClient
) -> None:
    created = client.post(KEYS, json={"name": "controller", "scopes": ["operate", "read"]})
    operator = {"X-API-Key": created.json()["key"]}
    assert client.get("/api/v1/pipelines", headers=operator).status_code == 200
    assert model_server.get("/v2/models/digits/stats", headers=operator).status_code == 200  # verdict now cached

    revoked = client.delete(f"{KEYS}/controller")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert "key" not in revoked.json()
    api_refusal = client.get("/api/v1/pipelines", headers=operator)
    assert api_refusal.status_code == 401 and error_code(api_refusal) == "unauthorized"
    assert model_server.get("/v2/models/digits/stats", headers=operator).status_code == 401
    again = client.delete(f"{KEYS}/controller")  # revoking again changes nothing
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    unknown = client.delete(f"{KEYS}/nobody")
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"


def test_the_last_admin_key_cannot_revoke_itself(client: TestClient, sessions: sessionmaker[Session]) -> None:
    new_key(sessions, "reader", "read")  # not an admin: does not count
    refused = client.delete(f"{KEYS}/{KEY_NAME}")
    assert refused.status_code == 409 and error_code(refused) == "conflict"
    message = refused.json()["error"]["message"]
    assert "last admin key" in message and "--scope admin" in message and "retrainer apikey revoke" in message
    assert client.get(KEYS).status_code == 200  # still valid

    other = {"X-API-Key": client.post(KEYS, json={"name": "second-admin", "scopes": ["admin"]}).json()["key"]}
    assert client.delete(f"{KEYS}/{KEY_NAME}").status_code == 200  # another admin remains: allowed
    assert client.get(KEYS).status_code == 401
    last = client.delete(f"{KEYS}/second-admin", headers=other)  # now the last one
    assert last.status_code == 409 and error_code(last) == "conflict"
    assert client.get(KEYS, headers=other).status_code == 200
