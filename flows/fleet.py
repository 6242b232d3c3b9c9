"""A canary step's window over every model-server replica, from what they report to the metadata
database (`serving/reports.py`, `storage/repositories/replicas.py`).

The fleet's window of a variant is the sum of each replica's (`VariantWindow.merged`: counts add,
latency histograms merge bucket by bucket, percentiles are read from the merged histogram). A
replica whose heartbeat is older than `missing_after_s` (and that did not report itself stopped) is
missing: its unreported traffic is not in the window. The controller (`flows/canary.py`) therefore
lets a step pass only on a window that opens after the last missing replica was heard
(`FleetWindow.complete_since`): missing evidence only delays a step, it never makes one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from domain.evidence import REPLICA_MISSING_AFTER_S, ReplicaShare, ServedWindow, VariantWindow
from storage import repositories as repo

MISSING_AFTER_S = REPLICA_MISSING_AFTER_S


@dataclass(frozen=True, slots=True)
class FleetWindow:
    canary: VariantWindow
    champion: VariantWindow
    shares: tuple[ReplicaShare, ...]
    missing: tuple[str, ...]
    complete_since: datetime | None  # last heartbeat of a missing replica that reported in this window


def read_fleet_window(
    session: Session,
    pipeline: str,
    *,
    since: datetime,
    now: datetime,
    candidate: int,
    champion: int | None,
    heard_since: datetime,
    missing_after_s: float = MISSING_AFTER_S,
) -> FleetWindow | None:
    """The window since `since` summed over the replicas heard since `heard_since` that report
    windows; None when there are none (a single server read over HTTP instead)."""
    replicas = [r for r in repo.serving_replicas(session, heard_since=heard_since) if r.reports_windows]
    if not replicas:
        return None
    by_replica = repo.fleet_windows(session, pipeline, since)
    missing = [r for r in replicas if r.missing(now, missing_after_s)]
    silent_in_window = [r.heartbeat_at for r in missing if r.replica in by_replica]
    canaries, champions, shares = [], [], []
    for replica, windows in sorted(by_replica.items()):
        canary = _version_window(windows, "canary", candidate)
        champ = _version_window(windows, "champion", champion)
        canaries.append(canary)
        champions.append(champ)
        shares.append(ReplicaShare(
            replica=replica,
            canary_requests=canary.requests,
            champion_requests=champ.requests,
            labelled=canary.labelled + champ.labelled,
        ))  # fmt: skip
    return FleetWindow(
        canary=_total(canaries, candidate),
        champion=_total(champions, champion),
        shares=tuple(shares),
        missing=tuple(r.replica for r in missing),
        complete_since=max(silent_in_window) if silent_in_window else None,
    )


def heard_since(rollout_started_at: datetime, missing_after_s: float = MISSING_AFTER_S) -> datetime:
    """Replicas heard since shortly before the rollout began take part in it."""
    return rollout_started_at - timedelta(seconds=missing_after_s)


def _version_window(windows: list[ServedWindow], variant: str, version: int | None) -> VariantWindow:
    wanted = None if version is None else str(version)
    found = [w.window() for w in windows if w.variant == variant and wanted is not None and w.version == wanted]
    return found[0].merged(*found[1:]) if found else VariantWindow(version=wanted)


def _total(windows: list[VariantWindow], version: int | None) -> VariantWindow:
    if not windows:
        return VariantWindow(version=None if version is None else str(version))
    return windows[0].merged(*windows[1:])
