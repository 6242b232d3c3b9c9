"""Trigger path benchmarks against the real local broker (`make services`), printing comparison tables.

1. Trigger latency, produce → Run row → Prefect flow run submitted (debounce 0, 200 events, one at
   a time), p50/p99, through the real consumer and trigger service in both topologies: one process
   as `retrainer serve` (SQLite; the consumer's commit wakes the trigger service in-process) and
   the split deployment (PostgreSQL; the trigger service in its own process, woken by LISTEN/NOTIFY).
   Peer: Prefect's own event path on the same machine (`emit_event` → deployment event trigger →
   flow run), measured the same way. Then where the one-process latency goes, stage by stage
   (`StageClock`: send → poll → inbox commit → creation pass → Run row → submission → seen).
2. Ingestion throughput of valid events into the inbox vs a bare kafka-python consume loop over
   the same topic (3 partitions, the same messages; the ceiling): one consumer in-process on SQLite,
   and one vs two consumer processes of one group on PostgreSQL (as `retrainer consume` runs).
3. The consumer's resident memory at the 10,000th and 100,000th event (must stay flat).

    .venv/bin/python bench/triggers.py [--latency-events 200] [--peer-events 50] [--throughput-events 20000]
        [--rss-events 100000] [--latency-only | --throughput-only]

The PostgreSQL databases are created for the run on RETRAINER_BENCH_POSTGRES_URL's server (default the
local test server) and dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.support.databases import postgres_database, sqlite_database  # noqa: E402
from bench.support.measures import current_rss_mb, percentile  # noqa: E402

BOOTSTRAP = os.environ.get("RETRAINER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def make_topic(partitions: int = 3) -> str:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = f"retrainer.bench-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    admin.close()
    return topic


def produce(topic: str, dataset: str, count: int, prefix: str, producer: Any = None) -> None:
    from kafka import KafkaProducer

    from consumers.binding import to_kafka_message
    from consumers.publisher import data_changed_event

    own = producer is None
    producer = producer or KafkaProducer(bootstrap_servers=BOOTSTRAP, acks=1, linger_ms=20, batch_size=256 * 1024)
    for i in range(count):
        event = data_changed_event(dataset, f"s3://datasets/{dataset}.csv", event_id=f"{prefix}-{i}")
        message = to_kafka_message(event)
        producer.send(topic, key=dataset.encode(), value=message.value, headers=list(message.headers.items()))
    producer.flush(120)
    if own:
        producer.close()


def setup_db(url: str, dataset: str, triggers: dict[str, Any] | None = None) -> Any:
    """Sessions on the migrated database at `url`, with the pipeline `bench` listening to `dataset`."""
    from storage import repositories as repo
    from storage.db import create_db_engine, make_sessions, transaction

    sessions = make_sessions(create_db_engine(url))
    spec = {
        "name": "bench",
        "dataset": dataset,
        "model": {"architecture": "mlp", "input_shape": [8], "output_classes": 2},
        "triggers": {
            "events": triggers or {"debounce_seconds": 0, "max_wait_seconds": 1, "while_running": "supersede"}
        },
    }
    with transaction(sessions) as session:
        repo.upsert_pipeline(session, "bench", dataset, spec)
    return sessions


# ------------------------------------------------------------------------- throughput


class Rate:
    """Events per second from the end of the first batch on: the group join and the first fetch
    before it are no consuming, and every loop below is timed the same way."""

    def __init__(self) -> None:
        self.started, self.timed = 0.0, 0

    def batch(self, events: int) -> None:
        if self.started:
            self.timed += events
        elif events:
            self.started = time.perf_counter()

    def per_second(self) -> float:
        return self.timed / (time.perf_counter() - self.started)


def bare_loop(topic: str, count: int) -> float:
    """A bare kafka-python loop that decodes each record and commits each batch: the ceiling."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=500,
    )
    seen, rate = 0, Rate()
    while seen < count:
        batch = [record for records in consumer.poll(timeout_ms=500).values() for record in records]
        for record in batch:
            json.loads(record.value)  # the same minimum of work: decode what was read
        consumer.commit()
        seen += len(batch)
        rate.batch(len(batch))
    consumer.close()
    return rate.per_second()


def inbox_loop(topic: str, sessions: Any, count: int, settings: Any) -> float:
    """One consumer storing into the inbox, in this process."""
    from consumers.consumer import DataChangeConsumer

    consumer = DataChangeConsumer(settings, sessions, max_records=500)
    stored, rate = 0, Rate()
    while stored < count:
        batch = consumer.run_once().stored
        stored += batch
        rate.batch(batch)
    per_second = rate.per_second()
    consumer.close()
    return per_second


def consume_child(url: str, count: int) -> None:
    """`retrainer consume` in a process of its own: stores into the inbox at `url` until it holds
    `count` events (whichever consumer of the group stored them)."""
    from sqlalchemy import func, select

    from consumers.consumer import DataChangeConsumer
    from domain.settings import load_settings
    from storage.db import create_db_engine, make_sessions
    from storage.orm import SqlEvent

    sessions = make_sessions(create_db_engine(url))
    consumer = DataChangeConsumer(load_settings(), sessions, max_records=500)
    total = select(func.count()).select_from(SqlEvent)
    while True:
        consumer.run_once()
        with sessions() as session:
            if (session.scalar(total) or 0) >= count:
                break
    consumer.close()


def consumer_processes(topic: str, dataset: str, count: int, processes: int) -> float:
    """Events/s into a PostgreSQL inbox by `processes` consumer processes of one group, from the
    first stored event to the last (their own `received_at`): the join before it is no consuming."""
    from sqlalchemy import func, select

    from storage.orm import SqlEvent

    with postgres_database("retrainer_bench_consume") as url:
        sessions = setup_db(url, dataset)
        env = {
            **os.environ,
            "RETRAINER_KAFKA_TOPIC": topic,
            "RETRAINER_KAFKA_CONSUMER_GROUP": f"n{processes}-{url[-8:]}",
        }
        children = [
            subprocess.Popen([sys.executable, __file__, "--consume-child", url, str(count)], env=env)
            for _ in range(processes)
        ]
        for child in children:
            if child.wait(600) != 0:
                raise RuntimeError(f"a consumer process exited with {child.returncode}")
        with sessions() as session:
            first, last, stored = session.execute(
                select(func.min(SqlEvent.received_at), func.max(SqlEvent.received_at), func.count())
            ).one()
        sessions.kw["bind"].dispose()
    return (stored - 1) / (last - first).total_seconds()


# ---------------------------------------------------------------------------- latency


TRIGGER_INTERVAL_S = 1.0  # the services' poll interval: only the fallback now that inserts wake them


class StageClock:
    """Per-stage timestamps (perf_counter) of the one-process topology, taken by wrapping the real
    consumer's and trigger service's methods: where an event's latency goes."""

    STAGES = (
        ("send → consumer poll returned", "polled"),
        ("poll → inbox committed (+ notify)", "stored"),
        ("inbox commit → creation pass starts (wake-up)", "pass"),
        ("creation pass (Run row committed)", "created"),
        ("Run row → submission call starts (claim)", "submit"),
        ("submission call (Prefect)", "submitted"),
        ("call returned → flow run id seen by the watcher", None),
    )

    def __init__(self) -> None:
        self.stamps: dict[str, list[float]] = {name: [] for _, name in self.STAGES if name}
        self.lock = threading.Lock()
        self.events: list[tuple[float, float]] = []

    def stamp(self, name: str) -> None:
        with self.lock:
            self.stamps[name].append(time.perf_counter())

    def timed(
        self, inner: Any, before: str | None, after: str | None, enter_if: Any = None, leave_if: Any = None
    ) -> Any:
        """`inner`, stamping `before` on entry when `enter_if(*args)` holds and `after` on return
        when `leave_if(result)` holds (both default to always)."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before and (enter_if is None or enter_if(*args)):
                self.stamp(before)
            result = inner(*args, **kwargs)
            if after and (leave_if is None or leave_if(result)):
                self.stamp(after)
            return result

        return wrapped

    def breakdown(self) -> list[tuple[str, list[float]]]:
        """Per stage, its duration (ms) for each event: `events` holds (sent, flow run seen)."""
        from bisect import bisect_left, bisect_right

        ordered = {name: sorted(values) for name, values in self.stamps.items()}

        def first_after(name: str, t: float) -> float:
            values = ordered[name]
            i = bisect_left(values, t)
            return values[i] if i < len(values) else float("nan")

        rows: dict[str, list[float]] = {label: [] for label, _ in self.STAGES}
        for sent, seen in self.events:
            polled = first_after("polled", sent)
            stored = first_after("stored", polled)
            created = first_after("created", stored)
            starts = ordered["pass"]
            started = starts[max(0, bisect_right(starts, created) - 1)]
            submit = first_after("submit", created)
            submitted = first_after("submitted", submit)
            for (label, _), (a, b) in zip(
                self.STAGES,
                (
                    (sent, polled),
                    (polled, stored),
                    (stored, started),
                    (started, created),
                    (created, submit),
                    (submit, submitted),
                    (submitted, seen),
                ),
                strict=True,
            ):
                rows[label].append((b - a) * 1000)
        return list(rows.items())


Latencies = tuple[list[float], list[float], list[float]]  # → Run row, → flow run id recorded, → Prefect's `created`


def our_latency(events: int, url: str, split: bool, clock: StageClock) -> Latencies:
    """(produce → Run row, produce → Prefect flow run submitted) in ms, one event at a time, through
    the real consumer and trigger service: in one process as `retrainer serve` runs them (the
    in-process wake-up), or with the trigger service in a process of its own as `retrainer triggers`
    (PostgreSQL LISTEN/NOTIFY). Call inside a Prefect server that has the `bench` deployment."""
    from kafka import KafkaProducer
    from prefect.settings import PREFECT_API_URL
    from sqlalchemy import select

    from consumers.consumer import DataChangeConsumer
    from domain.settings import load_settings
    from flows.trigger_service import TriggerService
    from flows.triggers import prefect_submitter
    from storage.orm import SqlEvent, SqlRun, SqlRunEvent
    from storage.repositories.runs import SUBMITTING

    dataset = f"lat-{uuid.uuid4().hex[:6]}"
    run_of = select(SqlRun.prefect_flow_run_id).join(SqlRunEvent).join(SqlEvent)
    topic = make_topic()
    sessions = setup_db(url, dataset)
    os.environ.update(RETRAINER_KAFKA_TOPIC=topic, RETRAINER_KAFKA_CONSUMER_GROUP=f"lat-{dataset}")
    consumer = DataChangeConsumer(load_settings(), sessions)
    stop = threading.Event()
    threads = [threading.Thread(target=consumer.run_forever)]
    child = None
    if split:
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        child = subprocess.Popen([sys.executable, __file__, "--trigger-child", url], env=env)
    else:
        # the stage clock wraps the real methods on these instances (a few µs per call)
        consumer._handle = clock.timed(consumer._handle, "polled", None, enter_if=lambda batches: any(batches.values()))  # type: ignore[method-assign]
        consumer._store = clock.timed(consumer._store, None, "stored", leave_if=lambda result: result[0] > 0)  # type: ignore[method-assign]
        service = TriggerService(sessions, clock.timed(prefect_submitter(), "submit", "submitted"))
        service.create_runs = clock.timed(service.create_runs, "pass", "created", leave_if=lambda result: result[0])  # type: ignore[method-assign]
        threads.append(
            threading.Thread(target=service.run_forever, args=(stop,), kwargs={"interval_s": TRIGGER_INTERVAL_S})
        )
    for thread in threads:
        thread.start()
    producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks=1, linger_ms=0)  # connected before timing

    watch = sessions.kw["bind"].connect()  # one connection: no pool checkout, ping or ORM session per look

    def wait_for(event_id: str, timeout_s: float) -> tuple[float, float, str]:
        """When the run of `event_id` was visible and when its flow run id was (perf_counter), and
        that id; one light query every millisecond, so the watching costs the services little CPU."""
        run_at, deadline = None, time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            found = watch.execute(run_of.where(SqlEvent.event_id == event_id)).first()
            watch.commit()  # the next look sees what was committed since
            if found is not None:
                run_at = run_at or time.perf_counter()
                if found.prefect_flow_run_id not in (None, SUBMITTING):  # the claim's marker is no flow run
                    return run_at, time.perf_counter(), found.prefect_flow_run_id
            time.sleep(0.001)
        raise TimeoutError(f"no flow run for event {event_id} within {timeout_s:.0f} s")

    to_run, to_flow, sent, flow_runs = [], [], {}, {}
    try:
        produce(topic, dataset, 1, "warm-up", producer)
        wait_for("warm-up-0", 180)  # the consumer joined its group, the trigger process started
        for i in range(events):
            started, sent[f"lat-{i}-0"] = time.perf_counter(), datetime.now(UTC)
            produce(topic, dataset, 1, f"lat-{i}", producer)
            run_at, flow_at, flow_runs[f"lat-{i}-0"] = wait_for(f"lat-{i}-0", 30)
            clock.events.append((started, flow_at))
            to_run.append((run_at - started) * 1000)
            to_flow.append((flow_at - started) * 1000)
    finally:
        watch.close()
        producer.close()
        stop.set()
        consumer.stop_requested.set()
        if child is not None:
            child.terminate()
            child.wait(30)
        for thread in threads:
            thread.join(30)
    stamps = (
        select(SqlEvent.event_id, SqlEvent.received_at, SqlRun.created_at)
        .select_from(SqlEvent)
        .join(SqlRunEvent)
        .join(SqlRun)
    )
    with sessions() as session:
        rows = session.execute(stamps.where(SqlEvent.event_id.in_(list(sent)))).all()
    inbox = [(row.received_at.replace(tzinfo=UTC) - sent[row.event_id]).total_seconds() * 1000 for row in rows]
    debounce = [(row.created_at - row.received_at).total_seconds() * 1000 for row in rows]
    where = "split" if split else "one process"
    print(f"{where}: by the rows' own timestamps, p50 / p99 (ms): produce → inbox row "
          f"{percentile(inbox, 50):.1f} / {percentile(inbox, 99):.1f}, inbox row → Run row "
          f"{percentile(debounce, 50):.1f} / {percentile(debounce, 99):.1f}")  # fmt: skip
    created = prefect_created({flow_run: sent[event_id] for event_id, flow_run in flow_runs.items()})
    return to_run, to_flow, created


def prefect_created(sent: dict[str, datetime]) -> list[float]:
    """ms from each send (wall clock) to the `created` time Prefect's server stamped on the flow run:
    when the flow run came to exist, read the same way for both paths and free of any watcher's
    polling interval (one machine, one clock)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [uuid.UUID(flow_run) for flow_run in sent]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
    assert len(runs) == len(ids), f"Prefect knows {len(runs)} of the {len(ids)} flow runs submitted"
    return [(run.created - sent[str(run.id)]).total_seconds() * 1000 for run in runs if run.created]


def trigger_child(url: str) -> None:
    """`retrainer triggers` in a process of its own, on the database at `url` (SIGTERM stops it)."""
    from flows.loop import stop_on_signals
    from flows.trigger_service import TriggerService
    from flows.triggers import prefect_submitter
    from storage.db import create_db_engine, make_sessions

    stop = threading.Event()
    stop_on_signals(stop)
    service = TriggerService(make_sessions(create_db_engine(url)), prefect_submitter())
    service.run_forever(stop, interval_s=TRIGGER_INTERVAL_S)


def prefect_event_latency(events: int) -> tuple[list[float], list[float]] | str:
    """Prefect's own path: emit_event → a deployment's event trigger → a flow run. (ms until the flow
    run was seen by a read every 10 ms, ms until its `created` stamp)."""
    try:
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.events import DeploymentEventTrigger, emit_event
        from prefect.testing.utilities import prefect_test_harness
    except ImportError as e:
        return f"not measured: {e}"

    @flow(name="bench-peer")
    def peer() -> None:
        return None

    latencies: list[float] = []
    sent: list[datetime] = []
    with prefect_test_harness(server_startup_timeout=120):
        trigger = DeploymentEventTrigger(expect={"retrainer.data.changed"}, match={"prefect.resource.id": "dataset.*"})
        deployment_id = peer.to_deployment(name="peer", triggers=[trigger]).apply()
        time.sleep(5)  # let the server's trigger service pick up the automation
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

            def count() -> int:
                return len(
                    client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
                    )
                )

            for i in range(events):
                before = count()
                started = time.perf_counter()
                sent.append(datetime.now(UTC))
                emit_event(event="retrainer.data.changed", resource={"prefect.resource.id": f"dataset.d{i}"})
                deadline = started + 30
                while count() <= before:
                    if time.perf_counter() > deadline:
                        return f"not measured: no flow run within 30 s of event {i} (automation never fired)"
                    time.sleep(0.01)
                latencies.append((time.perf_counter() - started) * 1000)
            # one event at a time, each waited for: the i-th flow run created is the i-th event's
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
            )
    created = sorted(run.created for run in runs if run.created)
    return latencies, [(at - send).total_seconds() * 1000 for send, at in zip(sent, created, strict=True)]


# -------------------------------------------------------------------------------- RSS


def rss_child(topic: str, db_dir: str, count: int) -> None:
    """Runs in its own process: consume `count` events, report RSS at 10k and at the end."""
    from consumers.consumer import DataChangeConsumer
    from domain.settings import load_settings

    sessions = setup_db(sqlite_database(Path(db_dir)), os.environ["BENCH_DATASET"])
    consumer = DataChangeConsumer(load_settings(), sessions, max_records=500)
    stored, marks = 0, {}
    while stored < count:
        stored += consumer.run_once().stored
        for mark in (10_000, count):
            if stored >= mark and mark not in marks:
                marks[mark] = current_rss_mb()
    consumer.close()
    print(json.dumps(marks))


def latencies(events: int, workdir: Path, clock: StageClock) -> dict[str, Latencies]:
    """Both topologies' trigger latencies, measured against one Prefect server (the one-process
    topology's stages into `clock`)."""
    from prefect.testing.utilities import prefect_test_harness

    from domain.spec import parse_spec
    from flows.registry import deployments

    model = {"architecture": "mlp", "input_shape": [8], "output_classes": 2}
    with prefect_test_harness(server_startup_timeout=120):
        deployments([parse_spec({"name": "bench", "dataset": "any", "model": model}, source="bench")])[0].apply()
        measured = {
            "retrainer serve (one process, SQLite)": our_latency(
                events, sqlite_database(workdir), split=False, clock=clock
            )
        }
        with postgres_database("retrainer_bench_triggers") as url:
            measured["split: consume | triggers (PostgreSQL)"] = our_latency(
                events, url, split=True, clock=StageClock()
            )
    return measured


def latency_table(measured: dict[str, Latencies], peer: tuple[list[float], list[float]] | str) -> None:
    """The ratio compares like with like: send → the flow run's `created` stamp in Prefect, for our
    path and Prefect's own (each also has the time its watcher saw the result, for reference)."""
    print(f"{'measure':<62}{'p50 / p99 (ms)':>16}  target")
    for topology, (to_run, to_flow, to_created) in measured.items():
        run50, run99, flow50, flow99 = (percentile(v, q) for v in (to_run, to_flow) for q in (50, 99))
        met = "met" if run50 <= 20 and run99 <= 100 else "NOT met"
        print(f"{topology + ': produce → Run row':<62}{run50:>7.1f} /{run99:>7.1f}  p50 <= 20, p99 <= 100: {met}")
        met = "met" if flow99 <= 250 else "NOT met"
        print(f"{'  produce → Prefect flow run submitted (id on the run)':<62}{flow50:>7.1f} /{flow99:>7.1f}  "
              f"p99 <= 250: {met}")  # fmt: skip
        created50, created99 = percentile(to_created, 50), percentile(to_created, 99)
        print(f"{'  produce → flow run created (its stamp in Prefect)':<62}{created50:>7.1f} /{created99:>7.1f}")
        if not isinstance(peer, str):
            ratio = statistics.median(peer[1]) / statistics.median(to_created)
            print(f"{'  faster than Prefect emit_event → flow run created (p50)':<62}{ratio:>15.1f}x  >= 5x: "
                  f"{'met' if ratio >= 5 else 'NOT met'}")  # fmt: skip
    if isinstance(peer, str):
        print(f"{'Prefect emit_event → automation → flow run':<62}{'—':>16}  {peer}")
        return
    seen, created = peer
    label = f"Prefect emit_event → automation → flow run ({len(seen)} events)"
    print(f"{label:<62}")
    print(f"{'  seen by a read every 10 ms':<62}{percentile(seen, 50):>7.1f} /{percentile(seen, 99):>7.1f}")
    created50, created99 = percentile(created, 50), percentile(created, 99)
    print(f"{'  flow run created (its created stamp in Prefect)':<62}{created50:>7.1f} /{created99:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-events", type=int, default=200)
    parser.add_argument("--peer-events", type=int, default=50)
    parser.add_argument("--throughput-events", type=int, default=20_000)
    parser.add_argument("--rss-events", type=int, default=100_000)
    parser.add_argument("--latency-only", action="store_true", help="Only the trigger latency table.")
    parser.add_argument("--rss-child", nargs=3, metavar=("TOPIC", "DB_DIR", "COUNT"))
    parser.add_argument("--trigger-child", metavar="DATABASE_URL")
    parser.add_argument("--consume-child", nargs=2, metavar=("DATABASE_URL", "COUNT"))
    parser.add_argument("--throughput-only", action="store_true", help="Only the consumer throughput and memory.")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    if args.trigger_child:
        trigger_child(args.trigger_child)
        return
    if args.consume_child:
        consume_child(args.consume_child[0], int(args.consume_child[1]))
        return
    from domain.settings import load_settings

    workdir = Path(tempfile.mkdtemp(prefix="retrainer-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    if not args.throughput_only:
        (workdir / "lat").mkdir()
        clock = StageClock()
        measured = latencies(args.latency_events, workdir / "lat", clock)
        peer = prefect_event_latency(args.peer_events)
        print(f"\nTrigger latency on this machine (broker {BOOTSTRAP}, debounce 0, Prefect test server)\n")
        latency_table(measured, peer)
        print("\nWhere the one-process latency goes, per stage (ms)\n")
        print(f"{'stage':<62}{'p50':>8}{'p99':>8}")
        for label, values in clock.breakdown():
            print(f"{label:<62}{percentile(values, 50):>8.1f}{percentile(values, 99):>8.1f}")
    if args.latency_only:
        return

    # throughput
    dataset = f"tp-{uuid.uuid4().hex[:6]}"
    topic = make_topic()
    produce(topic, dataset, args.throughput_events, dataset)
    (workdir / "tp").mkdir()
    sessions = setup_db(sqlite_database(workdir / "tp"), dataset)
    os.environ.update(RETRAINER_KAFKA_TOPIC=topic, RETRAINER_KAFKA_CONSUMER_GROUP=f"tp-{dataset}")
    bare = bare_loop(topic, args.throughput_events)
    ours = inbox_loop(topic, sessions, args.throughput_events, load_settings())
    split = {n: consumer_processes(topic, dataset, args.throughput_events, n) for n in (1, 2)}

    # RSS
    rss_dataset = f"rss-{uuid.uuid4().hex[:6]}"
    rss_topic = make_topic()
    produce(rss_topic, rss_dataset, args.rss_events, rss_dataset)
    (workdir / "rss").mkdir()
    env = {
        **os.environ,
        "RETRAINER_KAFKA_TOPIC": rss_topic,
        "RETRAINER_KAFKA_CONSUMER_GROUP": f"rss-{rss_dataset}",
        "BENCH_DATASET": rss_dataset,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", rss_topic, str(workdir / "rss"), str(args.rss_events)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    marks = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    growth = marks[args.rss_events] / marks[10_000] - 1

    print(f"\nConsumer throughput ({args.throughput_events} events, one topic of 3 partitions) and memory\n")
    print(f"{'bare kafka-python consume loop (events/s)':<58}{bare:>14.0f}")
    print(
        f"{'consumer → SQLite inbox, in-process, committed (events/s)':<58}{ours:>14.0f}  "
        f"ratio {ours / bare:.2f} (>= 0.50: {'met' if ours / bare >= 0.5 else 'NOT met'})"
    )
    for n, rate in split.items():
        label = f"{n} consumer process{'es' if n > 1 else ''}, one group → PostgreSQL inbox (events/s)"
        print(f"{label:<58}{rate:>14.0f}  ratio {rate / bare:.2f}, {rate / split[1]:.2f}x one process")
    print(
        f"{'consumer RSS at 10k / ' + str(args.rss_events // 1000) + 'k events (MB)':<58}"
        f"{marks[10_000]:>6.1f} /{marks[args.rss_events]:>6.1f}  growth {growth:+.1%} "
        f"(< 10 %: {'met' if growth < 0.10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
