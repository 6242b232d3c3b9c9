"""Trigger path benchmarks against the real local broker (`make services`) and an embedded
SQLite inbox, printing one comparison table.

1. Trigger latency, produce → Run row → Prefect flow run created (debounce 0, 200 events, one at
   a time), p50/p99; peer: Prefect's own event path on the same machine (`emit_event` →
   deployment event trigger → flow run), measured the same way.
2. Ingestion throughput of valid events into the inbox vs a bare kafka-python consume loop over
   the same topic (the ceiling), as a ratio.
3. The consumer's resident memory at the 10,000th and 100,000th event (must stay flat).

    .venv/bin/python bench/triggers.py [--latency-events 200] [--throughput-events 20000] [--rss-events 100000]
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def setup_db(directory: Path, dataset: str, triggers: dict[str, Any] | None = None) -> Any:
    import migrations
    from storage import repositories as repo
    from storage.db import create_db_engine, make_sessions, transaction

    url = f"sqlite:///{directory / 'bench.db'}"
    migrations.upgrade(url)
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
    return url, sessions


# ------------------------------------------------------------------------- throughput


def bare_loop(topic: str, count: int) -> float:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=500,
    )
    seen, started = 0, time.perf_counter()
    while seen < count:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                json.loads(record.value)  # the same minimum of work: decode what was read
                seen += 1
        consumer.commit()
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def inbox_loop(topic: str, sessions: Any, count: int, settings: Any) -> float:
    from sqlalchemy import func, select

    from consumers.consumer import DataChangeConsumer
    from storage.db import transaction
    from storage.orm import SqlEvent

    consumer = DataChangeConsumer(settings, sessions, max_records=500)
    consumer.connect()  # as the raw loop's client, connected before timing
    stored, started = 0, time.perf_counter()
    while stored < count:
        stored += consumer.run_once().stored
    elapsed = time.perf_counter() - started
    consumer.close()
    with transaction(sessions) as session:
        assert session.scalar(select(func.count()).select_from(SqlEvent)) >= count
    return count / elapsed


# ---------------------------------------------------------------------------- latency


def our_latency(events: int, workdir: Path) -> tuple[list[float], list[float]]:
    """(produce → Run row, produce → Prefect flow run) in ms, one event at a time."""
    from prefect.testing.utilities import prefect_test_harness

    from consumers.consumer import DataChangeConsumer
    from domain.settings import load_settings
    from flows.registry import deployments
    from flows.triggers import prefect_submitter, process_pending_events, submit_unsubmitted_runs
    from storage import repositories as repo
    from storage.db import transaction

    dataset = f"lat-{uuid.uuid4().hex[:6]}"
    topic = make_topic()
    _, sessions = setup_db(workdir, dataset)
    os.environ.update(RETRAINER_KAFKA_TOPIC=topic, RETRAINER_KAFKA_CONSUMER_GROUP=f"lat-{dataset}")
    settings = load_settings()
    to_run, to_flow = [], []
    with prefect_test_harness(server_startup_timeout=120):
        from domain.spec import parse_spec

        spec = parse_spec(
            {
                "name": "bench",
                "dataset": dataset,
                "model": {"architecture": "mlp", "input_shape": [8], "output_classes": 2},
            },
            source="bench",
        )
        deployments([spec])[0].apply()
        submit = prefect_submitter()
        consumer = DataChangeConsumer(settings, sessions, max_records=500, poll_timeout_ms=20)
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                consumer.run_once()

        def debounce() -> None:
            while not stop.is_set():
                process_pending_events(sessions, datasets=[dataset])
                submit_unsubmitted_runs(sessions, submit)
                stop.wait(0.005)

        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks=1, linger_ms=0)  # connected before timing
        threads = [threading.Thread(target=consume), threading.Thread(target=debounce)]
        for t in threads:
            t.start()
        try:
            produce(topic, dataset, 1, "warm-up", producer)
            time.sleep(3)
            for i in range(events):
                event_id = f"lat-{i}"
                started = time.perf_counter()
                produce(topic, dataset, 1, event_id.rsplit("-", 1)[0] + f"-{i}-x", producer)
                run_at = flow_at = None
                while flow_at is None:
                    with transaction(sessions) as session:
                        latest = repo.list_runs(session, "bench", limit=1)
                    if latest and latest[0].event_ids and latest[0].event_ids[-1].endswith(f"-{i}-x-0"):
                        run_at = run_at or time.perf_counter()
                        if latest[0].prefect_flow_run_id:
                            flow_at = time.perf_counter()
                    time.sleep(0.002)
                to_run.append((run_at - started) * 1000)  # type: ignore[operator]
                to_flow.append((flow_at - started) * 1000)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            consumer.close()
    return to_run, to_flow


def prefect_event_latency(events: int) -> list[float] | str:
    """Prefect's own path: emit_event → a deployment's event trigger → a flow run."""
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
                emit_event(event="retrainer.data.changed", resource={"prefect.resource.id": f"dataset.d{i}"})
                deadline = started + 30
                while count() <= before:
                    if time.perf_counter() > deadline:
                        return f"not measured: no flow run within 30 s of event {i} (automation never fired)"
                    time.sleep(0.01)
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


# -------------------------------------------------------------------------------- RSS


def rss_child(topic: str, db_dir: str, count: int) -> None:
    """Runs in its own process: consume `count` events, report RSS at 10k and at the end."""
    from consumers.consumer import DataChangeConsumer
    from domain.settings import load_settings

    _, sessions = setup_db(Path(db_dir), os.environ["BENCH_DATASET"])
    consumer = DataChangeConsumer(load_settings(), sessions, max_records=500)
    stored, marks = 0, {}
    while stored < count:
        stored += consumer.run_once().stored
        for mark in (10_000, count):
            if stored >= mark and mark not in marks:
                marks[mark] = current_rss_mb()
    consumer.close()
    print(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-events", type=int, default=200)
    parser.add_argument("--peer-events", type=int, default=20)
    parser.add_argument("--throughput-events", type=int, default=20_000)
    parser.add_argument("--rss-events", type=int, default=100_000)
    parser.add_argument("--rss-child", nargs=3, metavar=("TOPIC", "DB_DIR", "COUNT"))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    from domain.settings import load_settings

    workdir = Path(tempfile.mkdtemp(prefix="retrainer-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    # throughput
    dataset = f"tp-{uuid.uuid4().hex[:6]}"
    topic = make_topic()
    produce(topic, dataset, args.throughput_events, dataset)
    (workdir / "tp").mkdir()
    _, sessions = setup_db(workdir / "tp", dataset)
    os.environ.update(RETRAINER_KAFKA_TOPIC=topic, RETRAINER_KAFKA_CONSUMER_GROUP=f"tp-{dataset}")
    bare = bare_loop(topic, args.throughput_events)
    ours = inbox_loop(topic, sessions, args.throughput_events, load_settings())

    # latency
    (workdir / "lat").mkdir()
    to_run, to_flow = our_latency(args.latency_events, workdir / "lat")
    peer = prefect_event_latency(args.peer_events)

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

    print(f"\nTrigger path on this machine (broker {BOOTSTRAP}, SQLite inbox, Prefect test server)\n")
    print(f"{'measure':<58}{'value':>14}  target")
    print(
        f"{'produce → Run row, p50 / p99 (ms, ' + str(len(to_run)) + ' events)':<58}"
        f"{percentile(to_run, 50):>6.1f} /{percentile(to_run, 99):>6.1f}"
    )
    p99 = percentile(to_flow, 99)
    print(
        f"{'produce → Prefect flow run, p50 / p99 (ms)':<58}{percentile(to_flow, 50):>6.1f} /{p99:>6.1f}"
        f"  p99 <= 500 ms: {'met' if p99 <= 500 else 'NOT met'}"
    )
    if isinstance(peer, str):
        print(f"{'Prefect emit_event → automation → flow run':<58}{'—':>14}  {peer}")
    else:
        ratio = statistics.median(peer) / statistics.median(to_flow)
        print(
            f"{'Prefect emit_event → automation → flow run, p50 / p99 (ms)':<58}"
            f"{percentile(peer, 50):>6.1f} /{percentile(peer, 99):>6.1f}  ({len(peer)} events)"
        )
        print(f"{'  ours faster by (p50 ratio)':<58}{ratio:>13.1f}x  >= 5x: {'met' if ratio >= 5 else 'NOT met'}")
    print(f"{'bare kafka-python consume loop (events/s)':<58}{bare:>14.0f}")
    print(
        f"{'consumer → inbox, committed (events/s)':<58}{ours:>14.0f}  "
        f"ratio {ours / bare:.2f} (>= 0.50: {'met' if ours / bare >= 0.5 else 'NOT met'})"
    )
    print(
        f"{'consumer RSS at 10k / ' + str(args.rss_events // 1000) + 'k events (MB)':<58}"
        f"{marks[10_000]:>6.1f} /{marks[args.rss_events]:>6.1f}  growth {growth:+.1%} "
        f"(< 10 %: {'met' if growth < 0.10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
