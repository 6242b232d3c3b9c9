"""The dead-letter page of the dashboard (/ui/dead-letters) reading the real broker: the records
the consumer dead-lettered, with their `retrainer-error` reason, bounded to the last N per
partition; a broker that does not answer, a missing topic and no Kafka at all are said on the page."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from consumers.dead_letters import dead_letter_reader, read_dead_letters
from domain.settings import Settings
from storage.db import create_db_engine, make_sessions
from storage.orm import Base
from tests.consumers.conftest import Stage
from tests.consumers.test_consumer import drain
from tests.web.test_dashboard import new_key, signed_in

CE_JSON = [("content-type", b"application/cloudevents+json")]


def dlq_page(sessions: sessionmaker[Session], settings: Settings, **reader: float) -> str:
    app = create_app(
        sessions=sessions, settings=settings, submit=None, health_probes={},
        dead_letters=dead_letter_reader(settings, **reader) if reader else None,  # type: ignore[arg-type]
    )  # fmt: skip
    key = new_key(sessions, f"ops-{uuid.uuid4().hex[:8]}")  # the test database is shared
    answer = signed_in(app, key).get("/ui/dead-letters")
    assert answer.status_code == 200, answer.text
    return answer.text


@pytest.mark.integration
def test_the_page_shows_the_last_records_of_the_topic_with_their_reason(stage: Stage) -> None:
    wrong = json.dumps({"specversion": "1.0", "id": "w", "source": "s", "type": "wrong"}).encode()
    bad = [(b"not json %d" % i, CE_JSON) for i in range(25)] + [(wrong, CE_JSON)]
    stage.produce([*bad, stage.valid("ok")])
    drain(stage, 1)
    assert len(stage.dlq(26)) == 26  # the consumer dead-lettered them all (one partition)

    started = time.monotonic()
    shown = read_dead_letters(stage.settings, per_partition=10, timeout_s=5)
    assert time.monotonic() - started < 5
    assert shown.problem is None and shown.topic == f"{stage.settings.kafka_topic}.dlq"
    assert sorted(r.offset for r in shown.records) == list(range(16, 26))  # only the last 10
    newest = max(shown.records, key=lambda r: r.offset)
    assert newest.error.startswith("wrong_type:") and newest.value_preview.startswith("{")
    assert {r.error.split(":")[0] for r in shown.records} == {"not_json", "wrong_type"}
    assert all(r.original and r.original.startswith(f"{stage.settings.kafka_topic}[") for r in shown.records)

    page = dlq_page(stage.sessions, stage.settings, per_partition=10, timeout_s=5)
    assert len(re.findall(r'<tr class="dead-letter">', page)) == 10
    assert "not_json:" in page and "wrong_type:" in page and "dlq-problem" not in page


@pytest.mark.integration
def test_a_topic_that_does_not_exist_yet_is_said_on_the_page(stage: Stage) -> None:
    missing = stage.settings.model_copy(update={"kafka_dlq_topic": f"{stage.settings.kafka_topic}.nowhere"})
    page = dlq_page(stage.sessions, missing, timeout_s=5)
    assert "does not exist yet" in page and "dlq-problem" in page


@pytest.fixture
def sessions(tmp_path_factory: pytest.TempPathFactory) -> sessionmaker[Session]:
    engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('dlq') / 'retrainer.db'}")
    Base.metadata.create_all(engine)
    return make_sessions(engine)


def test_a_broker_that_does_not_answer_is_said_within_the_timeout(sessions: sessionmaker[Session]) -> None:
    nowhere = Settings(kafka_bootstrap_servers="127.0.0.1:1")  # nothing listens on port 1
    started = time.monotonic()
    page = dlq_page(sessions, nowhere, timeout_s=1)
    assert time.monotonic() - started < 10
    assert "did not answer within 1 s" in page and "RETRAINER_KAFKA_BOOTSTRAP_SERVERS" in page


def test_without_kafka_the_page_says_it_is_not_configured(sessions: sessionmaker[Session]) -> None:
    page = dlq_page(sessions, Settings())
    assert "Kafka is not configured for this API process" in page


def test_the_reader_refuses_an_unbounded_read() -> None:
    with pytest.raises(ValueError, match="per_partition must be >= 1"):
        dead_letter_reader(Settings(), per_partition=0)
