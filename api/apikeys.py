"""API key management over HTTP, for keys with the `admin` scope (`retrainer apikey …` does the same
with database access instead):

    GET    /api/v1/apikeys             every key: name, scopes, created, last used, revoked (never
                                       the secret nor its hash)
    POST   /api/v1/apikeys             {"name": "ci-bot", "scopes": ["trigger"]} → 201 with the new
                                       secret, shown this once (only its sha256 is stored)
    DELETE /api/v1/apikeys/{key_name}  revokes: refused (401) from the next request on, by the API and
                                       the model servers (`revoke_api_key` notifies them, as the CLI's does)

A key may not revoke itself while it is the last unrevoked `admin` key (409): nothing could manage
keys over HTTP afterwards. The actor of each change, in the log, is the presenting key's name. The
routes join the API's table (`api.routes.add_routes`) when this module is imported, as `api.app` does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Path
from pydantic import Field, StringConstraints

from api.routes import API_PREFIX, Key, State, _route
from api.schemas import ErrorBody, _Request, _Response
from domain import entities as e
from domain.apikeys import DEFAULT_SCOPES, Scope, format_scopes
from domain.errors import ConflictError
from storage import repositories as repo
from storage.db import transaction

log = logging.getLogger("retrainer.api")

KEYS_PATH = API_PREFIX + "/apikeys"
# URL-safe, so DELETE /api/v1/apikeys/{key_name} can name every key made here (the CLI accepts any name).
_KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
KeyName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_KEY_NAME_PATTERN)]


class ApiKeyBody(_Request):
    name: KeyName = Field(description="Who or what the key is for, e.g. ci-bot: letters, digits and . _ @ -.")
    scopes: list[Scope] = Field(
        default_factory=lambda: sorted(DEFAULT_SCOPES),
        min_length=1,
        description="What the key may do: read, trigger, operate (approvals, rollouts, freezes, champion moves; "
        "the model server's stats and load), admin (these routes), infer, feedback. Default: read only.",
    )


class ApiKeyOut(_Response):
    name: str
    scopes: list[str] = Field(description="In the order read, trigger, operate, admin, infer, feedback.")
    created_at: str
    last_used_at: str | None = Field(description="Its last request to the HTTP API (ISO 8601).")
    revoked_at: str | None = Field(description="Null while the key is valid.")


class ApiKeyList(_Response):
    keys: list[ApiKeyOut] = Field(description="Every key, revoked ones too, by name.")


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret for the X-API-Key header, shown this once: only its sha256 is stored.")


def _out(key: e.ApiKey) -> dict[str, Any]:
    moments = {"created_at": key.created_at, "last_used_at": key.last_used_at, "revoked_at": key.revoked_at}
    return {
        "name": key.name,
        "scopes": format_scopes(key.scopes).split(),
        **{field: moment.isoformat() if moment else None for field, moment in moments.items()},
    }


@_route("GET", KEYS_PATH, scope=Scope.ADMIN, summary="API keys and their scopes")
def list_keys(state: State) -> ApiKeyList:
    with transaction(state.sessions) as session:
        keys = repo.list_api_keys(session)
    return ApiKeyList(keys=[ApiKeyOut(**_out(key)) for key in keys])


@_route(
    "POST",
    KEYS_PATH,
    scope=Scope.ADMIN,
    status_code=201,
    summary="Create an API key",
    description="Answers the secret once; store it then. 409 if a key of that name exists (revoked ones too).",
    responses={409: {"model": ErrorBody, "description": "A key of that name exists."}},
)
def create_key(body: ApiKeyBody, state: State, key: Key) -> ApiKeyCreated:
    with transaction(state.sessions) as session:
        created, plaintext = repo.create_api_key(session, body.name, body.scopes)
    log.info("API key %s created API key %s (%s)", key.name, created.name, format_scopes(created.scopes))
    return ApiKeyCreated(**_out(created), key=plaintext)


@_route(
    "DELETE",
    KEYS_PATH + "/{key_name}",
    scope=Scope.ADMIN,
    summary="Revoke an API key",
    description="Refused (401) from the next request on, by the API and the model servers. Revoking a revoked "
    "key again answers it unchanged. 409 when a key would revoke itself as the last admin key.",
    responses={
        404: {"model": ErrorBody, "description": "No key of that name."},
        409: {"model": ErrorBody, "description": "The key would revoke itself as the last admin key."},
    },
)
def revoke_key(
    key_name: Annotated[str, Path(min_length=1, max_length=200, description="The key's name.")], state: State, key: Key
) -> ApiKeyOut:
    with transaction(state.sessions) as session:
        if key_name == key.name and not _other_admins(repo.list_api_keys(session), key.name):
            raise ConflictError(
                f"API key {key.name!r} is the last admin key and cannot revoke itself: nothing could manage keys "
                'over HTTP afterwards; create another admin key first (POST /api/v1/apikeys with scopes ["admin"] '
                "or `retrainer apikey create NAME --scope admin`), or revoke it with `retrainer apikey revoke`"
            )
        revoked = repo.revoke_api_key(session, key_name)
    log.info("API key %s revoked API key %s", key.name, revoked.name)
    return ApiKeyOut(**_out(revoked))


def _other_admins(keys: list[e.ApiKey], name: str) -> list[str]:
    return [k.name for k in keys if k.name != name and k.revoked_at is None and k.allows(Scope.ADMIN)]
