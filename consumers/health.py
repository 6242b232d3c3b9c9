"""Is the Kafka cluster reachable, and does it have our topics?"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from kafka import KafkaAdminClient
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from domain.errors import ConfigurationError, TransientInfraError

SETTING = "RETRAINER_KAFKA_BOOTSTRAP_SERVERS"


@contextmanager
def _quiet_client_logs() -> Iterator[None]:
    """kafka-python logs every failed connection attempt; the probe reports one line instead."""
    logger = logging.getLogger("kafka")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def check_kafka(bootstrap_servers: str, topics: list[str], timeout_seconds: float = 5.0) -> dict[str, int]:
    """Returns {topic: partition count}; raises one-line errors naming the setting and address."""
    with _quiet_client_logs():
        return _describe(bootstrap_servers, topics, int(timeout_seconds * 1000))


def _describe(bootstrap_servers: str, topics: list[str], timeout_ms: int) -> dict[str, int]:
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers.split(","),
            client_id="retrainer-health",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    except (KafkaConnectionError, KafkaTimeoutError) as e:
        raise TransientInfraError(
            f"{SETTING}={bootstrap_servers}: no Kafka broker answers there (start one with `make services`)"
        ) from e
    except (KafkaError, OSError, ValueError) as e:
        raise TransientInfraError(f"{SETTING}={bootstrap_servers}: cannot talk to Kafka ({e})") from e
    try:
        described = admin.describe_topics(topics)
    except KafkaError as e:
        raise TransientInfraError(f"{SETTING}={bootstrap_servers}: describing topics failed ({e})") from e
    finally:
        admin.close()
    partitions: dict[str, int] = {}
    for topic in described:
        if topic.get("error_code", 0) != 0:
            raise ConfigurationError(
                f"{SETTING}={bootstrap_servers}: topic {topic['name']!r} does not exist "
                "(automatic creation is off; `make services` creates the contract's topics)"
            )
        partitions[topic["name"]] = len(topic["partitions"])
    return partitions
