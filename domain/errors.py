"""One error hierarchy for the whole service.

Every error a user can act on names the resource and the fix. Each class carries a stable
`code` (used by the HTTP layer's single status mapping and asserted by tests) and says whether
retrying the same operation can help (`retryable`).
"""

from __future__ import annotations


class RetrainerError(Exception):
    """Base class: something went wrong that Retrainer understands and can explain."""

    code: str = "retrainer_error"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(RetrainerError):
    """A setting is missing, malformed or points at something that does not exist."""

    code = "configuration_error"


class InvalidInputError(RetrainerError):
    """Input from a user or producer (a spec, an event, an artifact key) is not acceptable."""

    code = "invalid_input"


class NotFoundError(RetrainerError):
    """The named resource (pipeline, run, model version, artifact) does not exist."""

    code = "not_found"


class ConflictError(RetrainerError):
    """The operation contradicts the current state (duplicate name, a second active rollout…)."""

    code = "conflict"


class ArtifactIntegrityError(RetrainerError):
    """An artifact's bytes do not match its recorded sha256: it was tampered with or corrupted.

    Never retryable and never ignored: anything built on the artifact must stop (fail closed).
    """

    code = "artifact_integrity"


class InfrastructureError(RetrainerError):
    """A backing service (database, object store, broker) failed in a way that is not transient."""

    code = "infrastructure_error"


class TransientInfraError(InfrastructureError):
    """A backing service did not answer or timed out; the same call may succeed later."""

    code = "infrastructure_unavailable"
    retryable = True


class UnsafeArtifactKeyError(InvalidInputError):
    """An artifact key could escape the store's root (`..`, absolute path, backslash, encoded tricks)."""

    code = "unsafe_artifact_key"


class ArtifactNotFoundError(NotFoundError):
    """No artifact is stored under that key or URI."""

    code = "artifact_not_found"


class ArtifactExistsError(ConflictError):
    """An artifact with other content already exists under that key; artifacts are never overwritten."""

    code = "artifact_exists"


class SpecError(InvalidInputError):
    """A pipeline spec is invalid; `problems` holds one `FILE: key.path: message` line per problem."""

    code = "invalid_spec"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class TrainingError(RetrainerError):
    """Training cannot produce a trustworthy model (NaN/inf loss, diverged, out of memory at batch 1)."""

    code = "training_failed"
