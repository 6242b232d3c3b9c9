"""A small synchronous client of the HTTP API, for `retrainer trigger PIPELINE [--wait]` and scripts.

    with RetrainerClient("http://127.0.0.1:8080", api_key) as client:
        accepted = client.trigger("digits-classifier", "new labels", idempotency_key="ticket-42")
        record = client.wait(accepted["run_id"], timeout_s=600)

An error answer becomes an `ApiError` (a RetrainerError) carrying the server's code, status and
message; a server that does not answer becomes a TransientInfraError naming the address. Reads
are retried a few times on such passing errors (`flows/retry.py`, the one set of policies).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from domain import entities as e
from domain.errors import RetrainerError, TransientInfraError
from flows.retry import poll_until, transient

IN_PROGRESS = frozenset({e.RunStatus.QUEUED.value, e.RunStatus.RUNNING.value, e.RunStatus.CANARY.value})


class ApiError(RetrainerError):
    """The API refused a request; `code` and `status` are the server's."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after
        self.retryable = status in (429, 503)


def _worth_retrying(error: BaseException) -> bool:
    """A server that does not answer, or answers 429/503: the same read may succeed in a moment."""
    return isinstance(error, TransientInfraError) or (isinstance(error, ApiError) and error.retryable)


class RetrainerClient:
    """Speaks to one API server with one key. Thread-safe as httpx.Client is; close it when done."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if "://" not in base_url:
            base_url = f"http://{base_url}"  # RETRAINER_API_ADDRESS is HOST:PORT
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers={"X-API-Key": api_key}, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> RetrainerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if method != "GET":  # a POST is retried by its caller, with an Idempotency-Key
            return self._send(method, path, **kwargs)
        for attempt in transient(_worth_retrying):
            with attempt:
                return self._send(method, path, **kwargs)
        raise AssertionError("unreachable: the retry policy re-raises the last error")

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise TransientInfraError(
                f"the Retrainer API at {self.base_url} does not answer ({type(err).__name__}: {err}); "
                "is `retrainer serve` running, and is RETRAINER_API_ADDRESS right?"
            ) from err
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict):
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code, message = str(error.get("code", "http_error")), str(error.get("message", ""))
        else:
            code, message = f"http_{response.status_code}", response.text[:200] or response.reason_phrase
        raise ApiError(
            f"{method} {path}: {response.status_code} {code}: {message}",
            code=code,
            status=response.status_code,
            retry_after=response.headers.get("Retry-After"),
        )

    def trigger(self, pipeline: str, reason: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Queues a manual run: {"run_id", "status", "created"}. The same idempotency key and
        arguments again return the same run, so a retry after a timeout is safe."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request(
            "POST", "/api/v1/trigger/train", json={"pipeline": pipeline, "reason": reason}, headers=headers
        )

    def run(self, run_id: str) -> dict[str, Any]:
        """One run with its decision record."""
        return self._request("GET", f"/api/v1/runs/{run_id}")

    def wait(self, run_id: str, *, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict[str, Any]:
        """Polls the run until it leaves queued/running/canary; returns its record. A timeout
        raises TransientInfraError (the run carries on; wait again or look it up later)."""
        last: dict[str, Any] = {}

        def final_record() -> dict[str, Any] | None:
            last.update(self.run(run_id))
            return None if last.get("status") in IN_PROGRESS else dict(last)

        def timed_out() -> TransientInfraError:
            return TransientInfraError(
                f"run {run_id} is still {last.get('status')} after {timeout_s:.0f} s; "
                f"follow it with `retrainer runs show {run_id}`"
            )

        return poll_until(final_record, timeout_s=timeout_s, poll_s=poll_s, on_timeout=timed_out)
