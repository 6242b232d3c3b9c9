"""The publisher against the real broker: an event published in either binding mode reaches the inbox
through the consumer, keyed by its dataset, stored as it was built."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from consumers.consumer import DataChangeConsumer
from consumers.publisher import data_changed_event, publish_data_changed
from storage.db import transaction
from storage.orm import SqlEvent
from tests.consumers.conftest import Stage

pytestmark = pytest.mark.integration


def test_both_modes_reach_the_inbox_with_the_dataset_as_the_key(stage: Stage) -> None:
    servers, topic = stage.settings.kafka_bootstrap_servers, stage.settings.kafka_topic
    ids = {}
    for mode in ("structured", "binary"):
        built = data_changed_event(stage.dataset, "s3://d/v1.csv", version=mode, event_id=f"{stage.dataset}-{mode}")
        ids[mode] = publish_data_changed(servers, topic, built, mode=mode)
    assert ids == {"structured": f"{stage.dataset}-structured", "binary": f"{stage.dataset}-binary"}

    consumer = DataChangeConsumer(stage.settings, stage.sessions)
    deadline = time.monotonic() + 60
    try:
        while stage.inbox_count() < 2:
            assert time.monotonic() < deadline, f"only {stage.inbox_count()} of 2 events arrived"
            consumer.run_once()
    finally:
        consumer.close()
    with transaction(stage.sessions) as session:
        rows = session.scalars(select(SqlEvent).where(SqlEvent.dataset == stage.dataset)).all()
        stored = {row.event_id: (row.payload, row.partition) for row in rows}
    assert set(stored) == set(ids.values())
    for mode, event_id in ids.items():
        payload, _ = stored[event_id]
        assert payload["data"] == {"dataset": stage.dataset, "uri": "s3://d/v1.csv", "version": mode}
        assert payload["specversion"] == "1.0" and payload["type"] == "retrainer.data.changed"
        assert payload["time"].endswith("Z") and payload["subject"] == stage.dataset
    # The same key (the dataset) puts both in one partition, so their order is kept.
    assert len({partition for _, partition in stored.values()}) == 1
