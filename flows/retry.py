"""Every retry and wait policy of Retrainer, in one place, on tenacity.

- `poll_until`: a start-up or completion condition polled at a fixed pace up to a deadline (the
  Prefect server answering, the runner's deployments registered, a run reaching a final status);
  an exception from the check is not retried, it ends the wait at once (a crashed subprocess).
- `transient`: a call that may meet a passing outage, retried a few times with exponential
  back-off (the API client's reads).
- `until_stopped`: a loop pass retried with exponential back-off until it succeeds or the stop
  event is set (`flows/loop.py`: the consumer, the trigger service).

A layer that both consumers/ and api/ may import, as the policies must be the same for all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    nap,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_fixed,
)

from domain.errors import InfrastructureError

T = TypeVar("T")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
TRANSIENT_ATTEMPTS = 4


def _backoff() -> wait_exponential:
    # 0.5, 1, 2, 4, 8, 10, 10 … seconds
    return wait_exponential(multiplier=BACKOFF_FIRST_S, min=BACKOFF_FIRST_S, max=BACKOFF_MAX_S)


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    on_timeout: Callable[[], BaseException] | None = None,
    what: str = "the condition",
) -> T:
    """Calls `check` every `poll_s` until it returns something other than None (or False), and
    returns that. After `timeout_s` raises `on_timeout()`, by default an InfrastructureError
    saying that `what` did not happen in time."""

    def give_up(_state: RetryCallState) -> T:
        raise on_timeout() if on_timeout else InfrastructureError(f"{what} did not happen within {timeout_s:.0f} s")

    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(poll_s),
        retry=retry_if_result(lambda result: result is None or result is False),
        retry_error_callback=give_up,
    )
    result = retrying(check)
    assert result is not None  # give_up raises rather than returning
    return result


def transient(
    is_transient: Callable[[BaseException], bool],
    *,
    attempts: int = TRANSIENT_ATTEMPTS,
    sleep: Callable[[float], None] = nap.sleep,
) -> Retrying:
    """Retries a call whose error `is_transient` up to `attempts` times in all, backing off
    exponentially; the last error is re-raised as it was."""
    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=_backoff(),
        retry=retry_if_exception(is_transient),
        reraise=True,
        sleep=sleep,
    )


def until_stopped(
    stop: threading.Event,
    log: logging.Logger,
    what: str,
    errors: tuple[type[BaseException], ...] = (Exception,),
) -> Retrying:
    """Retries a pass that raised one of `errors` (logged as a warning with the wait) with
    exponential back-off, until it succeeds or `stop` is set; the wait ends early on `stop`.
    Iterating yields nothing once `stop` is set (the retry loop returns None)."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed, retrying in %.1f s: %s: %s", what, wait, type(error).__name__, error)

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return Retrying(
        stop=lambda _state: stop.is_set(),
        wait=_backoff(),
        retry=retry_if_exception_type(errors),
        sleep=sleep,
        before_sleep=before_sleep,
        retry_error_callback=lambda _state: None,
    )
