"""Webhook deliveries: the loop service that POSTs decision events to the pipelines' webhooks.

The relay (flows/relay.py) queues one pending delivery per event and webhook; each pass here sends
the pending ones, a few at a time, outside any decision's transaction, so a slow or dead endpoint
delays only its own deliveries. A delivery is the event in the CloudEvents HTTP binding's structured
mode (`Content-Type: application/cloudevents+json`, the body `DecisionEvent.body()`), with

    Retrainer-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

signed afresh on every try with the secret from the webhook's `secret_env` environment variable
(domain/decisions.py `signature_matches` is what a receiver runs). A 2xx answer delivers it; a
5xx, 408, 429, timeout or refused connection is tried again after an exponential back-off with full
jitter, up to `attempts` tries; any other answer, or a missing secret, fails it at once. A delivery
that ends undelivered is recorded `failed` with its last error (shown by the API and dashboard).
A process that dies mid-delivery leaves it pending: it is sent again (receivers dedupe by event id).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from domain.decisions import CONTENT_TYPE, SIGNATURE_HEADER, DeliveryStatus, WebhookDelivery, signature
from storage import repositories as repo
from storage.db import transaction

log = logging.getLogger("retrainer.flows.webhooks")

_RETRIED_STATUSES = frozenset({408, 429})


class _Failed(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _TryAgain(_Failed):
    """One try failed in a way a later try may not (a 5xx, a timeout, a refused connection)."""


class _GiveUp(_Failed):
    """A try failed in a way no later try would fix (a 4xx, no secret)."""


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    attempts: int = 5
    timeout_s: float = 5.0
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    concurrency: int = 4


@dataclass(frozen=True, slots=True)
class _Result:
    delivered: bool
    attempts: int
    response_status: int | None
    error: str | None


class WebhookDispatcher:
    """`run_once()`: sends every pending delivery (retrying each by the policy), records each end."""

    name = "webhook-deliveries"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: DeliveryPolicy | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.sessions, self.policy = sessions, policy or DeliveryPolicy()
        self.environ = os.environ if environ is None else environ

    def run_once(self) -> list[WebhookDelivery]:
        with transaction(self.sessions) as session:
            pending = repo.webhook_deliveries(session, DeliveryStatus.PENDING)
        if not pending:
            return []
        with ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="webhook") as pool:
            results = list(pool.map(self.deliver, pending))
        finished = []
        for delivery, result in zip(pending, results, strict=True):
            with transaction(self.sessions) as session:
                finished.append(
                    repo.finish_delivery(
                        session,
                        delivery.id,
                        delivered=result.delivered,
                        attempts=result.attempts,
                        response_status=result.response_status,
                        error=result.error,
                    )
                )
            if not result.delivered:
                log.warning("webhook %s: event %s not delivered: %s", delivery.url, delivery.event.id, result.error)
        return finished

    def deliver(self, delivery: WebhookDelivery) -> _Result:
        """Sends one delivery with its retries; never raises."""
        secret = self.environ.get(delivery.secret_env)
        if not secret:
            return _Result(
                False, 0, None, f"environment variable {delivery.secret_env} (the webhook's secret) is not set"
            )
        body = delivery.event.body()
        tries = 0
        retrying = Retrying(
            stop=stop_after_attempt(self.policy.attempts),
            wait=wait_random_exponential(multiplier=self.policy.backoff_s, max=self.policy.max_backoff_s),
            retry=retry_if_exception_type(_TryAgain),
            reraise=True,
        )
        try:
            with httpx.Client(timeout=self.policy.timeout_s, follow_redirects=False) as client:
                for attempt in retrying:
                    with attempt:
                        tries += 1
                        status = _post(client, delivery.url, body, secret)
        except _Failed as failure:
            return _Result(False, tries, failure.status, str(failure))
        return _Result(True, tries, status, None)


def _post(client: httpx.Client, url: str, body: bytes, secret: str) -> int:
    headers = {"Content-Type": CONTENT_TYPE, SIGNATURE_HEADER: signature(secret, body, int(time.time()))}
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.TransportError as e:  # refused, reset, timed out, a name that resolves to nothing
        raise _TryAgain(f"POST {url}: {type(e).__name__}: {e}") from e
    if 200 <= response.status_code < 300:
        return response.status_code
    failure = f"POST {url} answered {response.status_code}"
    if response.status_code >= 500 or response.status_code in _RETRIED_STATUSES:
        raise _TryAgain(failure, response.status_code)
    raise _GiveUp(failure, response.status_code)
