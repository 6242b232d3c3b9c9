"""Model-server replicas: heartbeats, what each serves, and their canary windows.

A replica (`serving/reports.py`) reports every second or so in one transaction: its heartbeat and
serving state (`report_replica`), and one `replica_windows` row per variant it served since its
previous report. The rows of one replica are disjoint in time, so a step's window over the fleet is
the sum of the rows that began after it opened (`fleet_windows`), never counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from domain.evidence import ServedWindow, ServingReplica
from storage.orm import SqlReplicaWindow, SqlServingReplica


def report_replica(
    session: Session,
    replica: ServingReplica,
    *,
    seq: int,
    window_start: datetime,
    windows: Sequence[ServedWindow] = (),
) -> None:
    """Stores the replica's heartbeat and serving state, and its windows of (window_start, heartbeat_at]."""
    row = session.get(SqlServingReplica, replica.replica)
    if row is None:
        row = SqlServingReplica(replica_id=replica.replica, started_at=replica.started_at)
        session.add(row)
    row.address, row.heartbeat_at, row.stopped_at = replica.address, replica.heartbeat_at, replica.stopped_at
    row.reports_windows = replica.reports_windows
    row.serving = {name: served.model_dump(mode="json") for name, served in replica.serving.items()}
    session.add_all(
        SqlReplicaWindow(
            replica_id=replica.replica,
            seq=seq,
            pipeline=window.pipeline,
            variant=window.variant,
            version=window.version or "",
            window_start=window_start,
            window_end=replica.heartbeat_at,
            requests=window.requests,
            window=window.window().model_dump(mode="json", exclude={"version", "latency_p50_ms", "latency_p99_ms"}),
        )
        for window in windows
    )
    session.flush()


def serving_replicas(
    session: Session, *, heard_since: datetime | None = None, pipeline: str | None = None
) -> list[ServingReplica]:
    """Replicas heard from since `heard_since` (all when None) that serve `pipeline` (any when None),
    by replica id."""
    query = select(SqlServingReplica).order_by(SqlServingReplica.replica_id)
    if heard_since is not None:
        query = query.where(SqlServingReplica.heartbeat_at >= heard_since)
    replicas = [
        ServingReplica.model_validate(
            {
                "replica": row.replica_id,
                "address": row.address,
                "started_at": row.started_at,
                "heartbeat_at": row.heartbeat_at,
                "stopped_at": row.stopped_at,
                "reports_windows": row.reports_windows,
                "serving": row.serving,
            }
        )
        for row in session.scalars(query)
    ]
    return [r for r in replicas if pipeline is None or pipeline in r.serving]


def fleet_windows(session: Session, pipeline: str, since: datetime) -> dict[str, list[ServedWindow]]:
    """Per replica, its windows of the pipeline (one per variant and version) summed over the
    reports that began at or after `since`."""
    query = (
        select(SqlReplicaWindow)
        .where(SqlReplicaWindow.pipeline == pipeline, SqlReplicaWindow.window_start >= since)
        .order_by(SqlReplicaWindow.replica_id, SqlReplicaWindow.seq)
    )
    sums: dict[str, dict[tuple[str, str], ServedWindow]] = {}
    for row in session.scalars(query):
        slice_ = ServedWindow.model_validate(
            {**row.window, "pipeline": pipeline, "variant": row.variant, "version": row.version}
        )
        per_replica = sums.setdefault(row.replica_id, {})
        key = (row.variant, row.version)
        before = per_replica.get(key)
        per_replica[key] = slice_ if before is None else before.merged_served(slice_)
    return {replica: list(windows.values()) for replica, windows in sums.items()}


def prune_replica_windows(session: Session, replica_id: str, before: datetime) -> int:
    """Deletes the replica's windows that ended before `before` (no step looks that far back)."""
    result = session.execute(
        delete(SqlReplicaWindow).where(SqlReplicaWindow.replica_id == replica_id, SqlReplicaWindow.window_end < before)
    )
    return int(getattr(result, "rowcount", 0) or 0)
