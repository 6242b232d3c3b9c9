"""`retrainer demo` on embedded defaults in an empty folder: the whole story through the running service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_tells_the_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRAINER_", "PREFECT_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "retrainer"), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the demo exits non-zero unless every act ended as the story says; here is its table and report
    for expected in ("promoted", "rejected", "rolled_back", "canary"):
        assert expected in result.stdout, result.stdout
    report = tmp_path / ".retrainer" / "demo" / "report.html"
    assert f"report: {report}" in result.stdout.replace("\n", "")
    html = report.read_text()
    assert "<svg" in html and "latency_p99_ratio" in html and "http://" not in html


def test_demo_topics_are_created_idempotently(
    tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after `make demo` starts the broker, kafka-python may retry a CreateTopics that did
    succeed and hear "already exists" (a fresh machine's `make demo` once died of it)."""
    from domain.settings import load_settings
    from retrainer import demo as story

    for key, value in story.demo_environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RETRAINER_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    settings = load_settings()
    story.create_topics(settings)
    try:
        story.create_topics(settings)  # both topics exist now: no error, nothing changes
    finally:
        story.delete_topics(settings)
