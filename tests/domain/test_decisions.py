"""Decision events (domain/decisions.py) and the spec's webhooks (domain/notification_spec.py): a run's
moves become the right events, the signature verifies only its body, secret and time, and a webhook
that could never be delivered is refused at spec validation with its key path."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from domain import entities as e
from domain.decisions import DecisionType, run_transition_events, signature, signature_matches
from domain.errors import SpecError
from domain.spec import parse_spec

RUN = e.Run(
    id="r1",
    pipeline="p",
    trigger_kind=e.TriggerKind.MANUAL,
    status=e.RunStatus.QUEUED,
    reason=None,
    idempotency_key=None,
    request_sha256=None,
    dedupe_key=None,
    prefect_flow_run_id=None,
    dataset_version_id=None,
    model_version_id=None,
    error=None,
    created_at=datetime(2026, 12, 1, tzinfo=UTC),
    started_at=None,
    finished_at=None,
)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, e.RunStatus.QUEUED, [DecisionType.RUN_CREATED]),
        (e.RunStatus.QUEUED, e.RunStatus.RUNNING, [DecisionType.RUN_STARTED]),
        (e.RunStatus.RUNNING, e.RunStatus.RUNNING, []),
        (e.RunStatus.RUNNING, e.RunStatus.AWAITING_APPROVAL, [DecisionType.APPROVAL_REQUESTED]),
        (e.RunStatus.AWAITING_APPROVAL, e.RunStatus.CANARY, [DecisionType.APPROVAL_DECIDED]),
        (
            e.RunStatus.AWAITING_APPROVAL,
            e.RunStatus.REJECTED,
            [DecisionType.APPROVAL_DECIDED, DecisionType.RUN_FINISHED],
        ),
        (e.RunStatus.CANARY, e.RunStatus.ROLLED_BACK, [DecisionType.RUN_FINISHED]),
    ],
)
def test_a_runs_moves_and_their_events(
    before: e.RunStatus | None, after: e.RunStatus, expected: list[DecisionType]
) -> None:
    events = run_transition_events(before, replace(RUN, status=after))
    assert [event.type for event in events] == expected
    assert all(event.pipeline == "p" and event.data["run_id"] == "r1" for event in events)


def test_the_body_is_a_structured_cloudevent() -> None:
    (event,) = run_transition_events(None, RUN)
    document = json.loads(event.body())
    assert document["specversion"] == "1.0" and document["id"] == event.id and document["subject"] == "p"
    assert document["type"] == "dev.retrainer.run.created" and document["time"].endswith("Z")


def test_the_signature_covers_body_secret_and_time() -> None:
    body, now = b'{"id":"1"}', 1_800_000_000
    header = signature("secret", body, now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert signature_matches("secret", body, header, now=now + 10)
    assert not signature_matches("secret", body + b" ", header, now=now)
    assert not signature_matches("other", body, header, now=now)
    assert not signature_matches("secret", body, header, now=now + 301)  # too old: a replay
    assert not signature_matches("secret", body, "v1=abc", now=now)


def spec_with(webhook: dict[str, Any]) -> dict[str, Any]:
    model = {"architecture": "mlp", "input_shape": [4], "output_classes": 2}
    return {"name": "p", "dataset": "d", "model": model, "notifications": {"webhooks": [webhook]}}


@pytest.mark.parametrize(
    ("webhook", "problem"),
    [
        (
            {"url": "ftp://hooks.test/x", "secret_env": "S"},
            "notifications.webhooks.0.url: must be an http:// or https://",
        ),
        (
            {"url": "https:///no-host", "secret_env": "S"},
            "notifications.webhooks.0.url: must be an http:// or https://",
        ),
        (
            {"url": "https://h.test", "secret_env": "S", "events": ["run.done"]},
            "notifications.webhooks.0.events: unknown",
        ),
        ({"url": "https://h.test", "secret_env": "not a name"}, "notifications.webhooks.0.secret_env: must be an env"),
        ({"url": "https://h.test"}, "notifications.webhooks.0.secret_env: required key is missing"),
    ],
)
def test_a_webhook_that_could_never_be_delivered_is_refused(webhook: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec(spec_with(webhook), source="pipelines/p.yaml")
    assert refused.value.code == "invalid_spec"
    assert any(line.startswith(f"pipelines/p.yaml: {problem}") for line in refused.value.problems), (
        refused.value.problems
    )


def test_a_valid_webhook_selects_its_event_types() -> None:
    spec = parse_spec(
        spec_with({"url": "https://h.test/x", "secret_env": "S", "events": ["dev.retrainer.model.promoted"]}),
        source="p",
    )
    (hook,) = spec.notifications.webhooks
    assert hook.wants("dev.retrainer.model.promoted") and not hook.wants("dev.retrainer.run.created")
