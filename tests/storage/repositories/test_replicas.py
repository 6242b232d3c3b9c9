"""Replica heartbeats and canary windows: disjoint report slices sum per replica, never twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from domain.evidence import ReplicaServing, ServedWindow, ServingReplica, Variant
from domain.histogram import LatencyHistogram
from storage import repositories as repo
from tests.storage.repositories.conftest import tx

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _replica(name: str, at: datetime, *, stopped: bool = False) -> ServingReplica:
    serving = {"digits": ReplicaServing(champion_version="1", canary_version="2", canary_weight=25.0, since=T0)}
    return ServingReplica(
        replica=name, address=f"http://{name}:8080", started_at=T0, heartbeat_at=at,
        stopped_at=at if stopped else None, reports_windows=True, serving=serving,
    )  # fmt: skip


def _window(variant: Variant, version: str, requests: int, latencies: list[float]) -> ServedWindow:
    return ServedWindow(
        pipeline="digits", variant=variant, version=version, requests=requests, errors=1,
        latency_histogram=LatencyHistogram.of(latencies), class_counts={"0": requests}, labelled=2, correct=1,
    )  # fmt: skip


def test_reports_sum_per_replica_from_the_step_start_and_heartbeats_list_what_each_serves(
    sessions: sessionmaker[Session],
) -> None:
    def report(name: str, seq: int, start: datetime, end: datetime, windows: list[ServedWindow]) -> None:
        tx(
            sessions,
            lambda s: repo.report_replica(s, _replica(name, end), seq=seq, window_start=start, windows=windows),
        )

    t1, t2, t3 = (T0 + timedelta(seconds=n) for n in (1, 2, 3))
    report("a", 1, T0, t1, [_window("canary", "2", 5, [1.0] * 5)])  # before the step: not counted
    report("a", 2, t1, t2, [_window("canary", "2", 3, [2.0] * 3), _window("champion", "1", 7, [1.0] * 7)])
    report("a", 3, t2, t3, [_window("canary", "2", 4, [4.0] * 4)])
    report("b", 1, t1, t2, [_window("canary", "2", 6, [8.0] * 6)])

    by_replica = tx(sessions, lambda s: repo.fleet_windows(s, "digits", t1))

    assert sorted(by_replica) == ["a", "b"]
    a = {(w.variant, w.version): w for w in by_replica["a"]}
    assert a[("canary", "2")].requests == 7 and a[("canary", "2")].errors == 2 and a[("canary", "2")].labelled == 4
    assert a[("canary", "2")].latency_histogram == LatencyHistogram.of([2.0] * 3 + [4.0] * 4)
    assert a[("canary", "2")].class_counts == {"0": 7}
    assert a[("champion", "1")].requests == 7
    assert [w.requests for w in by_replica["b"]] == [6]
    assert tx(sessions, lambda s: repo.fleet_windows(s, "other", T0)) == {}

    replicas = tx(sessions, lambda s: repo.serving_replicas(s))
    assert [(r.replica, r.heartbeat_at) for r in replicas] == [("a", t3), ("b", t2)]
    assert replicas[0].serving["digits"].canary_weight == 25.0
    assert replicas[1].missing(t2 + timedelta(seconds=6), 5.0) and not replicas[0].missing(t3, 5.0)
    assert [r.replica for r in tx(sessions, lambda s: repo.serving_replicas(s, heard_since=t3))] == ["a"]


def test_a_stopped_replica_is_not_missing_and_old_windows_are_pruned(sessions: sessionmaker[Session]) -> None:
    t1 = T0 + timedelta(seconds=1)
    tx(sessions, lambda s: repo.report_replica(s, _replica("a", t1), seq=1, window_start=T0,
                                               windows=[_window("canary", "2", 3, [1.0])]))  # fmt: skip
    tx(sessions, lambda s: repo.report_replica(s, _replica("a", t1, stopped=True), seq=2, window_start=t1))

    (replica,) = tx(sessions, lambda s: repo.serving_replicas(s))
    assert replica.stopped_at == t1 and not replica.missing(t1 + timedelta(hours=1), 5.0)
    assert tx(sessions, lambda s: repo.prune_replica_windows(s, "a", t1 + timedelta(seconds=1))) == 1
    assert tx(sessions, lambda s: repo.fleet_windows(s, "digits", T0)) == {}
