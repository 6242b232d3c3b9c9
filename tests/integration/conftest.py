"""Fixtures the whole-service stories share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from sqlalchemy.engine import make_url

from tests.consumers.conftest import delete_topics


@pytest.fixture
def e2e_database(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own (created empty, dropped after), for `retrainer serve`."""
    name = f"retrainer_e2e_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield url.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def decisions_topic(kafka_bootstrap: str) -> Iterator[str]:
    """A decisions topic of the test's own (RETRAINER_DECISIONS_TOPIC), deleted after the test."""
    topic = f"retrainer.decisions-story-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1)])
    admin.close()
    yield topic
    delete_topics(kafka_bootstrap, [topic])
