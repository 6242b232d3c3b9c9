"""The runner of Retrainer's loop services (the Kafka consumer, the trigger service): a service is
anything with a `name` and a `run_once()` pass; `run_loop` calls it until stopped.

A pass that raises is logged and retried with the back-off of `flows.retry.until_stopped`
(0.5 s doubling to 10 s): a database, broker or Prefect outage never ends the process, and the
work it could not do stays where it was (queued runs, uncommitted offsets) for the next pass.
SIGTERM/SIGINT (`stop_on_signals`) or the stop event end the loop after the current pass;
`once=True` runs a single pass and lets its error through (`--once` in a script must fail loudly).

`LoopHealth` keeps what /healthz reports: a service whose last pass failed, or that has not
finished a pass for `stale_after_s` (`LoopHealth.for_interval`: three intervals, at least two
minutes), is failing, with the error that made it so and that error's own code.

A pass that works on many items (datasets, runs, rollouts) does every item it can, logs each
failure, and ends with `PassIncomplete` naming the ones that failed, so one bad item never blocks
the others and /healthz still shows it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge

from domain.errors import RetrainerError, TransientInfraError
from flows.retry import until_stopped

log = logging.getLogger("retrainer.flows.loop")

LOOP_PASSES = Counter("retrainer_loop_passes_total", "Passes of a loop service, by outcome", ["service", "outcome"])
LOOP_LAST_SUCCESS = Gauge(
    "retrainer_loop_last_success_timestamp_seconds", "Unix time of a loop service's last good pass", ["service"]
)


STALE_AFTER_MIN_S = 120.0
STALE_AFTER_INTERVALS = 3


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def code_of(error: BaseException) -> str:
    """The error's own code (a RetrainerError's, or a PassIncomplete's first failure's); an error
    Retrainer did not translate counts as a passing outage."""
    return error.code if isinstance(error, RetrainerError) else TransientInfraError.code


class PassIncomplete(RetrainerError, code=TransientInfraError.code, retryable=True):
    """Some items of a loop pass failed (each was logged; the others were done). `failures` holds
    (item, error) pairs; the code is the first failure's, so a configuration error stays one."""

    def __init__(self, what: str, failures: Sequence[tuple[str, BaseException]]) -> None:
        if not failures:
            raise ValueError("PassIncomplete needs at least one failure")
        listed = "; ".join(f"{item}: {describe(error)}" for item, error in failures)
        super().__init__(f"{len(failures)} {what} failed, retried on the next pass ({listed})")
        self.failures = list(failures)
        self.code = code_of(failures[0][1])


class LoopPassFailed(RetrainerError, code=TransientInfraError.code, retryable=True):
    """What /healthz reports for a loop service whose last pass failed, with that failure's code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class LoopService(Protocol):
    @property
    def name(self) -> str: ...

    def run_once(self) -> object:
        """One pass; raises when the pass could not be done (it is retried)."""


@dataclass
class LoopHealth:
    """The state of one loop service, as its runner last saw it."""

    name: str
    stale_after_s: float = STALE_AFTER_MIN_S
    last_ok: float | None = None
    last_error: str | None = None
    last_code: str = TransientInfraError.code
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def for_interval(cls, name: str, interval_s: float) -> LoopHealth:
        """Stale after three intervals, and never sooner than two minutes (a slow pass is not a dead one)."""
        return cls(name, stale_after_s=max(STALE_AFTER_MIN_S, STALE_AFTER_INTERVALS * interval_s))

    def passed(self) -> None:
        self.last_ok, self.last_error = time.monotonic(), None
        LOOP_PASSES.labels(self.name, "ok").inc()
        LOOP_LAST_SUCCESS.labels(self.name).set(time.time())

    def failed(self, error: BaseException) -> None:
        self.last_error, self.last_code = describe(error), code_of(error)
        LOOP_PASSES.labels(self.name, "failed").inc()

    def probe(self) -> None:
        """Raises naming the service when its last pass failed (LoopPassFailed with the failure's
        code) or when no pass finished for `stale_after_s` (TransientInfraError)."""
        if self.last_error is not None:
            raise LoopPassFailed(f"{self.name}: last pass failed ({self.last_error}); retrying", self.last_code)
        since = self.last_ok if self.last_ok is not None else self.started
        if time.monotonic() - since > self.stale_after_s:
            raise TransientInfraError(f"{self.name}: no pass finished for {time.monotonic() - since:.0f} s")


def run_loop(
    service: LoopService,
    stop: threading.Event,
    *,
    interval_s: float = 1.0,
    once: bool = False,
    health: LoopHealth | None = None,
    pause: Callable[[threading.Event, float], object] | None = None,
) -> None:
    """Runs `service.run_once()` every `interval_s` until `stop` is set (see the module docstring).
    `pause(stop, interval_s)` replaces the wait between passes (a service woken by notifications
    returns early); it must return once `stop` is set."""
    health = health or LoopHealth.for_interval(service.name, interval_s)

    def one_pass() -> None:
        if stop.is_set() and not once:  # a back-off cut short by the stop event: no further attempt
            return
        try:
            service.run_once()
        except Exception as error:
            health.failed(error)
            raise
        health.passed()

    if once:
        one_pass()
        return
    log.info("%s: running (a pass every %.1f s)", service.name, interval_s)
    while not stop.is_set():
        for attempt in until_stopped(stop, log, f"{service.name} pass"):
            with attempt:
                one_pass()
        (pause or _pause_until_stopped)(stop, interval_s)
    log.info("%s: stopped", service.name)


def _pause_until_stopped(stop: threading.Event, seconds: float) -> None:
    stop.wait(seconds)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the current pass finishes first). Main thread only."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current pass, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
