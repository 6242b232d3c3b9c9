"""Runs: idempotent creation, event links, lifecycle, listing, on SQLite and PostgreSQL (the `sessions` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.errors import ConflictError, InvalidInputError, NotFoundError
from storage import repositories as repo
from storage.orm import SqlRun
from storage.repositories.runs import SUBMISSION_CLAIM_TIMEOUT, insert_or_skip
from tests.storage.repositories.conftest import SHA_A, SHA_B, race, store_event, tx


def test_run_lifecycle_and_event_links(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    tx(sessions, lambda s: store_event(s, "evt-a"))
    tx(sessions, lambda s: store_event(s, "evt-b"))
    run, created = tx(
        sessions,
        lambda s: repo.create_run(
            s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w1", event_ids=["evt-a", "evt-b"]
        ),
    )
    assert created and run.status is e.RunStatus.QUEUED and run.event_ids == ("evt-a", "evt-b")
    assert tx(sessions, lambda s: repo.get_event(s, "evt-a")).status is e.EventStatus.LINKED
    running = tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.RUNNING, prefect_flow_run_id="f"))
    assert running.started_at is not None and running.finished_at is None
    done = tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.REJECTED))
    assert done.finished_at is not None and done.finished_at >= running.started_at  # type: ignore[operator]
    with pytest.raises(ConflictError):
        tx(sessions, lambda s: repo.update_run(s, run.id, status=e.RunStatus.RUNNING))
    assert tx(sessions, lambda s: repo.get_run(s, run.id)).status is e.RunStatus.REJECTED


def test_a_runs_insert_is_compiled_once_per_shape_and_still_skips_conflicts(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    """The run's INSERT states a cache key (a dialect INSERT has none): two runs share it, a plain
    INSERT of the same values does not, and the SQL keeps ON CONFLICT DO NOTHING."""
    dialect = sessions.kw["bind"].dialect
    one, other = (insert_or_skip(dialect.name, {"id": run_id, "status": "queued"}) for run_id in ("a", "b"))
    key = one._generate_cache_key()
    assert key is not None and key == other._generate_cache_key()
    assert key != insert(SqlRun).values({"id": "a", "status": "queued"}).returning(SqlRun)._generate_cache_key()
    # the very SQL of the dialect's own on_conflict_do_nothing(), which SQLAlchemy never caches
    own = (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(SqlRun)
    own_sql = own.values({"id": "a", "status": "queued"}).on_conflict_do_nothing().returning(SqlRun)
    assert str(one.compile(dialect=dialect)) == str(own_sql.compile(dialect=dialect))
    assert "ON CONFLICT DO NOTHING" in str(one.compile(dialect=dialect))
    # and through the session: the second run of a window is the first, the third a new one
    first, c1 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="k"))
    again, c2 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="k"))
    other_run, c3 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="j"))
    assert (c1, c2, c3) == (True, False, True) and again.id == first.id != other_run.id


def test_run_dedupe_key_gives_one_run_per_window(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    first, c1 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w"))
    second, c2 = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w"))
    assert (c1, c2) == (True, False) and first.id == second.id


def test_idempotency_key_same_body_same_run_other_body_conflict(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    def create(body_sha: str) -> tuple[e.Run, bool]:
        return tx(
            sessions,
            lambda s: repo.create_run(
                s, "digits-classifier", e.TriggerKind.MANUAL, idempotency_key="k1", request_sha256=body_sha
            ),
        )

    first, created = create(SHA_A)
    again, created_again = create(SHA_A)
    assert created and not created_again and again.id == first.id
    with pytest.raises(ConflictError) as info:
        create(SHA_B)
    assert info.value.code == "conflict" and "Idempotency-Key" in str(info.value)


def test_concurrent_identical_requests_create_exactly_one_run(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    results = race(
        10,
        lambda i: tx(
            sessions,
            lambda s: repo.create_run(
                s, "digits-classifier", e.TriggerKind.MANUAL, idempotency_key="same", request_sha256=SHA_A
            ),
        ),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(created for _, created in results) == 1
    assert len({run.id for run, _ in results}) == 1


def test_concurrent_runs_of_one_window_create_exactly_one_and_a_taken_run_id_is_a_conflict(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    results = race(
        10,
        lambda i: tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, dedupe_key="w")),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(created for _, created in results) == 1 and len({run.id for run, _ in results}) == 1
    [(run, _)] = [result for result in results if result[1]]
    with pytest.raises(ConflictError) as taken:
        tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL, run_id=run.id))
    assert taken.value.code == "conflict" and run.id in str(taken.value)
    assert tx(sessions, lambda s: repo.get_run(s, run.id)) == run


def test_list_runs_newest_first_with_limit(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    ids = [
        tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.SCHEDULE))[0].id for _ in range(3)
    ]
    listed = tx(sessions, lambda s: repo.list_runs(s, "digits-classifier", limit=2))
    assert [r.id for r in listed] == [ids[2], ids[1]]
    with pytest.raises(InvalidInputError) as info:
        tx(sessions, lambda s: repo.list_runs(s, limit=0))
    assert info.value.code == "invalid_input"


def test_run_events_are_the_linked_events_in_receive_order(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    tx(sessions, lambda s: store_event(s, "evt-late", offset=7))
    tx(sessions, lambda s: store_event(s, "evt-early", offset=3))
    tx(sessions, lambda s: store_event(s, "evt-other"))
    run, _ = tx(
        sessions,
        lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.EVENT, event_ids=["evt-early", "evt-late"]),
    )
    events = tx(sessions, lambda s: repo.run_events(s, run.id))
    assert [(ev.event_id, ev.offset, ev.status) for ev in events] == [
        ("evt-late", 7, e.EventStatus.LINKED),
        ("evt-early", 3, e.EventStatus.LINKED),
    ]
    with pytest.raises(NotFoundError) as missing:
        tx(sessions, lambda s: repo.run_events(s, "no-such-run"))
    assert missing.value.code == "not_found"


def test_a_submission_claim_is_exclusive_and_expires_after_the_timeout(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    claimed_at = datetime.now(UTC)
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id, now=claimed_at))
    assert not tx(sessions, lambda s: repo.claim_submission(s, run.id))  # held: nobody else submits
    assert tx(sessions, lambda s: repo.unsubmitted_runs(s)) == []
    assert tx(sessions, lambda s: repo.get_run(s, run.id)).prefect_flow_run_id == repo.SUBMITTING

    # the claimer died before recording the flow run: once the claim is old, the run is offered again
    later = claimed_at + SUBMISSION_CLAIM_TIMEOUT + timedelta(seconds=1)
    assert [r.id for r in tx(sessions, lambda s: repo.unsubmitted_runs(s, now=later))] == [run.id]
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id, now=later))
    assert not tx(sessions, lambda s: repo.claim_submission(s, run.id, now=later))  # the new claim is fresh
    tx(sessions, lambda s: repo.update_run(s, run.id, prefect_flow_run_id="flow-run-1"))
    much_later = later + 10 * SUBMISSION_CLAIM_TIMEOUT
    assert tx(sessions, lambda s: repo.unsubmitted_runs(s, now=much_later)) == []  # submitted: never again


def test_a_released_claim_makes_the_run_unsubmitted_again(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id))
    tx(sessions, lambda s: repo.release_submission(s, run.id))
    assert [r.id for r in tx(sessions, lambda s: repo.unsubmitted_runs(s))] == [run.id]
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id))


def test_a_submitted_flow_run_is_recorded_only_while_the_claim_holds(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id))
    assert tx(sessions, lambda s: repo.record_submission(s, run.id, "flow-run-b"))
    assert tx(sessions, lambda s: repo.record_submission(s, run.id, "flow-run-b"))  # it recorded itself first: fine
    assert tx(sessions, lambda s: repo.get_run(s, run.id)).prefect_flow_run_id == "flow-run-b"

    other, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    assert tx(sessions, lambda s: repo.claim_submission(s, other.id))
    # a late start of the flow run this submission replaces takes the run while the call is in flight
    tx(sessions, lambda s: repo.update_run(s, other.id, prefect_flow_run_id="flow-run-a"))
    assert not tx(sessions, lambda s: repo.record_submission(s, other.id, "flow-run-c"))
    assert tx(sessions, lambda s: repo.get_run(s, other.id)).prefect_flow_run_id == "flow-run-a"


def test_a_claim_taken_before_revision_0004_has_no_time_and_counts_as_expired(
    sessions: sessionmaker[Session], pipeline: e.Pipeline
) -> None:
    run, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    tx(sessions, lambda s: repo.update_run(s, run.id, prefect_flow_run_id=repo.SUBMITTING))  # as 0003's code claimed
    assert [r.id for r in tx(sessions, lambda s: repo.unsubmitted_runs(s))] == [run.id]
    assert tx(sessions, lambda s: repo.claim_submission(s, run.id))


def test_a_schedule_run_is_never_offered_for_submission(sessions: sessionmaker[Session], pipeline: e.Pipeline) -> None:
    # its own flow run created it and records itself on it a moment later
    tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.SCHEDULE, dedupe_key="schedule:t"))
    manual, _ = tx(sessions, lambda s: repo.create_run(s, "digits-classifier", e.TriggerKind.MANUAL))
    assert [r.id for r in tx(sessions, lambda s: repo.unsubmitted_runs(s))] == [manual.id]
