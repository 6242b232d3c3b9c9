"""A run awaiting approval as the pipeline flow leaves it (flows.approvals.after_gate), without
training a model; for the API's approval tests and its schemathesis seed."""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy.orm import Session

from domain import entities as e
from domain.spec import parse_spec
from flows import approvals
from storage import repositories as repo
from tests.api.conftest import PIPELINE
from tests.flows.conftest import BASE_SPEC

APPROVAL_SPEC: dict[str, Any] = copy.deepcopy(BASE_SPEC) | {"promotion": {"approval": {"required": True}}}


def waiting_run(
    session: Session, pipeline: str = PIPELINE, run_id: str | None = None, *, artifact: dict[str, Any] | None = None
) -> e.Run:
    """What the pipeline flow leaves when a candidate passes its gate under `promotion.approval`:
    a registered version and a run awaiting approval (the pipeline's stored spec must require it).
    `artifact`: the version's artifact_uri, sha256, size_bytes and manifest, for a model server to
    load (default: a file URI that names nothing)."""
    spec = parse_spec(repo.get_pipeline(session, pipeline).spec, source=f"pipeline {pipeline}")
    run, _ = repo.create_run(session, pipeline, e.TriggerKind.MANUAL, reason="a retraining", run_id=run_id)
    number = len(repo.list_model_versions(session, pipeline)) + 1
    nothing = {"artifact_uri": f"file:///tmp/m/{number}", "sha256": f"{number:x}" * 64, "size_bytes": 1}
    version = repo.register_model_version(
        session, pipeline, **(artifact or nothing), metrics={"accuracy": 0.9}, run_id=run.id
    )
    champion = repo.get_champion(session, pipeline)
    passed = approvals.PassedCandidate(run.id, version, champion.id if champion else None, "all gate checks passed")
    outcome = approvals.after_gate(session, spec, passed)
    return repo.update_run(
        session, run.id, status=outcome["status"], model_version_id=version.id, evidence={"outcome": outcome}
    )
