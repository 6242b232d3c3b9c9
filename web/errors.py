"""The one mapping from error `code` to HTTP status, for the API and the model server alike.

A subclass without its own entry inherits its parent's status (`status_for` walks the MRO), so a
new domain error is never an accidental 500. Codes of errors defined above this layer (the model
server's `model_not_ready` and `model_failed`) and codes that have no exception class (FastAPI's
own validation refusals, a failing /healthz) are listed by name. The two refusals that only an
HTTP layer raises, a wrong method and an unexpected exception, are classes here, so both servers
answer them from this table like any other error.
"""

from __future__ import annotations

from collections.abc import Mapping

from domain.errors import (
    ArtifactIntegrityError,
    ConfigurationError,
    ConflictError,
    ForbiddenError,
    IdempotencyKeyReusedError,
    InfrastructureError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RetrainerError,
    TrainingError,
    TransientInfraError,
    UnauthorizedError,
)

INVALID_REQUEST = "invalid_request"
METHOD_NOT_ALLOWED = "method_not_allowed"
INTERNAL_ERROR = "internal_error"
UNHEALTHY = "unhealthy"  # GET /healthz: a part of the process or a dependency does not answer
MODEL_NOT_READY = "model_not_ready"  # serving.registry.ModelNotReadyError: no champion loaded yet
MODEL_FAILED = "model_failed"  # serving.app.ModelFailedError: the model raised on valid input


class MethodNotAllowedError(RetrainerError, code=METHOD_NOT_ALLOWED):
    """The path exists but not for this HTTP method; `headers` carries the `Allow` header to send."""

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.headers = {"Allow": ", ".join(allow)}


class InternalServerError(RetrainerError, code=INTERNAL_ERROR):
    """An exception that is no RetrainerError reached the HTTP layer (a bug); the message points at
    the server log, which has the traceback, rather than leaking the exception to the client."""


ERROR_CODE_TO_HTTP_STATUS: Mapping[str, int] = {
    RetrainerError.code: 500,
    ConfigurationError.code: 500,
    InvalidInputError.code: 400,
    PayloadTooLargeError.code: 413,
    INVALID_REQUEST: 422,
    UnauthorizedError.code: 401,
    ForbiddenError.code: 403,
    NotFoundError.code: 404,
    MethodNotAllowedError.code: 405,
    ConflictError.code: 409,
    IdempotencyKeyReusedError.code: 422,
    RateLimitedError.code: 429,
    ArtifactIntegrityError.code: 500,
    TrainingError.code: 500,
    MODEL_FAILED: 500,
    InternalServerError.code: 500,
    InfrastructureError.code: 502,
    TransientInfraError.code: 503,
    MODEL_NOT_READY: 503,
    UNHEALTHY: 503,
}


def status_for(error: RetrainerError) -> int:
    """The HTTP status of an error: its own code's, else the nearest ancestor's that has one."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in ERROR_CODE_TO_HTTP_STATUS:
            return ERROR_CODE_TO_HTTP_STATUS[code]
    return 500
