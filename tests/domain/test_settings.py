from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from domain.errors import ConfigurationError
from domain.settings import Settings, load_settings

CONTRACT_DEFAULTS = {
    "database_url": "sqlite:///./.retrainer/retrainer.db",
    "artifact_root": "file://./.retrainer/artifacts",
    "s3_endpoint_url": None,
    "kafka_bootstrap_servers": "127.0.0.1:9092",
    "pipelines_dir": Path("./pipelines"),
    "api_address": "127.0.0.1:8080",
    "serving_address": "127.0.0.1:8081",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("RETRAINER_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_contracts() -> None:
    settings = load_settings()
    for name, value in CONTRACT_DEFAULTS.items():
        assert getattr(settings, name) == value, name
    assert settings.kafka_topic == "retrainer.data-changes"
    assert settings.kafka_dlq_topic == "retrainer.data-changes.dlq"
    assert settings.kafka_consumer_group == "retrainer"


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_environment_prefix_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRAINER_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/r")
    monkeypatch.setenv("RETRAINER_S3_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("RETRAINER_S3_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("RETRAINER_KAFKA_TOPIC", "other.topic")
    settings = load_settings()
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert isinstance(settings.s3_secret_access_key, SecretStr)
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings.model_dump())
    assert settings.kafka_dlq_topic == "other.topic.dlq"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RETRAINER_DATABASE_URL", "mysql://x/y", "RETRAINER_DATABASE_URL: must start with sqlite:///"),
        ("RETRAINER_ARTIFACT_ROOT", "gs://bucket", "RETRAINER_ARTIFACT_ROOT: must be file://PATH or s3://"),
        ("RETRAINER_ARTIFACT_ROOT", "s3://", "RETRAINER_ARTIFACT_ROOT: s3:// needs a bucket"),
        ("RETRAINER_S3_ENDPOINT_URL", "127.0.0.1:9000", "RETRAINER_S3_ENDPOINT_URL: must be an http://"),
        ("RETRAINER_API_ADDRESS", "8080", "RETRAINER_API_ADDRESS: must be HOST:PORT"),
        ("RETRAINER_SERVING_ADDRESS", "host:99999", "RETRAINER_SERVING_ADDRESS: must be HOST:PORT"),
        ("RETRAINER_LOG_LEVEL", "LOUD", "RETRAINER_LOG_LEVEL:"),
        ("RETRAINER_S3_ACCESS_KEY_ID", "only-half", "must be set together"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert info.value.code == "configuration_error"
    assert expected in str(info.value)


def test_webhooks_for_every_pipeline_are_json_checked_like_the_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().webhooks == []  # by default only the specs' own
    hook = {"url": "https://hooks.example.com/x", "events": ["dev.retrainer.model.promoted"], "secret_env": "HOOK"}
    monkeypatch.setenv("RETRAINER_WEBHOOKS", json.dumps([hook]))
    assert [w.model_dump() for w in load_settings().webhooks] == [hook]
    assert hash(load_settings()) == hash(load_settings())  # still a cache key (retrainer/wiring.py)
    bad = [{**hook, "url": "ftp://hooks.example.com/x"}, {**hook, "events": ["nope"], "secret_env": "1x"}]
    monkeypatch.setenv("RETRAINER_WEBHOOKS", json.dumps(bad))
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert info.value.code == "configuration_error"
    message = str(info.value)
    assert "RETRAINER_WEBHOOKS[0].url: must be an http:// or https:// URL" in message
    assert "RETRAINER_WEBHOOKS[1].events: unknown event types ['nope']" in message
    assert "RETRAINER_WEBHOOKS[1].secret_env: must be an environment variable's name" in message
    monkeypatch.setenv("RETRAINER_WEBHOOKS", "https://hooks.example.com/x")  # not JSON
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert info.value.code == "configuration_error" and "RETRAINER_WEBHOOKS='[{" in str(info.value)
