"""Repository functions over the metadata schema, one module per aggregate.

Each takes a Session, never commits, and returns domain entities: the caller owns the
transaction (`storage.db.transaction`). Uniqueness that matters for correctness (one inbox row
per event id, one run per idempotency key or debounce window, one active rollout, the champion
alias) is decided by the database, never by process memory, so it holds across processes.

Callers use `from storage import repositories as repo` and `repo.<function>`; this package
re-exports every public function of its modules so they need not know which module holds it.
"""

from __future__ import annotations

from storage.repositories.api_keys import (
    authenticate_api_key,
    create_api_key,
    list_api_keys,
    provision_api_key,
    revoke_api_key,
)
from storage.repositories.datasets import (
    get_dataset_version,
    latest_dataset_version,
    record_dataset_version,
    set_dataset_sha256,
)
from storage.repositories.gates import gate_verdicts, record_gate_checks
from storage.repositories.inbox import (
    NewInboxEvent,
    add_many_to_inbox,
    add_to_inbox,
    get_event,
    pending_events,
    set_event_status,
)
from storage.repositories.models import (
    CHAMPION_ALIAS,
    alias_history,
    alias_moves_of_run,
    get_champion,
    get_model_version,
    get_model_version_by_id,
    last_promotion_at,
    list_model_versions,
    move_champion,
    register_model_version,
    set_model_stage,
)
from storage.repositories.outbox import (
    finish_delivery,
    mark_sent,
    outbox_events,
    record_decision,
    unsent_events,
    webhook_deliveries,
)
from storage.repositories.pipelines import (
    get_pipeline,
    list_pipelines,
    pipelines_for_dataset,
    set_freeze,
    spec_digest,
    upsert_pipeline,
)
from storage.repositories.replicas import fleet_windows, prune_replica_windows, report_replica, serving_replicas
from storage.repositories.rollouts import (
    active_rollout,
    begin_rollout_step,
    finish_rollout,
    latest_rollout,
    list_rollouts,
    record_rollout_step,
    record_step_attempt,
    start_rollout,
)
from storage.repositories.runs import (
    SUBMITTING,
    RunPosition,
    add_run,
    claim_submission,
    create_run,
    get_run,
    link_events,
    list_runs,
    lock_run,
    new_run_id,
    record_submission,
    release_submission,
    run_events,
    runs_page,
    runs_with_status,
    unsubmitted_runs,
    update_run,
)

__all__ = [
    "CHAMPION_ALIAS",
    "SUBMITTING",
    "NewInboxEvent",
    "RunPosition",
    "active_rollout",
    "add_many_to_inbox",
    "add_run",
    "add_to_inbox",
    "alias_history",
    "alias_moves_of_run",
    "authenticate_api_key",
    "begin_rollout_step",
    "claim_submission",
    "create_api_key",
    "create_run",
    "finish_delivery",
    "finish_rollout",
    "fleet_windows",
    "gate_verdicts",
    "get_champion",
    "get_dataset_version",
    "get_event",
    "get_model_version",
    "get_model_version_by_id",
    "get_pipeline",
    "get_run",
    "last_promotion_at",
    "latest_dataset_version",
    "latest_rollout",
    "link_events",
    "list_api_keys",
    "list_model_versions",
    "list_pipelines",
    "list_rollouts",
    "list_runs",
    "lock_run",
    "mark_sent",
    "move_champion",
    "new_run_id",
    "outbox_events",
    "pending_events",
    "pipelines_for_dataset",
    "provision_api_key",
    "prune_replica_windows",
    "record_dataset_version",
    "record_decision",
    "record_gate_checks",
    "record_rollout_step",
    "record_step_attempt",
    "record_submission",
    "register_model_version",
    "release_submission",
    "report_replica",
    "revoke_api_key",
    "run_events",
    "runs_page",
    "runs_with_status",
    "serving_replicas",
    "set_dataset_sha256",
    "set_event_status",
    "set_freeze",
    "set_model_stage",
    "spec_digest",
    "start_rollout",
    "unsent_events",
    "unsubmitted_runs",
    "update_run",
    "upsert_pipeline",
    "webhook_deliveries",
]
