"""The dashboard as a person uses it: Debian's Chromium, headless, driven by Playwright, against the
API under uvicorn on a PostgreSQL database of its own, seeded with runs and a rollout under way.

Signs in with an API key, reads a rolled-back run's gate verdicts, watches the live rollout page
take a new window by itself (live.js under the page's CSP), aborts the rollout with a reason;
approves a run waiting for approval and sees its canary rollout start; and writes a screenshot of
each page to build/screenshots/ (README, "Dashboard"). A console error, such as a
Content-Security-Policy violation, fails the test.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

import migrations
from api.app import create_app
from api.server import running_api
from domain import entities as e
from domain.apikeys import API_SCOPES
from domain.settings import load_settings
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.approval_runs import APPROVAL_SPEC, waiting_run
from tests.conftest import REQUIRE_SERVICES
from tests.retrainer.test_report import PIPELINE
from tests.web.test_dashboard import live_attempt, seed_dashboard

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
WAIT_MS = 10_000


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing; install Debian's chromium (`apt-get install chromium`, infra/local/test.sh)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile: no cookie or cache from another run
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_a_person_signs_in_reads_a_run_watches_and_aborts_a_rollout(e2e_database: str, browser: BrowserContext) -> None:
    migrations.upgrade(e2e_database)
    engine = create_db_engine(e2e_database)
    sessions = make_sessions(engine)
    seeded = seed_dashboard(sessions)
    with transaction(sessions) as s:
        _key, api_key = repo.create_api_key(s, "on-call", API_SCOPES)
    app = create_app(sessions=sessions, settings=load_settings(database_url=e2e_database), submit=None)

    problems: list[str] = []
    page = browser.new_page()
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on(
        "response", lambda answer: problems.append(f"{answer.status} {answer.url}") if answer.status >= 400 else None
    )
    try:
        with running_api(app) as base:
            # nothing without signing in
            answer = page.goto(f"{base}/ui/")
            assert answer is not None and answer.status == 401
            expect(page.get_by_role("heading", name="401 · unauthorized")).to_be_visible()
            assert PIPELINE not in page.content()
            problems.clear()  # the browser logs the 401 itself

            page.get_by_role("link", name="Sign in").click()
            shot(page, "01-sign-in")
            page.get_by_label("API key").fill(api_key)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("heading", name="Pipelines")).to_be_visible()
            expect(page.get_by_text("0 3 * * * (UTC)")).to_be_visible()
            shot(page, "02-pipelines")

            # a run's decision record: its gate verdicts
            rolled_back = seeded.story.runs[2]
            page.get_by_role("link", name=rolled_back[:8]).first.click()
            expect(page).to_have_url(f"{base}/ui/runs/{rolled_back}")
            verdict = page.locator("tr.fail", has_text="latency_p99_ms").first
            expect(verdict).to_contain_text("fail")
            expect(verdict).to_contain_text("latency too high")
            expect(page.locator("tr.pass", has_text="accuracy").first).to_contain_text("pass")
            shot(page, "03-run")

            page.goto(f"{base}/ui/runs/{seeded.live_run}")
            expect(page.locator("svg[aria-label='loss per epoch']")).to_be_visible()
            shot(page, "04-run-training-and-canary")

            page.goto(f"{base}/ui/pipelines/{PIPELINE}/models")
            expect(page.get_by_role("heading", name="Champion alias history")).to_be_visible()
            shot(page, "05-models")

            # the live rollout page fills itself, then takes the next window without a reload
            page.goto(f"{base}/ui/pipelines/{PIPELINE}/rollout")
            windows = page.locator("#live-windows tr")
            expect(windows).to_have_count(1, timeout=WAIT_MS)
            with transaction(sessions) as s:
                thin = live_attempt(
                    "repeat", "only 120 canary requests (< 200); extending", requests=(120, 900), psi=0.04
                )
                repo.record_step_attempt(s, seeded.live_rollout, 1, thin)
            expect(windows).to_have_count(2, timeout=WAIT_MS)
            expect(windows.first).to_contain_text("repeat")
            expect(page.locator("#live-split")).to_contain_text("50")
            shot(page, "06-live-rollout")

            # abort it with a reason
            abort = page.locator("form", has=page.get_by_role("button", name="Abort the rollout"))
            abort.get_by_label("reason").fill("p99 latency drifts up on the canary")
            abort.get_by_role("button", name="Abort the rollout").click()
            expect(page.get_by_role("status")).to_contain_text("aborted")
            expect(page.locator("#live-status")).to_have_text("aborted", timeout=WAIT_MS)
            shot(page, "07-rollout-aborted")

            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            page.goto(f"{base}/ui/")
            expect(page.get_by_role("heading", name="Pipelines")).to_be_visible()
            shot(page, "08-pipelines-phone")

        with transaction(sessions) as s:
            ended = repo.latest_rollout(s, PIPELINE)
        assert ended is not None and ended.status is e.RolloutStatus.ABORTED
        assert ended.reason is not None and "p99 latency drifts up on the canary" in ended.reason
    finally:
        page.close()
        engine.dispose()
    assert problems == [], problems
    assert {f"0{i}" for i in range(1, 9)} <= {p.stem[:2] for p in SCREENSHOTS.glob("0*.png")}


CANARY = {"steps": [10.0, 100.0], "interval_seconds": 30}


def watched_page(browser: BrowserContext, problems: list[str]) -> Page:
    """A new tab that records each console error and each answer of 400 or more in `problems`."""
    page = browser.new_page()
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on(
        "response", lambda answer: problems.append(f"{answer.status} {answer.url}") if answer.status >= 400 else None
    )
    return page


def sign_in(page: Page, base: str, api_key: str) -> None:
    page.goto(f"{base}/ui/login")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Pipelines")).to_be_visible()


def test_a_person_approves_a_waiting_run_and_its_canary_starts(e2e_database: str, browser: BrowserContext) -> None:
    migrations.upgrade(e2e_database)
    engine = create_db_engine(e2e_database)
    sessions = make_sessions(engine)
    spec = copy.deepcopy(APPROVAL_SPEC) | {"canary": CANARY}
    name = spec["name"]
    with transaction(sessions) as s:
        repo.upsert_pipeline(s, name, spec["dataset"], spec)
        first = repo.register_model_version(
            s, name, artifact_uri="file:///tmp/m/0", sha256="0" * 64, size_bytes=1, metrics={"accuracy": 0.8}
        )
        repo.move_champion(s, name, first.id, expected_from_version_id=None, actor="seed", reason="the first model")
        waiting = waiting_run(s, name)
        _key, api_key = repo.create_api_key(s, "approver", API_SCOPES)
    app = create_app(sessions=sessions, settings=load_settings(database_url=e2e_database), submit=None)

    problems: list[str] = []
    page = watched_page(browser, problems)
    try:
        with running_api(app) as base:
            sign_in(page, base, api_key)
            page.get_by_role("link", name=waiting.id[:8]).first.click()
            expect(page).to_have_url(f"{base}/ui/runs/{waiting.id}")
            expect(page.get_by_role("heading", name="Waiting for approval")).to_be_visible()
            expect(page.get_by_text("No canary rollout for this run.")).to_be_visible()
            shot(page, "09-run-awaiting-approval")

            approve = page.locator("form", has=page.get_by_role("button", name="Approve"))
            approve.get_by_label("reason").fill("offline numbers checked by the on-call")
            approve.get_by_role("button", name="Approve").click()
            expect(page.get_by_role("status")).to_contain_text("approved (now canary)")
            expect(page.get_by_role("heading", name="Waiting for approval")).to_have_count(0)
            expect(page.get_by_text("No canary rollout for this run.")).to_have_count(0)
            expect(page.locator("h1")).to_contain_text("canary")
            expect(page.get_by_text(re.compile(r"approved by approver; canary rollout \d+ started"))).to_be_visible()
            shot(page, "10-run-approved-canary-started")

            page.goto(f"{base}/ui/pipelines/{name}/rollout")
            expect(page.locator("#live-status")).to_have_text("active", timeout=WAIT_MS)
            expect(page.locator("#live-split")).to_contain_text("10")
            shot(page, "11-approved-rollout-live")

        with transaction(sessions) as s:
            rollout = repo.active_rollout(s, name)
            run = repo.get_run(s, waiting.id)
        assert rollout is not None and rollout.run_id == waiting.id and rollout.champion_version_id == first.id
        assert run.status is e.RunStatus.CANARY
        decided = (run.evidence or {})["outcome"]["approval"]
        assert decided["decision"] == "approved" and decided["actor"] == "approver"
        assert decided["reason"] == "offline numbers checked by the on-call"
    finally:
        page.close()
        engine.dispose()
    assert problems == [], problems
