"""The loop runner: carries on after errors with a back-off, stops on its event, `once` fails loudly.
A fake service is fine here: the runner is pure control flow."""

from __future__ import annotations

import threading
import time

import pytest

from domain.errors import ConfigurationError, TransientInfraError
from flows.loop import LoopHealth, LoopPassFailed, PassIncomplete, run_loop


class Flaky:
    name = "flaky"

    def __init__(self, failures: int, stop: threading.Event, passes: int) -> None:
        self.failures, self.stop, self.passes = failures, stop, passes
        self.calls = 0

    def run_once(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"outage {self.calls}")
        if self.calls - self.failures >= self.passes:
            self.stop.set()


def test_a_failing_pass_is_logged_retried_and_the_loop_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    service = Flaky(failures=2, stop=stop, passes=2)
    health = LoopHealth(service.name)
    started = time.monotonic()
    run_loop(service, stop, interval_s=0.01, health=health)
    assert service.calls == 4
    assert time.monotonic() - started >= 1.0  # backed off 0.5 s, then 1 s… (the second wait is cut by nothing)
    assert "flaky pass failed, retrying in 0.5 s: ConnectionError: outage 1" in caplog.text
    health.probe()  # the last pass succeeded: healthy again


def test_health_fails_while_the_last_pass_failed_and_when_passes_stop() -> None:
    health = LoopHealth("trigger-service", stale_after_s=0.05)
    health.failed(ConnectionError("Prefect API unavailable"))
    with pytest.raises(LoopPassFailed) as failing:
        health.probe()
    assert failing.value.code == "infrastructure_unavailable"
    assert "trigger-service: last pass failed (ConnectionError: Prefect API unavailable)" in failing.value.message
    health.passed()
    health.probe()
    time.sleep(0.1)
    with pytest.raises(TransientInfraError, match="trigger-service: no pass finished for"):
        health.probe()


def test_the_stop_event_ends_a_back_off_at_once() -> None:
    stop = threading.Event()
    service = Flaky(failures=1000, stop=stop, passes=1)
    loop = threading.Thread(target=run_loop, args=(service, stop), daemon=True)
    loop.start()
    time.sleep(0.2)
    stop.set()
    loop.join(2)
    assert not loop.is_alive() and service.calls == 1


def test_once_runs_one_pass_and_lets_its_error_through() -> None:
    stop = threading.Event()
    with pytest.raises(ConnectionError, match="outage 1"):
        run_loop(Flaky(failures=1, stop=stop, passes=1), stop, once=True)


def test_health_keeps_the_code_of_the_error_that_failed_the_pass() -> None:
    health = LoopHealth("kafka-consumer")
    health.failed(ConfigurationError("topic 'retrainer.data-changes' does not exist"))
    with pytest.raises(LoopPassFailed) as failing:
        health.probe()
    assert failing.value.code == "configuration_error"
    assert "kafka-consumer: last pass failed (ConfigurationError: topic" in failing.value.message
    # a partly failed pass reports its first failure's code
    health.failed(PassIncomplete("datasets", [("dataset a", ConfigurationError("no deployment")), ("b", OSError())]))
    with pytest.raises(LoopPassFailed) as partial:
        health.probe()
    assert partial.value.code == "configuration_error" and "2 datasets failed" in partial.value.message


def test_a_loop_is_stale_after_three_intervals_and_never_sooner_than_two_minutes() -> None:
    assert LoopHealth.for_interval("triggers", 150).stale_after_s == 450
    assert LoopHealth.for_interval("triggers", 1).stale_after_s == 120
    slow = LoopHealth.for_interval("triggers", 150)
    slow.passed()
    slow.last_ok = time.monotonic() - 200  # past the old fixed 120 s, within three intervals
    slow.probe()
