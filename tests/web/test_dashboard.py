"""The dashboard at /ui through the API app's test client: sign-in and its cookie, 401 and 403
pages, CSRF, the Content-Security-Policy, scopes, and the actions calling the API's own functions.

The browser story (Playwright, real PostgreSQL) is tests/integration/test_dashboard_browser.py;
`seed_dashboard` is the data both show: the report's story plus a rollout still under way.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.dashboard_sessions import COOKIE_NAME
from domain import entities as e
from domain.apikeys import API_SCOPES, Scope
from domain.evidence import CanaryAttempt
from domain.settings import Settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import Base
from tests.retrainer.test_report import (
    PIPELINE,
    Story,
    attempt,
    build_story,
    finish_run,
    passing_checks,
    record_step,
    report,
    window,
)

SCHEDULE = {"cron": "0 3 * * *", "timezone": "UTC"}
HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "val_loss": 1.0, "val_accuracy": 0.80},
    {"epoch": 2, "train_loss": 0.6, "val_loss": 0.7, "val_accuracy": 0.90},
    {"epoch": 3, "train_loss": 0.4, "val_loss": 0.6, "val_accuracy": 0.93},
]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True)
class Seeded:
    story: Story
    live_run: str  # a run whose canary rollout is still active
    live_rollout: int


def live_attempt(action: str, reason: str, *, requests: tuple[int, int], psi: float) -> CanaryAttempt:
    """A window of the live rollout: candidate v4 (canary) against champion v2, (canary, champion) requests."""
    canary, champion = requests
    halves = {"0": canary // 2, "1": canary - canary // 2}
    return attempt(
        action, reason, window("4", canary, 0, 3.1, halves), window("2", champion, 1, 3.0, {"0": champion}),
        passing_checks(psi),
    )  # fmt: skip


def seed_dashboard(sessions: sessionmaker[Session]) -> Seeded:
    """The report's story (three runs, two finished rollouts), a schedule, and a fourth run whose
    rollout is active at its second step, with its training curves."""
    story = build_story(sessions)
    with transaction(sessions) as s:
        spec = {"name": PIPELINE, "triggers": {"schedule": SCHEDULE}, "promotion": {"cooldown_seconds": 600}}
        repo.upsert_pipeline(s, PIPELINE, "digits", spec)
        dataset = repo.record_dataset_version(s, "digits", "v4", "file:///data/digits-v4.csv")
        run, _ = repo.create_run(s, PIPELINE, e.TriggerKind.MANUAL, reason="fresh labels")
        candidate = finish_run(
            s,
            run.id,
            dataset.id,
            accuracy=0.97,
            champion={"version": 2, "report": report(0.95), "error": None},
            gate=[e.GateCheck("accuracy", "min", e.Verdict.PASS, "accuracy 0.9700 >= 0.9000", 0.97, None, 0.9)],
            status=e.RunStatus.CANARY,
            reason="gate passed; awaiting the canary rollout",
        )
        repo.update_run(s, run.id, evidence={"training": {"history": HISTORY}})
        champion = repo.get_champion(s, PIPELINE)
        assert champion is not None
        rollout = repo.start_rollout(
            s,
            PIPELINE,
            candidate_version_id=candidate.id,
            champion_version_id=champion.id,
            policy={"steps": [10.0, 50.0, 100.0]},
            run_id=run.id,
        )
        first = live_attempt("advance", "all checks passed at 10 %", requests=(300, 2700), psi=0.03)
        record_step(s, rollout.id, 0, 10.0, e.Verdict.PASS, first)
        repo.begin_rollout_step(s, rollout.id, traffic_percent=50.0)
    return Seeded(story=story, live_run=run.id, live_rollout=rollout.id)


@pytest.fixture
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'retrainer.db'}")
    Base.metadata.create_all(engine)
    yield make_sessions(engine)
    engine.dispose()


@pytest.fixture
def seeded(sessions: sessionmaker[Session]) -> Seeded:
    return seed_dashboard(sessions)


@pytest.fixture
def app(sessions: sessionmaker[Session], seeded: Seeded) -> FastAPI:
    return create_app(sessions=sessions, settings=Settings(), submit=None, health_probes={})


def new_key(sessions: sessionmaker[Session], name: str, scopes: frozenset[Scope] = API_SCOPES) -> str:
    with transaction(sessions) as s:
        return repo.create_api_key(s, name, scopes)[1]


def signed_in(app: FastAPI, key: str, base_url: str = "http://testserver") -> TestClient:
    client = TestClient(app, base_url=base_url)
    answer = client.post("/ui/session", data={"api_key": key}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/"
    return client


def csrf_of(client: TestClient, path: str = "/ui/") -> str:
    found = CSRF.search(client.get(path).text)
    assert found is not None
    return found.group(1)


def error_code(html: str) -> str:
    found = re.search(r"<h1>(\d{3}) · ([a-z_]+)</h1>", html)
    assert found is not None, html
    return found.group(2)


# ------------------------------------------------------------------------------- sign-in, cookie


@pytest.mark.parametrize(("base_url", "secure"), [("http://testserver", False), ("https://testserver", True)])
def test_sign_in_sets_an_httponly_strict_cookie_secure_over_https(
    app: FastAPI, sessions: sessionmaker[Session], base_url: str, secure: bool
) -> None:
    client = TestClient(app, base_url=base_url)
    answer = client.post("/ui/session", data={"api_key": new_key(sessions, "ops")}, follow_redirects=False)
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= flags
    assert "samesite=strict" in cookie.lower() and "path=/ui" in cookie.lower()
    assert ("secure" in flags) is secure
    assert client.get("/ui/").status_code == 200


@pytest.mark.parametrize("presented", ["", "garbage", "rt_deadbeef_not-a-real-key"])
def test_a_wrong_or_missing_key_is_a_401_page_showing_nothing(app: FastAPI, presented: str) -> None:
    client = TestClient(app)
    answer = client.post("/ui/session", data={"api_key": presented}, follow_redirects=False)
    assert answer.status_code == 401
    assert error_code(answer.text) == "unauthorized"
    assert COOKIE_NAME not in answer.headers.get("set-cookie", "")
    for path in ("/ui/", "/ui", f"/ui/pipelines/{PIPELINE}/models", f"/ui/pipelines/{PIPELINE}/rollout.json"):
        page = client.get(path)
        assert page.status_code == 401, path
        assert PIPELINE not in page.text and "csrf_token" not in page.text


def test_a_forged_or_closed_session_cookie_is_refused(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    client = signed_in(app, new_key(sessions, "ops"))
    cookie = client.cookies[COOKIE_NAME]
    session_id, expires, mac = cookie.split(".")
    for forged in (f"{session_id}.{int(expires) + 3600}.{mac}", f"{session_id}x.{expires}.{mac}", "a.b.c"):
        stranger = TestClient(app, cookies={COOKIE_NAME: forged})
        assert stranger.get("/ui/").status_code == 401
    assert client.post("/ui/logout", data={"csrf_token": csrf_of(client)}, follow_redirects=False).status_code == 303
    replay = TestClient(app, cookies={COOKIE_NAME: cookie})
    assert replay.get("/ui/").status_code == 401


def test_revoking_the_key_ends_its_sessions_at_once(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    client = signed_in(app, new_key(sessions, "short-lived"))
    with transaction(sessions) as s:
        repo.revoke_api_key(s, "short-lived")
    answer = client.get("/ui/")
    assert answer.status_code == 401 and error_code(answer.text) == "unauthorized"


# ----------------------------------------------------------------------------- CSP, static files


def test_every_ui_response_carries_the_strict_csp_and_pinned_files(
    app: FastAPI, sessions: sessionmaker[Session]
) -> None:
    client = signed_in(app, new_key(sessions, "ops"))
    anonymous = TestClient(app)
    answers = [client.get(p) for p in ("/ui/", f"/ui/pipelines/{PIPELINE}/rollout", "/ui/nowhere")]
    answers += [anonymous.get(p) for p in ("/ui/login", "/ui/", "/ui/static/dashboard.css", "/ui/static/live.js")]
    for answer in answers:
        csp = answer.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, answer.url
        assert "unsafe-inline" not in csp
    page = client.get(f"/ui/pipelines/{PIPELINE}/rollout").text
    assert "<style" not in page and " style=" not in page and "<script>" not in page
    for tag in re.findall(r'<(?:link|script) [^>]*(?:href|src)="(/ui/static/[^"?]+)[^"]*" integrity="([^"]+)"', page):
        path, integrity = tag
        body = anonymous.get(path).content
        assert integrity == "sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert len(re.findall(r'integrity="sha256-', page)) == 2  # the style sheet and live.js
    assert "https://" not in page and "http://" not in page


# ------------------------------------------------------------------------------------------ pages


def test_pages_show_the_decision_record(app: FastAPI, sessions: sessionmaker[Session], seeded: Seeded) -> None:
    client = signed_in(app, new_key(sessions, "reader", frozenset({Scope.READ})))
    home = client.get("/ui/").text
    assert "0 3 * * * (UTC)" in home and "Active rollout" in home and seeded.live_run[:8] in home
    assert "Trigger a run" not in home  # a read key is offered no action
    rolled_back = client.get(f"/ui/runs/{seeded.story.runs[2]}").text
    assert "Promotion gate" in rolled_back and "latency too high" in rolled_back
    assert "&lt;script&gt;" in rolled_back and "<script>alert" not in rolled_back  # stored text stays text
    live = client.get(f"/ui/runs/{seeded.live_run}").text
    assert "loss per epoch" in live and "validation accuracy per epoch" in live
    models = client.get(f"/ui/pipelines/{PIPELINE}/models").text
    assert "canary passed" in models and "Champion alias history" in models
    state = client.get(f"/ui/pipelines/{PIPELINE}/rollout.json").json()
    assert state["rollout"]["id"] == seeded.live_rollout and state["rollout"]["status"] == "active"
    assert state["rollout"]["traffic_percent"] == 50.0
    assert [w["canary"]["requests"] for w in state["rollout"]["windows"]] == [300]
    missing = client.get("/ui/runs/no-such-run")
    assert missing.status_code == 404 and error_code(missing.text) == "not_found"


# ---------------------------------------------------------------------------- CSRF, scopes, actions


def test_a_form_without_the_sessions_csrf_token_is_refused(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    client = signed_in(app, new_key(sessions, "ops"))
    other = signed_in(app, new_key(sessions, "other"))
    path = f"/ui/pipelines/{PIPELINE}/rollout/abort"
    for token in (None, "forged", csrf_of(other)):
        form = {"reason": "a forged abort request"} | ({"csrf_token": token} if token else {})
        answer = client.post(path, data=form, follow_redirects=False)
        assert answer.status_code == 403 and error_code(answer.text) == "csrf_token_invalid"
    with transaction(sessions) as s:
        assert repo.active_rollout(s, PIPELINE) is not None


def test_a_key_without_the_scope_is_refused_like_the_api(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    client = signed_in(app, new_key(sessions, "reader", frozenset({Scope.READ})))
    token = csrf_of(client)
    for path in (f"/ui/pipelines/{PIPELINE}/rollout/abort", f"/ui/pipelines/{PIPELINE}/trigger"):
        answer = client.post(path, data={"csrf_token": token, "reason": "should be refused"}, follow_redirects=False)
        assert answer.status_code == 403 and error_code(answer.text) == "forbidden"
        assert "lacks the" in answer.text
    none = signed_in(app, new_key(sessions, "feedback-only", frozenset({Scope.FEEDBACK})))
    assert none.get("/ui/").status_code == 403


def test_actions_validate_like_the_api_and_record_the_key(
    app: FastAPI, sessions: sessionmaker[Session], seeded: Seeded
) -> None:
    client = signed_in(app, new_key(sessions, "ops"))
    token = csrf_of(client)
    abort = f"/ui/pipelines/{PIPELINE}/rollout/abort"
    short = client.post(abort, data={"csrf_token": token, "reason": "too short"}, follow_redirects=False)
    assert short.status_code == 400 and error_code(short.text) == "invalid_input"
    missing = client.post(abort, data={"csrf_token": token}, follow_redirects=False)
    assert missing.status_code == 422 and error_code(missing.text) == "invalid_request"
    done = client.post(abort, data={"csrf_token": token, "reason": "latency looks off by eye"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/ui/pipelines/{PIPELINE}/rollout"
    assert "aborted" in client.get(done.headers["location"]).text  # the notice, shown once
    with transaction(sessions) as s:
        assert repo.active_rollout(s, PIPELINE) is None
        ended = repo.latest_rollout(s, PIPELINE)
        assert ended is not None and ended.id == seeded.live_rollout and ended.status is e.RolloutStatus.ABORTED
    again = client.post(abort, data={"csrf_token": token, "reason": "latency looks off by eye"}, follow_redirects=False)
    assert again.status_code == 409 and error_code(again.text) == "conflict"

    until = datetime(2099, 1, 1, tzinfo=UTC).isoformat()
    frozen = client.post(
        f"/ui/pipelines/{PIPELINE}/freeze", data={"csrf_token": token, "until": until, "reason": "holiday freeze"}
    )
    assert frozen.status_code == 200 and "frozen until" in frozen.text
    unfrozen = client.post(f"/ui/pipelines/{PIPELINE}/unfreeze", data={"csrf_token": token, "reason": "back"})
    assert unfrozen.status_code == 200 and "unfrozen" in unfrozen.text
    rolled = client.post(
        f"/ui/pipelines/{PIPELINE}/rollback", data={"csrf_token": token, "reason": "v2 misbehaves in prod"}
    )
    assert rolled.status_code == 200 and "rolled back: champion is v1" in rolled.text
    with transaction(sessions) as s:
        move = repo.alias_history(s, PIPELINE)[0]
        # the API's own record of who did it: the key's name (flows.champion adds what it was)
        assert move.actor.startswith("ops") and move.reason == "v2 misbehaves in prod"


# -------------------------------------------------------------------------------- Prefect UI link


@pytest.mark.parametrize(
    ("ui_setting", "prefect_env", "link"),
    [
        ("http://prefect.example:4200/", None, "http://prefect.example:4200/runs/flow-run/fr-123"),
        ("", "http://127.0.0.1:4300", "http://127.0.0.1:4300/runs/flow-run/fr-123"),  # Prefect's own setting
        ("", None, None),
    ],
)
def test_run_pages_link_the_prefect_ui_named_by_the_settings(
    sessions: sessionmaker[Session],
    seeded: Seeded,
    monkeypatch: pytest.MonkeyPatch,
    ui_setting: str,
    prefect_env: str | None,
    link: str | None,
) -> None:
    if prefect_env is None:
        monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    else:
        monkeypatch.setenv("PREFECT_UI_URL", prefect_env)
    settings = Settings(prefect_ui_url=ui_setting)
    with transaction(sessions) as s:
        repo.update_run(s, seeded.live_run, prefect_flow_run_id="fr-123")
    monkeypatch.setenv("PREFECT_UI_URL", "http://read-too-late.example")  # the app reads its settings, not os.environ
    app = create_app(sessions=sessions, settings=settings, submit=None, health_probes={})
    page = signed_in(app, new_key(sessions, "ops")).get(f"/ui/runs/{seeded.live_run}").text
    if link is None:
        assert "Prefect UI" not in page and "fr-123" in page  # the flow run's id, unlinked
    else:
        assert f'<a href="{link}" rel="noreferrer">' in page


def test_a_prefect_ui_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="RETRAINER_PREFECT_UI_URL must be an http"):
        Settings(prefect_ui_url="prefect.example:4200")


def test_the_pipelines_page_shows_ten_pipelines_a_page(sessions: sessionmaker[Session], app: FastAPI) -> None:
    with transaction(sessions) as s:
        for number in range(12):
            name = f"extra-{number:02d}"
            repo.upsert_pipeline(s, name, "digits", {"name": name})
    client = signed_in(app, new_key(sessions, "reader", frozenset({Scope.READ})))
    first, second = client.get("/ui/").text, client.get("/ui/?page=2").text
    shown = [re.findall(r'<section class="card" id="pipeline-([^"]+)"', page) for page in (first, second)]
    assert len(shown[0]) == 10 and shown[0] == sorted(shown[0])
    assert len(shown[1]) == 4 and not set(shown[0]) & set(shown[1])  # 14 pipelines: the story's two and 12
    assert "pipelines 1\u201310 of 14" in first and 'href="/ui/?page=2"' in first
    assert "pipelines 11\u201314 of 14" in second and 'href="/ui/?page=1"' in second
    assert client.get("/ui/?page=nonsense").status_code == 200  # read as the first page


def test_the_models_page_shows_the_newest_fifty_versions(sessions: sessionmaker[Session], app: FastAPI) -> None:
    with transaction(sessions) as s:
        repo.upsert_pipeline(s, "many-models", "digits", {"name": "many-models"})
        for number in range(55):
            repo.register_model_version(
                s, "many-models", artifact_uri=f"file:///m/{number}", sha256=f"{number:064x}", size_bytes=1,
                metrics={"accuracy": 0.5},
            )  # fmt: skip
    page = signed_in(app, new_key(sessions, "reader", frozenset({Scope.READ}))).get("/ui/pipelines/many-models/models")
    shown = [int(v) for v in re.findall(r"<tr><td>v(\d+)</td>", page.text)]
    assert shown == list(range(55, 5, -1))  # v55 … v6, newest first
    assert "the newest 50 versions" in page.text


def test_the_webhooks_page_lists_failed_deliveries_newest_first(sessions: sessionmaker[Session], app: FastAPI) -> None:
    hooks = ["https://hooks.example/a", "http://127.0.0.1:9/dead", "https://hooks.example/ok"]
    with transaction(sessions) as s:
        position, event = repo.unsent_events(s, 1)[0]  # a decision of the seeded story
        repo.mark_sent(s, [position], [(position, url, "HOOK_SECRET") for url in hooks])
        pending = repo.webhook_deliveries(s)
        older, newer, delivered = (next(d for d in pending if d.url == url) for url in hooks)
        repo.finish_delivery(s, older.id, delivered=False, attempts=5, response_status=500, error="POST answered 500")
        repo.finish_delivery(s, newer.id, delivered=False, attempts=5, error="ConnectError: refused")
        repo.finish_delivery(s, delivered.id, delivered=True, attempts=1, response_status=204)
    client = signed_in(app, new_key(sessions, "reader", frozenset({Scope.READ})))
    assert 'href="/ui/deliveries"' in client.get("/ui/").text  # linked in the nav
    page = client.get("/ui/deliveries")
    assert page.status_code == 200
    rows = re.findall(r'<tr class="failed-delivery">(.*?)</tr>', page.text, re.S)
    assert [hooks[1] in rows[0], hooks[0] in rows[1], len(rows)] == [True, True, 2]  # newest first, no delivered
    assert event.pipeline in rows[1] and event.type.value in rows[1] and event.id in rows[1]
    assert '<td class="num">5</td><td class="num">500</td><td>POST answered 500</td>' in rows[1]
    assert "ConnectError: refused" in rows[0]
    assert TestClient(app).get("/ui/deliveries").status_code == 401  # no session, nothing shown
