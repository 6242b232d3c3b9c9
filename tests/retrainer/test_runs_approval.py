"""`retrainer runs approve|reject RUN_ID --reason …` on a run awaiting approval: the decision with its
actor, a reason under 10 characters refused (exit 2) and a run that no longer waits refused (exit 1),
each as one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import migrations
from domain import entities as e
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.api.approval_runs import APPROVAL_SPEC, waiting_run
from tests.api.conftest import PIPELINE
from tests.retrainer.test_cli_errors import assert_one_clear_line, run_cli

REASON = "checked the evaluation report by hand"


def test_approve_and_reject_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'retrainer.db'}"
    migrations.upgrade(url)
    sessions = make_sessions(create_db_engine(url))
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, "digits", APPROVAL_SPEC)
        first = waiting_run(session)
    env = {"RETRAINER_DATABASE_URL": url}

    short = run_cli("runs", "reject", first.id, "--reason", "too short", tmp_path=tmp_path, **env)
    assert short.returncode == 2
    assert_one_clear_line(short, "rejecting a run needs a justification of at least 10 characters")

    approved = run_cli("runs", "approve", first.id, "--reason", REASON, "--actor", "dave", tmp_path=tmp_path, **env)
    assert approved.returncode == 0, approved.stderr
    assert f"run {first.id}: promoted — approved by dave: {REASON}" in approved.stdout
    with transaction(sessions) as session:
        (move,) = repo.alias_history(session, PIPELINE)
        second = waiting_run(session)
    assert (move.actor, move.reason, move.run_id) == ("dave", REASON, first.id)

    again = run_cli("runs", "approve", first.id, "--reason", REASON, tmp_path=tmp_path, **env)
    assert again.returncode == 1
    assert_one_clear_line(again, f"run {first.id} is promoted, not awaiting_approval")

    rejected = run_cli(
        "runs", "reject", second.id, "--reason", "the data of this week is suspect", tmp_path=tmp_path, **env
    )
    assert rejected.returncode == 0, rejected.stderr
    assert f"run {second.id}: rejected — rejected by cli: the data of this week is suspect" in rejected.stdout
    with transaction(sessions) as session:
        assert repo.get_run(session, second.id).status is e.RunStatus.REJECTED
