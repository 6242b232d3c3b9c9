"""The web dashboard at /ui, served by the API process (and so by `retrainer serve`).

A browser cannot send X-API-Key, so `ApiKeyMiddleware` leaves /ui to this module: a person signs
in with an API key (POST /ui/session), which opens a server-side session (`api/dashboard_sessions.py`)
named by an HttpOnly, SameSite=Strict cookie (Secure over https). Every page and action reads the
key again and checks its scope with `api.routes.requires`, as the API does: pages need `read`,
triggering `trigger`, the overrides and approvals `operate`. Every POST carries the session's CSRF
token (a form without it answers 403 `csrf_token_invalid`). The actions call the API's own route
functions with the API's own bodies, so validation, errors and the recorded actor are the API's.

Pages are rendered by `web.dashboard` under its Content-Security-Policy; a refusal is a page with
the error's status and message and nothing else. The sign-in page and the two static files are
the only paths answered without a session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from api import approvals, routes
from api.dashboard_data import PIPELINES_PER_PAGE, latest_rollout, models_page, pipeline_cards, run_page
from api.dashboard_sessions import COOKIE_NAME, DashboardSession, SessionStore
from api.errors import ForbiddenError, UnauthorizedError, status_for
from api.middleware import DASHBOARD_PREFIX
from api.routes import ApiState, get_state, requires
from api.schemas import FreezeBody, RollbackBody, RolloutActionBody, RolloutOut, RunDetail, TriggerBody
from domain import entities as e
from domain.apikeys import Scope
from domain.decisions import DeliveryStatus
from domain.errors import NotFoundError, RetrainerError
from storage import repositories as repo
from storage.db import transaction
from web.dashboard import ASSETS, SECURITY_HEADERS, render_page
from web.dashboard_views import DeadLetters, live_rollout
from web.errors import INVALID_REQUEST

BodyT = TypeVar("BodyT", bound=BaseModel)
LIVE_POLL_MS = 2000
FAILED_DELIVERIES_SHOWN = 100
PUBLIC_PATHS = frozenset({f"{DASHBOARD_PREFIX}/login", *(f"{DASHBOARD_PREFIX}/static/{name}" for name in ASSETS)})
"""The dashboard's paths answered without a session: the sign-in page and its static files."""


class CsrfError(ForbiddenError, code="csrf_token_invalid"):
    """A dashboard form came without the CSRF token of the session it was sent with."""


class InvalidFormError(RetrainerError, code=INVALID_REQUEST):
    """A form the API's request body refuses (the API's 422 invalid_request)."""


@dataclass(frozen=True, slots=True)
class Who:
    """The signed-in person as the pages see them: the key (read again for this request) and the session."""

    key: e.ApiKey
    session: DashboardSession

    @property
    def key_name(self) -> str:
        return self.key.name

    @property
    def scopes(self) -> list[str]:
        return sorted(self.key.scopes)

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token

    @property
    def can_trigger(self) -> bool:
        return self.key.allows(Scope.TRIGGER)

    @property
    def can_operate(self) -> bool:
        return self.key.allows(Scope.OPERATE)


@dataclass(slots=True)
class Dashboard:
    """What the dashboard keeps on `app.state.dashboard`."""

    sessions: SessionStore = field(default_factory=SessionStore)
    prefect_ui_url: str | None = None  # e.g. http://127.0.0.1:4200: run pages link their flow run there
    dead_letters: Callable[[], DeadLetters] | None = None  # reads the DLQ topic; None: Kafka not configured


def add_dashboard(app: FastAPI, dashboard: Dashboard) -> None:
    """Adds the /ui routes to `app` (after the API's); `dashboard` holds its sessions and the Prefect
    UI's address (`api.app.create_app` takes it from `Settings.prefect_ui_url`)."""
    app.state.dashboard = dashboard
    for method, path, endpoint in _ROUTES:
        app.add_api_route(DASHBOARD_PREFIX + path, endpoint, methods=[method], include_in_schema=False)


# ------------------------------------------------------------------------------------ plumbing


def _dashboard(request: Request) -> Dashboard:
    found = request.app.state.dashboard
    if not isinstance(found, Dashboard):  # pragma: no cover - add_dashboard always sets it
        raise TypeError("app.state.dashboard is not a Dashboard; add the routes with api.dashboard.add_dashboard")
    return found


def _ui(request: Request) -> str:
    return str(request.scope.get("root_path", "")) + DASHBOARD_PREFIX


def _html(request: Request, template: str, who: Who | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    notice = None
    if who is not None and who.session.notice is not None:
        tone, text = who.session.notice
        notice, who.session.notice = {"tone": tone, "text": text}, None
    page = render_page(template, ui=_ui(request), who=who, notice=notice, **context)
    return HTMLResponse(page, status_code=status_code, headers=SECURITY_HEADERS)


def _refusal(request: Request, error: RetrainerError, who: Who | None) -> HTMLResponse:
    status = status_for(error)
    # a 401 shows nothing of the signed-in view, even to a session whose key was just revoked
    shown = None if status == 401 else who
    return _html(request, "error.html.j2", shown, status, title=error.code, status=status, code=error.code,
                 message=error.message)  # fmt: skip


def _invalid(error: ValidationError) -> InvalidFormError:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'form'}: {err['msg']}" for err in error.errors())
    return InvalidFormError(f"the form is invalid: {problems}; correct it and submit again")


def _signed_in(state: ApiState, store: SessionStore, cookie: str | None) -> Who:
    session = store.find(cookie)
    if session is None:
        raise UnauthorizedError("sign in with an API key to see the dashboard (your session is missing or expired)")
    with transaction(state.sessions) as db:
        key = next((k for k in repo.list_api_keys(db) if k.id == session.key_id and k.revoked_at is None), None)
    if key is None:
        store.close(session)
        raise UnauthorizedError("the API key of this session has been revoked; sign in with a valid key")
    return Who(key=key, session=session)


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {name: values[-1] for name, values in parse_qs(body, keep_blank_values=True).items()}


Endpoint = Callable[[Request], Awaitable[Response]]
_ROUTES: list[tuple[str, str, Endpoint]] = []


def _register(method: str, path: str) -> Callable[[Endpoint], Endpoint]:
    def record(endpoint: Endpoint) -> Endpoint:
        _ROUTES.append((method, path, endpoint))
        return endpoint

    return record


def page(path: str, scope: Scope = Scope.READ) -> Callable[[Callable[[Request, ApiState, Who], Response]], Endpoint]:
    """A GET page: signed in (401), holding `scope` (403), then `render(request, state, who)` in the threadpool."""

    def wrap(render: Callable[[Request, ApiState, Who], Response]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            who: Who | None = None
            try:
                state = get_state(request)
                who = await run_in_threadpool(
                    _signed_in, state, _dashboard(request).sessions, request.cookies.get(COOKIE_NAME)
                )
                requires(scope)(who.key)
                return await run_in_threadpool(render, request, state, who)
            except RetrainerError as refused:
                return _refusal(request, refused, who)

        return _register("GET", path)(endpoint)

    return wrap


Act = Callable[[Request, ApiState, Who, Mapping[str, str]], str]
"""An action: does it (raising what the API raises) and returns the path to show next."""


def action(path: str, scope: Scope) -> Callable[[Act], Endpoint]:
    """A POST form: signed in (401), with the session's CSRF token (403), holding `scope` (403); then
    `act` in the threadpool and a redirect (303) to the page it names, with its outcome as a notice."""

    def wrap(act: Act) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            who: Who | None = None
            try:
                state, store = get_state(request), _dashboard(request).sessions
                who = await run_in_threadpool(_signed_in, state, store, request.cookies.get(COOKIE_NAME))
                form = await _form(request)
                if not store.csrf_matches(who.session, form.get("csrf_token")):
                    raise CsrfError(
                        "this form did not carry your session's CSRF token; reload the page and submit again"
                    )
                requires(scope)(who.key)
                try:
                    target = await run_in_threadpool(act, request, state, who, form)
                except ValidationError as invalid:
                    raise _invalid(invalid) from invalid
                return RedirectResponse(_ui(request) + target, status_code=303, headers=SECURITY_HEADERS)
            except RetrainerError as refused:
                return _refusal(request, refused, who)

        return _register("POST", path)(endpoint)

    return wrap


def _body(model: type[BodyT], form: Mapping[str, str], *names: str) -> BodyT:
    """The API's request body from the form's fields `names` (a blank optional field is left out)."""
    values = {name: form[name] for name in names if name in form and (form[name] or name == "reason")}
    return model.model_validate(values)


# ----------------------------------------------------------------------------- sign-in, static


@_register("GET", "/login")
async def login_page(request: Request) -> Response:
    return _html(request, "login.html.j2", None, title="Sign in")


@_register("POST", "/session")
async def sign_in(request: Request) -> Response:
    state, store = get_state(request), _dashboard(request).sessions
    presented = (await _form(request)).get("api_key", "").strip()

    def authenticate() -> e.ApiKey | None:
        with transaction(state.sessions) as db:
            return repo.authenticate_api_key(db, presented) if presented else None

    key = await run_in_threadpool(authenticate)
    if key is None:
        refused = UnauthorizedError(
            "that is not a valid, unrevoked API key; create one with `retrainer apikey create NAME --scope read`"
        )
        return _refusal(request, refused, None)
    cookie, _session = store.open(key.id)
    response = RedirectResponse(_ui(request) + "/", status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=int(store.lifetime_seconds),
        path=_ui(request),
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@action("/logout", Scope.READ)
def sign_out(request: Request, _state: ApiState, who: Who, _form: Mapping[str, str]) -> str:
    _dashboard(request).sessions.close(who.session)
    return "/login"


def _static(name: str) -> Endpoint:
    asset = ASSETS[name]

    async def serve(_request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    return serve


for _name in ASSETS:
    _register("GET", f"/static/{_name}")(_static(_name))


# ------------------------------------------------------------------------------------------ pages


@page("/")
def pipelines(request: Request, state: ApiState, who: Who) -> Response:
    asked = request.query_params.get("page", "1")
    number = int(asked) if asked.isdigit() and int(asked) >= 1 else 1  # a page past the end shows none
    with transaction(state.sessions) as db:
        cards, total = pipeline_cards(db, datetime.now(UTC), offset=(number - 1) * PIPELINES_PER_PAGE)
    pages = max(1, -(-total // PIPELINES_PER_PAGE))
    return _html(request, "pipelines.html.j2", who, title="Pipelines", cards=cards, total=total,
                 page_number=number, pages=pages, first=(number - 1) * PIPELINES_PER_PAGE + 1)  # fmt: skip


_register("GET", "")(pipelines)  # /ui as well as /ui/


@page("/runs/{run_id}")
def run(request: Request, state: ApiState, who: Who) -> Response:
    with transaction(state.sessions) as db:
        shown = run_page(db, request.path_params["run_id"])
    prefect = _dashboard(request).prefect_ui_url
    flow_run = shown.prefect_flow_run_id
    url = f"{prefect.rstrip('/')}/runs/flow-run/{quote(flow_run)}" if prefect and flow_run else None
    return _html(request, "run.html.j2", who, title=f"Run {shown.run.short_id}", page=shown, prefect_url=url)


@page("/pipelines/{name}/models")
def models(request: Request, state: ApiState, who: Who) -> Response:
    with transaction(state.sessions) as db:
        shown = models_page(db, request.path_params["name"])
    return _html(request, "models.html.j2", who, title=f"{shown.pipeline} models", page=shown)


@page("/pipelines/{name}/rollout")
def rollout(request: Request, state: ApiState, who: Who) -> Response:
    name = request.path_params["name"]
    with transaction(state.sessions) as db:
        shown = latest_rollout(db, name)
    now = datetime.now(UTC)
    return _html(
        request, "rollout.html.j2", who, title=f"{name} rollout", pipeline=name, ro=shown, now=now, poll_ms=LIVE_POLL_MS
    )


@page("/pipelines/{name}/rollout.json")
def rollout_json(request: Request, state: ApiState, _who: Who) -> Response:
    name = request.path_params["name"]
    with transaction(state.sessions) as db:
        shown = latest_rollout(db, name)
    return JSONResponse(live_rollout(name, shown), headers=SECURITY_HEADERS)


@page("/dead-letters")
def dead_letters(request: Request, _state: ApiState, who: Who) -> Response:
    read = _dashboard(request).dead_letters
    # a read is bounded (consumers/dead_letters.py); what goes wrong is said on the page, never a 500
    shown = read() if read is not None else None
    return _html(request, "dead_letters.html.j2", who, title="Dead letters", dlq=shown)


@page("/deliveries")
def deliveries(request: Request, state: ApiState, who: Who) -> Response:
    with transaction(state.sessions) as db:
        failed = repo.webhook_deliveries(db, DeliveryStatus.FAILED, FAILED_DELIVERIES_SHOWN, newest_first=True)
    return _html(request, "deliveries.html.j2", who, title="Failed deliveries", failed=failed,
                 shown=FAILED_DELIVERIES_SHOWN)  # fmt: skip


# ---------------------------------------------------------------------------------------- actions


def _notice(who: Who, text: str) -> None:
    who.session.notice = ("good", text)


@action("/pipelines/{name}/trigger", Scope.TRIGGER)
def trigger(request: Request, state: ApiState, who: Who, form: Mapping[str, str]) -> str:
    body = TriggerBody.model_validate({"pipeline": request.path_params["name"], "reason": form.get("reason") or None})
    accepted = routes.trigger_train(body, Response(), state, who.key)
    _notice(who, f"run {accepted.run_id[:8]} {'queued' if accepted.created else 'already exists'} ({accepted.status})")
    return f"/runs/{accepted.run_id}"


def _rollout_end(end: Callable[..., RolloutOut], done: str) -> Act:
    """Abort or promote (`routes.abort_rollout`, `routes.promote_rollout`) the active rollout."""

    def act(request: Request, state: ApiState, who: Who, form: Mapping[str, str]) -> str:
        name = request.path_params["name"]
        out = end(name, _body(RolloutActionBody, form, "reason"), state, who.key)
        _notice(who, f"rollout #{out.id} of {name} {done}; candidate v{out.candidate_version}")
        return f"/pipelines/{name}/rollout"

    return act


action("/pipelines/{name}/rollout/abort", Scope.OPERATE)(_rollout_end(routes.abort_rollout, "aborted"))
action("/pipelines/{name}/rollout/promote", Scope.OPERATE)(_rollout_end(routes.promote_rollout, "promoted"))


def _freeze(lift: bool) -> Act:
    """Freeze until the form's time, or lift the freeze (`routes.freeze` with until null)."""

    def act(request: Request, state: ApiState, who: Who, form: Mapping[str, str]) -> str:
        name = request.path_params["name"]
        until = None if lift else form.get("until", "")
        out = routes.freeze(name, FreezeBody.model_validate({"until": until, "reason": form.get("reason", "")}),
                            state, who.key)  # fmt: skip
        _notice(who, f"{name} unfrozen" if lift else f"{name} frozen until {out.frozen_until}")
        return f"/#pipeline-{name}"

    return act


action("/pipelines/{name}/freeze", Scope.OPERATE)(_freeze(lift=False))
action("/pipelines/{name}/unfreeze", Scope.OPERATE)(_freeze(lift=True))


@action("/pipelines/{name}/rollback", Scope.OPERATE)
def rollback(request: Request, state: ApiState, who: Who, form: Mapping[str, str]) -> str:
    name = request.path_params["name"]
    out = routes.rollback(name, _body(RollbackBody, form, "reason"), state, who.key)
    _notice(who, f"{name} rolled back: champion is v{out.champion_version}")
    return f"/pipelines/{name}/models"


def _answer(answer: Callable[..., RunDetail], done: str) -> Act:
    """Approve or reject (`api.approvals`) a run that waits for approval."""

    def act(request: Request, state: ApiState, who: Who, form: Mapping[str, str]) -> str:
        run_id = request.path_params["run_id"]
        out = answer(run_id, _body(approvals.ApprovalBody, form, "reason"), state, who.key)
        _notice(who, f"run {run_id[:8]} {done} (now {out.status})")
        return f"/runs/{run_id}"

    return act


action("/runs/{run_id}/approve", Scope.OPERATE)(_answer(approvals.approve_run, "approved"))
action("/runs/{run_id}/reject", Scope.OPERATE)(_answer(approvals.reject_run, "rejected"))


# Last, so it matches only what no route above does: an unknown /ui path is a 404 page (401 first).
@page("/{rest:path}")
def not_found(request: Request, _state: ApiState, _who: Who) -> Response:
    raise NotFoundError(f"no dashboard page {request.url.path!r}; start at {_ui(request)}/")
