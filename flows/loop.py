"""The runner of Retrainer's loop services (the Kafka consumer, the trigger service): a service is
anything with a `name` and a `run_once()` pass; `run_loop` calls it until stopped.

A pass that raises is logged and retried with the back-off of `flows.retry.until_stopped`
(0.5 s doubling to 10 s): a database, broker or Prefect outage never ends the process, and the
work it could not do stays where it was (queued runs, uncommitted offsets) for the next pass.
SIGTERM/SIGINT (`stop_on_signals`) or the stop event end the loop after the current pass;
`once=True` runs a single pass and lets its error through (`--once` in a script must fail loudly).

`LoopHealth` keeps what /healthz reports: a service whose last pass failed, or that has not
finished a pass for `stale_after_s`, is failing, with the error that made it so.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter, Gauge

from domain.errors import TransientInfraError
from flows.retry import until_stopped

log = logging.getLogger("retrainer.flows.loop")

LOOP_PASSES = Counter("retrainer_loop_passes_total", "Passes of a loop service, by outcome", ["service", "outcome"])
LOOP_LAST_SUCCESS = Gauge(
    "retrainer_loop_last_success_timestamp_seconds", "Unix time of a loop service's last good pass", ["service"]
)


class LoopService(Protocol):
    @property
    def name(self) -> str: ...

    def run_once(self) -> object:
        """One pass; raises when the pass could not be done (it is retried)."""


@dataclass
class LoopHealth:
    """The state of one loop service, as its runner last saw it."""

    name: str
    stale_after_s: float = 120.0
    last_ok: float | None = None
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)

    def passed(self) -> None:
        self.last_ok, self.last_error = time.monotonic(), None
        LOOP_PASSES.labels(self.name, "ok").inc()
        LOOP_LAST_SUCCESS.labels(self.name).set(time.time())

    def failed(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        LOOP_PASSES.labels(self.name, "failed").inc()

    def probe(self) -> None:
        """Raises TransientInfraError naming the service when its last pass failed or is too old."""
        if self.last_error is not None:
            raise TransientInfraError(f"{self.name}: last pass failed ({self.last_error}); retrying")
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
) -> None:
    """Runs `service.run_once()` every `interval_s` until `stop` is set (see the module docstring)."""
    health = health or LoopHealth(service.name)

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
        stop.wait(interval_s)
    log.info("%s: stopped", service.name)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the current pass finishes first). Main thread only."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current pass, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
