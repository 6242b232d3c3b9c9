"""One error hierarchy for the whole service.

Every error a user can act on names the resource and the fix. Each class carries a stable
`code` (used by the HTTP layer's single status mapping, `web/errors.py`, and asserted by tests)
and says whether retrying the same operation can help (`retryable`). Both are given in the class
statement (`class NotFoundError(RetrainerError, code="not_found")`), so a class is its name, its
code and a docstring that says when it is raised.
"""

from __future__ import annotations

from typing import Any


class RetrainerError(Exception):
    """Base class: something went wrong that Retrainer understands and can explain."""

    code: str = "retrainer_error"
    retryable: bool = False

    def __init_subclass__(cls, *, code: str | None = None, retryable: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(RetrainerError, code="configuration_error"):
    """A setting is missing, malformed or points at something that does not exist."""


class InvalidInputError(RetrainerError, code="invalid_input"):
    """Input from a user or producer (a spec, an event, an artifact key) is not acceptable."""


class NotFoundError(RetrainerError, code="not_found"):
    """The named resource (pipeline, run, model version, artifact) does not exist."""


class ConflictError(RetrainerError, code="conflict"):
    """The operation contradicts the current state (duplicate name, a second active rollout…)."""


class ArtifactIntegrityError(RetrainerError, code="artifact_integrity"):
    """An artifact's bytes do not match its recorded sha256: it was tampered with or corrupted.

    Never retryable and never ignored: anything built on the artifact must stop (fail closed).
    """


class InfrastructureError(RetrainerError, code="infrastructure_error"):
    """A backing service (database, object store, broker) failed in a way that is not transient."""


class TransientInfraError(InfrastructureError, code="infrastructure_unavailable", retryable=True):
    """A backing service did not answer or timed out; the same call may succeed later."""


class UnsafeArtifactKeyError(InvalidInputError, code="unsafe_artifact_key"):
    """An artifact key could escape the store's root (`..`, absolute path, backslash, encoded tricks)."""


class ArtifactNotFoundError(NotFoundError, code="artifact_not_found"):
    """No artifact is stored under that key or URI."""


class ArtifactExistsError(ConflictError, code="artifact_exists"):
    """An artifact with other content already exists under that key; artifacts are never overwritten."""


class SpecError(InvalidInputError, code="invalid_spec"):
    """A pipeline spec is invalid; `problems` holds one `FILE: key.path: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class TrainingError(RetrainerError, code="training_failed"):
    """Training cannot produce a trustworthy model (NaN/inf loss, diverged, out of memory at batch 1)."""


class WorkerFailedError(InfrastructureError, code="worker_failed", retryable=True):
    """A training worker process (one torchrun rank) exited with an error or was killed; the message
    names the rank, its exit code and its last log lines. A retry resumes from the last checkpoint,
    unless the worker's own error said retrying cannot help (`retryable` is then False)."""

    def __init__(self, message: str, *, rank: int | None, exit_code: int, retryable: bool = True) -> None:
        super().__init__(message)
        self.rank, self.exit_code, self.retryable = rank, exit_code, retryable


# ---------------------------------------------------------------- refusals at an HTTP boundary
# Raised by the API's and the model server's middleware; here so both processes share one class
# (and one status) per refusal.


class UnauthorizedError(RetrainerError, code="unauthorized"):
    """The request carries no X-API-Key header, or a key that is unknown or revoked."""


class ForbiddenError(RetrainerError, code="forbidden"):
    """The API key is valid but lacks the scope the request needs; the message names that scope."""


class PayloadTooLargeError(InvalidInputError, code="payload_too_large"):
    """The request body is larger than the server accepts."""


class RateLimitedError(RetrainerError, code="rate_limited", retryable=True):
    """The API key has used up its requests for now; `retry_after_seconds` says when to come back."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class IdempotencyKeyReusedError(ConflictError, code="idempotency_key_reused"):
    """An Idempotency-Key was sent again with a different request body (CONTRACT section 3: 422).

    It is a ConflictError like any other state conflict, but the contract gives it 422 rather
    than 409, so it has its own code; the trigger route is the one place that raises it.
    """
