"""The real local broker: the contract's topics exist, auto-creation is off, and an outside
producer (kcat) reaches a kafka-python consumer with key and headers intact."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError

from consumers.health import check_kafka
from domain.errors import ConfigurationError

pytestmark = pytest.mark.integration

TOPIC = "retrainer.data-changes"
DLQ = "retrainer.data-changes.dlq"


def test_contract_topics_exist_with_their_partitions(kafka_bootstrap: str) -> None:
    assert check_kafka(kafka_bootstrap, [TOPIC, DLQ]) == {TOPIC: 3, DLQ: 1}


def test_automatic_topic_creation_is_off(kafka_bootstrap: str) -> None:
    ghost = f"retrainer.ghost.{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_block_ms=3000)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send(ghost, b"x").get(timeout=5)
    finally:
        producer.close(timeout=5)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert ghost not in admin.list_topics()
    finally:
        admin.close()
    with pytest.raises(ConfigurationError, match="does not exist"):
        check_kafka(kafka_bootstrap, [ghost])


def _end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(TOPIC, p) for p in range(3)]
        return dict(consumer.end_offsets(partitions))
    finally:
        consumer.close()


def test_kcat_structured_and_binary_events_reach_a_python_consumer(kafka_bootstrap: str) -> None:
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.fail("kcat is not installed (infra/local/test.sh installs it: apt-get install kcat)")
    start = _end_offsets(kafka_bootstrap)
    structured_id, binary_id = f"s-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    structured = {
        "specversion": "1.0",
        "id": structured_id,
        "source": "//warehouse/etl",
        "type": "retrainer.data.changed",
        "subject": "digits",
        "datacontenttype": "application/json",
        "data": {"dataset": "digits", "version": "v3", "uri": "s3://datasets/digits/v3.csv"},
    }
    binary_headers = [
        "ce_specversion=1.0",
        f"ce_id={binary_id}",
        "ce_source=//warehouse/etl",
        "ce_type=retrainer.data.changed",
        "ce_subject=digits",
        "content-type=application/json",
    ]
    subprocess.run(
        [
            kcat,
            "-P",
            "-b",
            kafka_bootstrap,
            "-t",
            TOPIC,
            "-k",
            "digits",
            "-H",
            "content-type=application/cloudevents+json",
        ],
        input=json.dumps(structured).encode(),
        check=True,
        timeout=30,
    )
    header_args = [arg for header in binary_headers for arg in ("-H", header)]
    subprocess.run(
        [kcat, "-P", "-b", kafka_bootstrap, "-t", TOPIC, "-k", "digits", *header_args],
        input=json.dumps({"dataset": "digits", "uri": "s3://datasets/digits/v4.csv"}).encode(),
        check=True,
        timeout=30,
    )

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, consumer_timeout_ms=10000)
    try:
        consumer.assign(list(start))
        for partition, offset in start.items():
            consumer.seek(partition, offset)
        received = []
        for record in consumer:
            received.append(record)
            if len(received) == 2:
                break
    finally:
        consumer.close()

    assert len(received) == 2, "kcat's records did not arrive"
    assert {r.key for r in received} == {b"digits"}
    assert len({r.partition for r in received}) == 1  # same key, same partition: ordered per dataset
    first_headers, second_headers = (dict(r.headers) for r in received)
    assert first_headers["content-type"] == b"application/cloudevents+json"
    assert json.loads(received[0].value)["id"] == structured_id
    assert second_headers["ce_id"] == binary_id.encode()
    assert json.loads(received[1].value)["uri"].endswith("v4.csv")
