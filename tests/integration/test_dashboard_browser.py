"""The dashboard as a person uses it: Debian's Chromium, headless, driven by Playwright.

Against the API under uvicorn on a PostgreSQL database of its own, seeded with runs and a rollout
under way: signs in with an API key, reads a rolled-back run's gate verdicts, watches the live
rollout page take a new window by itself (live.js under the page's CSP), aborts the rollout with a
reason. Against `retrainer serve` on PostgreSQL, MinIO and Kafka: approves a run waiting for
approval, sees its canary start, and follows it, with live traffic to the model server, to its
promotion and the new champion; reads a bad event's dead letter and the promotion's failed webhook
delivery. Each page's screenshot goes to build/screenshots/ (README, "Dashboard"). A console error,
such as a Content-Security-Policy violation, fails the test.
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from playwright.sync_api import BrowserContext, Locator, Page, expect, sync_playwright

import migrations
from api.app import create_app
from api.server import running_api
from domain import entities as e
from domain.apikeys import API_SCOPES
from domain.decisions import DecisionType
from domain.settings import Settings, load_settings
from domain.spec import parse_spec
from ml.package import manifest_for, save_package
from ml.standardizer import fit_standardizer
from ml.zoo import build_model
from retrainer import demo as story
from retrainer.service import free_port
from retrainer.traffic import Traffic
from storage import repositories as repo
from storage.artifacts import ArtifactStore, open_artifact_store
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.approval_runs import APPROVAL_SPEC, waiting_run
from tests.conftest import REQUIRE_SERVICES
from tests.integration.service import production_stack, retrainer_serve
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


SERVED_CANARY: dict[str, Any] = {
    "steps": [50.0, 100.0],
    "interval_seconds": 1.0,
    # at 200 requests a second, a 50 % step's window fills in about three seconds: long enough for the
    # live page (polling every few hundred ms) to show the step, which it once missed at 100 requests
    "min_requests": 300,
    "step_deadline_factor": 10.0,
    "confidence": 0.99,  # champion and candidate answer alike: a false rollback would be a flaky test
    "max_error_rate": 0.01,
    "max_latency_p99_ratio": 1.5,
    "latency_p99_slack_ms": 5.0,
    "max_prediction_psi": 0.2,
}
FEATURES, CLASSES = 4, 2  # two classes: the prediction mix of 100 requests varies little by chance
SECRET_ENV = "RETRAINER_TEST_WEBHOOK_SECRET"
PROMOTION_MS = 60_000


def served_spec(dead_hook: str) -> dict[str, Any]:
    """An approval-gated pipeline with a short canary, and a webhook at an address nothing answers."""
    spec = copy.deepcopy(APPROVAL_SPEC) | {"canary": SERVED_CANARY}
    spec["model"] = {"architecture": "mlp", "params": {"hidden_sizes": [8]}, "input_shape": [FEATURES]}
    spec["model"]["output_classes"] = CLASSES
    events = [DecisionType.MODEL_PROMOTED.value]
    spec["notifications"] = {"webhooks": [{"url": dead_hook, "events": events, "secret_env": SECRET_ENV}]}
    return spec


def stored_package(store: ArtifactStore, spec: dict[str, Any], path: Path, nudge: float) -> dict[str, Any]:
    """A small untrained MLP (fixed seed; `nudge` added to its first weights, so a second package is a
    distinct file answering alike) in the artifact store, as register_model_version's artifact fields."""
    torch.manual_seed(0)
    parsed = parse_spec(spec, source="the dashboard story")
    model = build_model("mlp", parsed.model.params, [FEATURES], CLASSES).eval()
    with torch.no_grad():
        next(model.parameters()).add_(nudge)
    names = [f"x{i}" for i in range(FEATURES)]
    manifest = manifest_for(parsed, "none", fit_standardizer(np.zeros((2, FEATURES)), enabled=False), names)
    ref = store.put_file(save_package(model, manifest, path).path)
    return {"artifact_uri": ref.uri, "sha256": ref.sha256, "size_bytes": ref.size, "manifest": manifest}


def dead_letter_a_bad_event(settings: Settings, key: bytes) -> None:
    """A record the service's consumer cannot read on the event topic: it goes to the dead-letter topic."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    producer.send(settings.kafka_topic, key=key, value=b"{not a CloudEvent")
    producer.flush(30)
    producer.close()


def listed(page: Page, url: str, row: str, text: str, count: int = 1, timeout_s: float = 30) -> Locator:
    """The rows matching `row` with `text` on a page that does not refresh itself, reloaded until
    `count` are shown (or `timeout_s` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(url)
        rows = page.locator(row, has_text=text)
        if rows.count() >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_a_person_approves_a_waiting_run_and_follows_its_canary_to_promotion(
    tmp_path: Path,
    e2e_database: str,
    s3_endpoint_url: str,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    browser: BrowserContext,
) -> None:
    """Under `retrainer serve`: approved in the dashboard, the canary takes live traffic to its
    promotion; a bad event's dead letter and the promotions' failed webhook deliveries are listed."""
    dead_hook = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there: the try is refused
    monkeypatch.setenv(SECRET_ENV, "the webhook secret")
    monkeypatch.setenv("RETRAINER_WEBHOOK_ATTEMPTS", "1")
    monkeypatch.setenv("RETRAINER_PREFECT_UI", "false")
    stack = production_stack(
        tmp_path, monkeypatch, database=e2e_database, s3_endpoint_url=s3_endpoint_url,
        kafka_bootstrap=kafka_bootstrap, prefix="dashboard", files={},
    )  # fmt: skip
    settings, base, serving = stack.settings, f"http://{stack.api}", f"http://{stack.serving}"
    spec = served_spec(dead_hook)
    name = spec["name"]
    story.write_spec(settings.pipelines_dir, spec)
    migrations.upgrade(e2e_database)
    engine = create_db_engine(e2e_database)
    sessions = make_sessions(engine)
    store = open_artifact_store(settings.artifact_root, settings)
    with transaction(sessions) as s:
        repo.upsert_pipeline(s, name, spec["dataset"], spec)
        champion = stored_package(store, spec, tmp_path / "champion.pt", nudge=0.0)
        first = repo.register_model_version(s, name, **champion, metrics={"accuracy": 0.8})
        repo.move_champion(s, name, first.id, expected_from_version_id=None, actor="seed", reason="the first model")
        candidate = stored_package(store, spec, tmp_path / "candidate.pt", nudge=1e-4)
        waiting = waiting_run(s, name, artifact=candidate)
        _key, api_key = repo.create_api_key(s, "approver", API_SCOPES)
    rows = np.random.default_rng(0).normal(size=(500, FEATURES))
    keyed = {"X-API-Key": api_key}
    bad_key = f"bad-{uuid.uuid4().hex[:8]}"

    problems: list[str] = []
    page = watched_page(browser, problems)
    try:
        with retrainer_serve(stack.api, tmp_path / "serve.log"), ExitStack() as cleanup:
            dead_letter_a_bad_event(settings, bad_key.encode())
            assert httpx.post(f"{serving}/v2/repository/models/{name}/load", headers=keyed, timeout=30).is_success
            traffic = Traffic(serving, name, rows, clients=4, rate_per_second=200, api_key=api_key).start()
            cleanup.callback(traffic.stop)

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
            # the candidate now, not at the model server's next refresh
            assert httpx.post(f"{serving}/v2/repository/models/{name}/load", headers=keyed, timeout=30).is_success

            page.goto(f"{base}/ui/pipelines/{name}/rollout")
            status = page.locator("#live-status")
            expect(status).to_have_text("active", timeout=WAIT_MS)
            expect(page.locator("#live-split")).to_contain_text("50")
            shot(page, "11-approved-rollout-live")
            expect(status).to_have_text("promoted", timeout=PROMOTION_MS)
            # the page redraws itself once the rollout ends: its actions and card are the server's
            expect(page.get_by_role("button", name="Abort the rollout")).to_have_count(0, timeout=WAIT_MS)
            expect(status).to_have_text("promoted")
            expect(page.locator("#live-windows tr").first).to_contain_text("promote", timeout=WAIT_MS)
            shot(page, "12-rollout-promoted")
            sent = traffic.stop()

            page.goto(f"{base}/ui/")
            expect(page.locator(f"#pipeline-{name} .summary")).to_contain_text("championv2")
            expect(page.locator(f"#pipeline-{name} tr", has_text=waiting.id[:8])).to_contain_text("promoted")
            shot(page, "13-pipelines-new-champion")

            dead = listed(page, f"{base}/ui/dead-letters", "tr.dead-letter", bad_key)
            expect(dead).to_have_count(1)
            expect(dead.locator("td").nth(3)).to_have_text(re.compile(r"^not_cloudevent: not a CloudEvent"))
            shot(page, "14-dead-letters")

            # each promotion failed its one try
            with transaction(sessions) as s:
                promoted = [v.id for v in repo.outbox_events(s, name) if v.type is DecisionType.MODEL_PROMOTED]
            failed = listed(page, f"{base}/ui/deliveries", "tr.failed-delivery", dead_hook, count=len(promoted))
            expect(failed).to_have_count(2)  # the seeded champion's and the canary's
            for event_id in promoted:
                expect(failed.filter(has_text=event_id)).to_contain_text(DecisionType.MODEL_PROMOTED.value)
            shot(page, "15-failed-deliveries")

        with transaction(sessions) as s:
            rollout = repo.latest_rollout(s, name)
            run = repo.get_run(s, waiting.id)
            now = repo.get_champion(s, name)
        assert rollout is not None and rollout.run_id == waiting.id and rollout.champion_version_id == first.id
        assert rollout.status is e.RolloutStatus.PROMOTED, rollout.reason
        assert run.status is e.RunStatus.PROMOTED and now is not None and now.id == run.model_version_id
        decided = (run.evidence or {})["outcome"]["approval"]
        assert decided["decision"] == "approved" and decided["actor"] == "approver"
        assert decided["reason"] == "offline numbers checked by the on-call"
        assert sent.failed == 0 and set(sent.by_version) == {"1", "2"}, sent
    finally:
        page.close()
        engine.dispose()
        story.delete_topics(settings)
    assert problems == [], problems
