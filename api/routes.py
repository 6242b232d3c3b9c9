"""Routes of the HTTP API (CONTRACT section 3) and the service's own endpoints.

Each route opens its own transaction (`storage.db.transaction`) and calls repositories or flows;
errors are never turned into responses here but raised, for `api.errors`' single mapping.
Routes are plain `def`s: the database calls are blocking, so Starlette runs them in its threadpool.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ForbiddenError, IdempotencyKeyReusedError, UnauthorizedError
from api.middleware import API_KEY_HEADER
from api.paging import MAX_CURSOR_CHARS, decode_run_cursor, encode_run_cursor
from api.query import declared_query_only
from api.schemas import (
    AliasMoveOut,
    ErrorBody,
    FreezeBody,
    FreezeOut,
    HealthOut,
    ModelVersionList,
    ModelVersionOut,
    PipelineDetail,
    PipelineList,
    PipelineOut,
    PromoteBody,
    ReplicaOut,
    RollbackBody,
    RolloutActionBody,
    RolloutOut,
    RolloutOutcome,
    RolloutStepOut,
    RunDetail,
    RunList,
    RunSummary,
    TriggerAccepted,
    TriggerBody,
    TriggerInfo,
)
from domain import entities as e
from domain.apikeys import Scope
from domain.errors import ConflictError, NotFoundError
from domain.evidence import ServingReplica
from domain.settings import Settings
from flows import champion, records
from flows.tracing import span
from flows.triggers import RunSubmitter, TriggerRequest, request_run
from storage import repositories as repo
from storage.db import transaction
from web.health import health_report, metrics_response

log = logging.getLogger("retrainer.api")

HealthProbe = Callable[[], None]
"""Returns if a dependency answers; raises a RetrainerError naming it and the fix otherwise."""


@dataclass(frozen=True, slots=True)
class ApiState:
    """What routes need from the process: set once on `app.state.retrainer` by `create_app`."""

    sessions: sessionmaker[Session]
    settings: Settings
    submit: RunSubmitter | None
    health_probes: Mapping[str, HealthProbe]


def get_state(request: Request) -> ApiState:
    state = request.app.state.retrainer
    if not isinstance(state, ApiState):  # pragma: no cover - create_app always sets it
        raise TypeError("app.state.retrainer is not an ApiState; build the app with api.app.create_app")
    return state


# Declares the scheme in /openapi.json; the check itself is ApiKeyMiddleware, ahead of every route.
_api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="Created with `retrainer apikey create NAME`."
)


def current_key(request: Request, _declared: Annotated[str | None, Depends(_api_key_scheme)]) -> e.ApiKey:
    key = getattr(request.state, "api_key", None)
    if not isinstance(key, e.ApiKey):  # only if a route were mounted outside ApiKeyMiddleware
        raise UnauthorizedError(f"missing {API_KEY_HEADER} header")
    return key


def requires(scope: Scope) -> Callable[..., None]:
    """A dependency that refuses (403, naming `scope`) a key without `scope`."""

    def check(key: Annotated[e.ApiKey, Depends(current_key)]) -> None:
        if not key.allows(scope):
            held = ", ".join(sorted(key.scopes)) or "none"
            raise ForbiddenError(
                f"API key {key.name!r} lacks the {scope.value!r} scope this needs (it has: {held}); "
                f"use a key created with `retrainer apikey create NAME --scope {scope.value}`"
            )

    return check


State = Annotated[ApiState, Depends(get_state)]
Key = Annotated[e.ApiKey, Depends(current_key)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key."},
    403: {"model": ErrorBody, "description": "The key lacks the scope this operation needs."},
    413: {"model": ErrorBody, "description": "Body over the size limit."},
    429: {"model": ErrorBody, "description": "Rate limit of the key reached; see Retry-After."},
}
REPLICAS_SHOWN_FOR = timedelta(hours=1)  # a replica silent longer is gone, not worth a line
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "Unknown pipeline or run."}}
_OVERRIDE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    400: {"model": ErrorBody, "description": "Refused input, e.g. a reason under 10 characters."},
    409: {"model": ErrorBody, "description": "Contradicts the current state, e.g. already champion."},
}

API_PREFIX = "/api/v1"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    path: str
    endpoint: Callable[..., Any]
    options: dict[str, Any]


_ROUTES: list[_Route] = []


def _route(
    method: str, path: str, *, public: bool = False, scope: Scope = Scope.READ, **options: Any
) -> Callable[[Endpoint], Endpoint]:
    """Records a route for `add_routes`. Non-public routes declare the API key (OpenAPI) and the
    refusals every protected route can answer, and need `scope` (403 without it); the key itself
    is checked by ApiKeyMiddleware."""

    def record(endpoint: Endpoint) -> Endpoint:
        if not public:
            options["dependencies"] = [Depends(requires(scope)), *options.get("dependencies", ())]
            options["responses"] = {**_ERRORS, **options.get("responses", {})}
        _ROUTES.append(_Route(method, path, endpoint, options))
        return endpoint

    return record


def _override(path: str, summary: str, description: str) -> Callable[[Endpoint], Endpoint]:
    """An operator's override (POST under the API prefix, `operate` scope): answers the override refusals too."""
    return _route(
        "POST",
        API_PREFIX + path,
        scope=Scope.OPERATE,
        summary=summary,
        description=description,
        responses=_OVERRIDE_ERRORS,
    )


def add_routes(app: FastAPI) -> None:
    """Adds every route to `app` directly (not through an included router), so `app.routes` lists
    each one with its full path and methods: what the auth test walks. A route with query parameters
    refuses any other: a misspelt `?pipline=` would otherwise list every pipeline's runs."""
    for route in _ROUTES:
        options = {
            **route.options,
            "dependencies": [*route.options.get("dependencies", ()), Depends(declared_query_only)],
        }
        app.add_api_route(route.path, route.endpoint, methods=[route.method], **options)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def request_digest(body: TriggerBody) -> str:
    """sha256 of the canonical JSON of the validated body (sorted keys, defaults filled in), so
    `{"pipeline": "p"}` and `{"reason": null, "pipeline": "p"}` are the same request."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _VersionNumbers:
    """Model version ids → version numbers within one transaction, each looked up once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[int, int] = {}

    def __call__(self, version_id: int | None) -> int | None:
        if version_id is None:
            return None
        if version_id not in self._cache:
            self._cache[version_id] = repo.get_model_version_by_id(self.session, version_id).version
        return self._cache[version_id]


def _run_summary(run: e.Run, version_of: _VersionNumbers) -> RunSummary:
    return RunSummary(
        run_id=run.id,
        pipeline=run.pipeline,
        status=run.status.value,
        trigger=TriggerInfo(kind=run.trigger_kind.value, event_ids=list(run.event_ids)),
        model_version=version_of(run.model_version_id),
        created_at=run.created_at.isoformat(),
        finished_at=_iso(run.finished_at),
        reason=run.reason,
        started_at=_iso(run.started_at),
        error=run.error,
    )


def _alias_move(move: e.AliasMove, version_of: _VersionNumbers) -> AliasMoveOut:
    return AliasMoveOut(
        pipeline=move.pipeline,
        champion_version=version_of(move.to_version_id),
        previous_version=version_of(move.from_version_id),
        actor=move.actor,
        reason=move.reason,
        moved_at=move.moved_at.isoformat(),
    )


def _actor(key: e.ApiKey, claimed: str | None) -> str:
    """The API key's name, or the claimed actor together with the key that vouches for it."""
    if not claimed or claimed == key.name:
        return key.name
    return f"{claimed} (API key {key.name})"


# ---------------------------------------------------------------------------------- triggers


@_route(
    "POST",
    API_PREFIX + "/trigger/train",
    scope=Scope.TRIGGER,
    status_code=202,
    summary="Trigger a training run of a pipeline",
    description="Queues a manual run. With an Idempotency-Key, the same key and body again return the "
    "same run; the same key with another body is refused (422, code idempotency_key_reused).",
    responses={**_NOT_FOUND, 422: {"model": ErrorBody, "description": "Invalid body, or Idempotency-Key reused."}},
)
def trigger_train(
    body: TriggerBody,
    response: Response,
    state: State,
    key: Key,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=200, description="Makes retries safe."),
    ] = None,
    traceparent: Annotated[
        str | None,
        Header(description="W3C Trace Context: the run continues this trace (an invalid one starts a new trace)."),
    ] = None,
) -> TriggerAccepted:
    reason = f"{body.reason or 'manual trigger'} (API key {key.name})"
    request = TriggerRequest(
        kind=e.TriggerKind.MANUAL,
        reason=reason,
        idempotency_key=idempotency_key,
        request_sha256=request_digest(body),
    )
    try:
        with span("trigger", parent=traceparent, pipeline=body.pipeline, api_key=key.name):
            result = request_run(state.sessions, body.pipeline, request, state.submit)
    except ConflictError as err:
        # create_run's only conflict is an Idempotency-Key reused for another request; the
        # contract answers that with 422, other conflicts keep 409 (see api.errors).
        if idempotency_key is None:
            raise
        raise IdempotencyKeyReusedError(err.message) from err
    response.headers["Location"] = f"{API_PREFIX}/runs/{result.run.id}"
    return TriggerAccepted(run_id=result.run.id, status=result.run.status.value, created=result.created)


# -------------------------------------------------------------------------------------- runs

_RUN_PAGES = (
    "Summaries without the decision record (GET /api/v1/runs/{run_id} has it). Pages: pass the answer's "
    "`next_cursor` as `cursor` for the next page (null on the last one)."
)


@_route(
    "GET",
    API_PREFIX + "/runs/{run_id}",
    summary="A run with its decision record",
    description="Trigger, data, candidate and champion metrics, gate verdicts and outcome of one run.",
    responses=_NOT_FOUND,
)
def show_run(run_id: str, state: State) -> RunDetail:
    with transaction(state.sessions) as session:
        record = records.decision_record(session, run_id)
    return RunDetail.model_validate(record)


@_route(
    "GET",
    API_PREFIX + "/runs",
    summary="Recent runs, newest first",
    description=_RUN_PAGES,
    responses={**_NOT_FOUND, 400: {"model": ErrorBody, "description": "A cursor this API did not give out."}},
)
def list_runs(
    state: State,
    pipeline: Annotated[str | None, Query(max_length=200, description="Only this pipeline's runs.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many runs.")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=MAX_CURSOR_CHARS, description="The previous page's `next_cursor`.")
    ] = None,
) -> RunList:
    after = decode_run_cursor(cursor) if cursor is not None else None
    with transaction(state.sessions) as session:
        version_of = _VersionNumbers(session)
        page, following = repo.runs_page(session, pipeline, limit, after=after)
        runs = [_run_summary(run, version_of) for run in page]
    return RunList(runs=runs, next_cursor=encode_run_cursor(following) if following else None)


# --------------------------------------------------------------------------------- pipelines


@_route("GET", API_PREFIX + "/pipelines", summary="Registered pipelines and their champions")
def list_pipelines(state: State) -> PipelineList:
    with transaction(state.sessions) as session:
        version_of = _VersionNumbers(session)
        pipelines = [
            PipelineOut(
                name=p.name,
                dataset=p.dataset,
                champion_version=version_of(p.champion_version_id),
                frozen_until=_iso(p.frozen_until),
            )
            for p in repo.list_pipelines(session)
        ]
    return PipelineList(pipelines=pipelines)


@_route(
    "GET",
    API_PREFIX + "/pipelines/{name}",
    summary="A pipeline, its champion, and the model-server replicas serving it",
    responses=_NOT_FOUND,
)
def get_pipeline(name: str, state: State) -> PipelineDetail:
    now = datetime.now(UTC)
    with transaction(state.sessions) as session:
        p = repo.get_pipeline(session, name)
        champion_version = _VersionNumbers(session)(p.champion_version_id)
        replicas = repo.serving_replicas(session, heard_since=now - REPLICAS_SHOWN_FOR, pipeline=name)
    return PipelineDetail(
        name=p.name,
        dataset=p.dataset,
        champion_version=champion_version,
        frozen_until=_iso(p.frozen_until),
        replicas=[_replica_out(r, name, now) for r in replicas],
    )


def _replica_out(replica: ServingReplica, pipeline: str, now: datetime) -> ReplicaOut:
    served = replica.serving[pipeline]
    return ReplicaOut(
        replica=replica.replica,
        address=replica.address,
        champion_version=served.champion_version,
        canary_version=served.canary_version,
        canary_weight=served.canary_weight,
        since=_iso(served.since),
        heartbeat_age_seconds=round(replica.heartbeat_age_s(now), 3),
        state=replica.state(now),
    )


@_route(
    "GET",
    API_PREFIX + "/pipelines/{name}/models",
    summary="A pipeline's model versions, newest first",
    responses=_NOT_FOUND,
)
def list_models(name: str, state: State) -> ModelVersionList:
    with transaction(state.sessions) as session:
        versions = [
            ModelVersionOut(
                version=v.version,
                stage=v.stage.value,
                metrics=v.metrics,
                sha256=v.sha256,
                run_id=v.run_id,
                created_at=v.created_at.isoformat(),
                size_bytes=v.size_bytes,
                stage_changed_at=v.stage_changed_at.isoformat(),
            )
            for v in repo.list_model_versions(session, name)
        ]
    return ModelVersionList(versions=versions)


@_route(
    "GET",
    API_PREFIX + "/pipelines/{name}/rollout",
    summary="The current or last canary rollout",
    description="Steps with traffic percent and per-step analysis, and the outcome once finished; "
    "404 if the pipeline has never had one.",
    responses=_NOT_FOUND,
)
def show_rollout(name: str, state: State) -> RolloutOut:
    with transaction(state.sessions) as session:
        rollout = repo.latest_rollout(session, name)
        if rollout is None:
            raise NotFoundError(
                f"pipeline {name!r} has had no canary rollout yet; one starts when a candidate passes the gate "
                "and the spec has a canary section"
            )
        return _rollout_out(session, rollout)


def _rollout_out(session: Session, rollout: e.Rollout) -> RolloutOut:
    version_of = _VersionNumbers(session)
    candidate, current = version_of(rollout.candidate_version_id), version_of(rollout.champion_version_id)
    final = rollout.status is not e.RolloutStatus.ACTIVE
    return RolloutOut(
        id=rollout.id,
        pipeline=rollout.pipeline,
        run_id=rollout.run_id,
        status=rollout.status.value,
        candidate_version=candidate,
        champion_version=current,
        current_step=rollout.current_step,
        traffic_percent=rollout.traffic_percent,
        policy=rollout.policy,
        steps=[
            RolloutStepOut(
                step_index=step.step_index,
                traffic_percent=step.traffic_percent,
                verdict=step.verdict.value if step.verdict else None,
                analysis=step.analysis,
                started_at=step.started_at.isoformat(),
                finished_at=_iso(step.finished_at),
            )
            for step in rollout.steps
        ],
        outcome=RolloutOutcome(
            status=rollout.status.value, reason=rollout.reason, finished_at=_iso(rollout.finished_at)
        )
        if final
        else None,
        started_at=rollout.started_at.isoformat(),
        finished_at=_iso(rollout.finished_at),
    )


@_override(
    "/pipelines/{name}/rollout/abort",
    "Abort the active canary rollout",
    "Canary traffic goes to 0 at once, the candidate becomes rolled_back, the champion is untouched. "
    "409 if no rollout is active.",
)
def abort_rollout(name: str, body: RolloutActionBody, state: State, key: Key) -> RolloutOut:
    return _end_rollout(champion.abort_rollout, "aborted", name, body, state, key)


@_override(
    "/pipelines/{name}/rollout/promote",
    "Promote the active canary rollout's candidate now",
    "The champion alias moves to the candidate without waiting for the remaining steps "
    "(compare-and-set; 409 if no rollout is active or the champion moved since it started).",
)
def promote_rollout(name: str, body: RolloutActionBody, state: State, key: Key) -> RolloutOut:
    return _end_rollout(champion.promote_rollout, "promoted", name, body, state, key)


class _RolloutEnd(Protocol):
    def __call__(self, session: Session, pipeline: str, *, actor: str, reason: str) -> e.Rollout: ...


def _end_rollout(
    end: _RolloutEnd, done: str, name: str, body: RolloutActionBody, state: ApiState, key: e.ApiKey
) -> RolloutOut:
    """An operator ends the active rollout (`end` is `flows.champion.abort_rollout` or `promote_rollout`)."""
    actor = _actor(key, body.actor)
    with transaction(state.sessions) as session:
        rollout = end(session, name, actor=actor, reason=body.reason)
        out = _rollout_out(session, repo.latest_rollout(session, name) or rollout)
    log.info("%s %s the rollout of %s: %s", actor, done, name, body.reason)
    return out


# --------------------------------------------------------------------------------- overrides


@_override(
    "/pipelines/{name}/promote",
    "Force-promote a model version to champion",
    "Skips the gate (after a human review); recorded in the alias history with actor and reason.",
)
def promote(name: str, body: PromoteBody, state: State, key: Key) -> AliasMoveOut:
    def move(session: Session, actor: str) -> e.AliasMove:
        return champion.force_promote(session, name, body.version, actor=actor, reason=body.reason)

    return _move_alias(state, key, body.actor, move, f"force-promoted {name} v{body.version}: {body.reason}")


@_override(
    "/pipelines/{name}/rollback",
    "Roll the champion back to an earlier champion",
    "to_version null: the previous champion. The current champion becomes rolled_back.",
)
def rollback(name: str, body: RollbackBody, state: State, key: Key) -> AliasMoveOut:
    def move(session: Session, actor: str) -> e.AliasMove:
        return champion.rollback(session, name, to_version=body.to_version, actor=actor, reason=body.reason)

    return _move_alias(state, key, body.actor, move, f"rolled {name} back: {body.reason}")


def _move_alias(
    state: ApiState, key: e.ApiKey, claimed: str | None, move: Callable[[Session, str], e.AliasMove], what: str
) -> AliasMoveOut:
    """An operator's champion move (`move(session, actor)`) in one transaction, logged as `actor what`."""
    actor = _actor(key, claimed)
    with transaction(state.sessions) as session:
        out = _alias_move(move(session, actor), _VersionNumbers(session))
    log.info("%s %s (champion now v%s)", actor, what, out.champion_version)
    return out


@_override(
    "/pipelines/{name}/freeze",
    "Freeze or unfreeze automatic promotions",
    "until: an RFC 3339 time with a zone (e.g. 2026-12-27T00:00:00Z); null lifts the freeze. Gates still run "
    "while frozen.",
)
def freeze(name: str, body: FreezeBody, state: State, key: Key) -> FreezeOut:
    with transaction(state.sessions) as session:
        pipeline = champion.freeze(session, name, until=body.until)
    if body.until is None:
        log.info("API key %s lifted the freeze of %s: %s", key.name, name, body.reason)
    else:
        log.info("API key %s froze %s until %s: %s", key.name, name, body.until.isoformat(), body.reason)
    return FreezeOut(pipeline=pipeline.name, frozen_until=_iso(pipeline.frozen_until))


# ------------------------------------------------------------------------- service endpoints


@_route(
    "GET",
    "/healthz",
    public=True,
    summary="Liveness and dependencies (public)",
    description="200 when every dependency answers; 503 naming each one that does not.",
    responses={503: {"model": HealthOut, "description": "A dependency does not answer."}},
)
def healthz(state: State) -> JSONResponse:
    status, body = health_report(state.health_probes)
    return JSONResponse(body, status_code=status)


@_route("GET", "/metrics", public=True, summary="Prometheus metrics (public)", response_class=Response)
def metrics() -> Response:
    return metrics_response()


@_route("GET", "/openapi.json", include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    # Served here, behind ApiKeyMiddleware, instead of FastAPI's public default (CONTRACT: every
    # route but /healthz and /metrics needs a key).
    return JSONResponse(request.app.openapi())
