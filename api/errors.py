"""The API's one mapping from error `code` to HTTP status, and the one error body.

Every refusal, whether raised by a route, by the domain below it or by the API's own middleware
(auth, body size, rate limit), leaves as `{"error": {"code": ..., "message": ...}}` with the
status from `ERROR_CODE_TO_HTTP_STATUS`. A subclass without its own entry inherits its parent's
status (`status_for` walks the MRO), so a new domain error is never an accidental 500.

The errors defined here exist only at the HTTP boundary; they subclass the domain hierarchy so
that code and retryability stay in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.errors import (
    ArtifactIntegrityError,
    ConfigurationError,
    ConflictError,
    InfrastructureError,
    InvalidInputError,
    NotFoundError,
    RetrainerError,
    TrainingError,
    TransientInfraError,
)

log = logging.getLogger("retrainer.api")

DEFAULT_RETRY_AFTER_SECONDS = 5
"""Retry-After for retryable errors (a backing service did not answer) that carry no better hint."""


class UnauthorizedError(RetrainerError):
    """The request carries no X-API-Key header, or a key that is unknown or revoked."""

    code = "unauthorized"


class PayloadTooLargeError(InvalidInputError):
    """The request body is larger than the API accepts."""

    code = "payload_too_large"


class RateLimitedError(RetrainerError):
    """The API key has used up its requests for now; `retry_after_seconds` says when to come back."""

    code = "rate_limited"
    retryable = True

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class IdempotencyKeyReusedError(ConflictError):
    """An Idempotency-Key was sent again with a different request body (CONTRACT section 3: 422).

    It is a ConflictError like any other state conflict, but the contract gives it 422 rather
    than 409, so it has its own code; the trigger route is the one place that raises it.
    """

    code = "idempotency_key_reused"


# Codes that have no exception class: FastAPI's own request validation and routing refusals.
INVALID_REQUEST = "invalid_request"
METHOD_NOT_ALLOWED = "method_not_allowed"
INTERNAL_ERROR = "internal_error"
UNHEALTHY = "unhealthy"  # GET /healthz: a dependency does not answer

ERROR_CODE_TO_HTTP_STATUS: Mapping[str, int] = {
    RetrainerError.code: 500,
    ConfigurationError.code: 500,
    InvalidInputError.code: 400,
    PayloadTooLargeError.code: 413,
    INVALID_REQUEST: 422,
    UnauthorizedError.code: 401,
    NotFoundError.code: 404,
    METHOD_NOT_ALLOWED: 405,
    ConflictError.code: 409,
    IdempotencyKeyReusedError.code: 422,
    RateLimitedError.code: 429,
    ArtifactIntegrityError.code: 500,
    TrainingError.code: 500,
    INTERNAL_ERROR: 500,
    InfrastructureError.code: 502,
    TransientInfraError.code: 503,
    UNHEALTHY: 503,
}


def status_for(error: RetrainerError) -> int:
    """The HTTP status of an error: its own code's, else the nearest ancestor's that has one."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in ERROR_CODE_TO_HTTP_STATUS:
            return ERROR_CODE_TO_HTTP_STATUS[code]
    return 500


def retry_after(error: RetrainerError) -> int | None:
    """Seconds a client should wait before retrying, or None when retrying the same call cannot help."""
    if isinstance(error, RateLimitedError):
        return max(1, error.retry_after_seconds)
    return DEFAULT_RETRY_AFTER_SECONDS if error.retryable else None


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(error: RetrainerError) -> JSONResponse:
    """The response for any RetrainerError; middleware and exception handlers both use it."""
    status = status_for(error)
    headers: dict[str, str] = {}
    wait = retry_after(error)
    if wait is not None:
        headers["Retry-After"] = str(wait)
    if isinstance(error, UnauthorizedError):
        headers["WWW-Authenticate"] = 'ApiKey header="X-API-Key"'
    if status >= 500:
        log.warning("request failed: %s: %s", error.code, error.message)
    return JSONResponse(error_body(error.code, error.message), status_code=status, headers=headers)


async def _retrainer_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetrainerError)
    return error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    details = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
        details.append(
            {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg"), "type": err.get("type")}
        )
    message = "request is invalid: " + "; ".join(problems) + " (see /openapi.json for the expected shape)"
    return JSONResponse(
        error_body(INVALID_REQUEST, message, details=details),
        status_code=ERROR_CODE_TO_HTTP_STATUS[INVALID_REQUEST],
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        code, message = NotFoundError.code, f"no route {request.url.path!r}; see /openapi.json for the routes"
    elif exc.status_code == 405:
        code, message = METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path!r}"
    else:
        code, message = f"http_{exc.status_code}", str(exc.detail)
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in the API", exc_info=exc)
    message = "unexpected error; the service log has the details"
    return JSONResponse(error_body(INTERNAL_ERROR, message), status_code=ERROR_CODE_TO_HTTP_STATUS[INTERNAL_ERROR])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RetrainerError, _retrainer_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
