"""The API's one error body.

Every refusal, whether raised by a route, by the domain below it or by the API's own middleware
(auth, scope, body size, rate limit), leaves as `{"error": {"code": ..., "message": ...}}` with the
status from the one table the model server uses too (`web/errors.py`). The refusals of the HTTP
boundary (`UnauthorizedError`, `RateLimitedError`, …) are domain errors, re-exported here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from domain.errors import (
    ForbiddenError,
    IdempotencyKeyReusedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RetrainerError,
    UnauthorizedError,
)
from web.errors import (
    ERROR_CODE_TO_HTTP_STATUS,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    UNHEALTHY,
    status_for,
)

__all__ = [
    "ERROR_CODE_TO_HTTP_STATUS",
    "UNHEALTHY",
    "ForbiddenError",
    "IdempotencyKeyReusedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "UnauthorizedError",
    "error_body",
    "error_response",
    "install_error_handlers",
    "status_for",
]

log = logging.getLogger("retrainer.api")

DEFAULT_RETRY_AFTER_SECONDS = 5
"""Retry-After for retryable errors (a backing service did not answer) that carry no better hint."""


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
        return JSONResponse(error_body(code, message), status_code=405, headers={"Allow": _allowed(request)})
    elif exc.status_code == 400:
        # FastAPI's one 400: a body it cannot decode (not UTF-8). Malformed JSON is already a 422
        # invalid_request, and so is this: the status the schema documents for a bad body.
        status = ERROR_CODE_TO_HTTP_STATUS[INVALID_REQUEST]
        message = f"request body cannot be read ({exc.detail}); send UTF-8 JSON (see /openapi.json for the shape)"
        return JSONResponse(error_body(INVALID_REQUEST, message), status_code=status)
    else:
        code, message = f"http_{exc.status_code}", str(exc.detail)
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


def _allowed(request: Request) -> str:
    """Every method the routes of this path answer: Starlette's 405 names only the first route's, and a
    path can have several (GET and POST /api/v1/apikeys)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in the API", exc_info=exc)
    message = "unexpected error; the service log has the details"
    return JSONResponse(error_body(INTERNAL_ERROR, message), status_code=ERROR_CODE_TO_HTTP_STATUS[INTERNAL_ERROR])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RetrainerError, _retrainer_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
