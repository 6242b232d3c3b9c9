"""Canary evidence, one shape from the model server to the report.

- `VariantWindow`: what one variant (one model version) did in one window of live traffic.
- `ModelStats`: the answer of the model server's `GET /v2/models/{pipeline}/stats`; its
  `variants` are `ServedWindow`s (a `VariantWindow` naming the pipeline and variant).
- `CheckEvidence`: one statistical check of one window (`domain/canary_stats.py`): its outcome
  (pass, fail, not yet), the statistic, interval or p-value, sample sizes, threshold and the
  significance level it spent.
- `CanaryAttempt`: one analysed window of a rollout step, as the controller (`flows/canary.py`)
  stores it: both variants' windows, the decision, its checks' evidence and reasons.
- `StepAnalysis`: a rollout step's stored `analysis`: its attempts in order, and what closed it.

Storage converts them to and from JSON at the row (`storage/orm.py`, `storage/repositories/rollouts.py`),
so `RolloutStep.analysis` is a `StepAnalysis` everywhere above it: the API's rollout schema, the
report and the CLI read the typed fields. Rows stored before this shape existed are rewritten by
the migration `migrations/versions/0003_typed_canary_attempts.py`, so a reader never has to guess
at a missing or mistyped key.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain.histogram import LatencyHistogram
from domain.outcomes import GateCheck, RolloutStatus, Verdict
from domain.sequential import CheckName


class CanaryAction(StrEnum):
    WAIT = "wait"  # not enough time or traffic yet: keep this step
    REPEAT = "repeat"  # a check failed below the failure limit: analyse this step again
    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


class _Evidence(BaseModel):
    # Unknown keys are ignored rather than refused: a newer model server may report more, and an
    # older controller must still read what it knows.
    model_config = ConfigDict(frozen=True, extra="ignore")


_ABS_ERROR_SUM = (
    "Regression: the sum over labelled rows of each row's absolute error (mean over outputs), in the target's "
    "units; windows of several replicas merge by adding, like `labelled`."
)


class VariantWindow(_Evidence):
    """One variant (one version) in one window. Latencies in milliseconds; None: nothing measured."""

    version: str | None = Field(default=None, description="Model version that served (None: no such variant).")
    requests: int = Field(default=0, ge=0, description="Requests answered or failed by the model.")
    errors: int = Field(default=0, ge=0, description="Requests the model failed on (server errors).")
    rejected: int = Field(default=0, ge=0, description="Requests refused for bad input (client errors).")
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_histogram: LatencyHistogram | None = Field(
        default=None,
        description="The window's latencies in fixed log buckets (domain/histogram.py): what the latency test reads; "
        "windows of several replicas merge by adding counts. None: an older server that reports only p50/p99.",
    )
    class_counts: dict[str, int] = Field(
        default_factory=dict,
        description="Predicted rows per class id; a regression model's rows per bin index of the champion's "
        "`prediction_bins` (first output; bin i holds values v with edges[i-1] <= v < edges[i]).",
    )
    labelled: int = Field(default=0, ge=0, description="Rows with a delayed label (feedback) in the window.")
    correct: int = Field(default=0, ge=0, description="Labelled rows the variant predicted right (classifiers).")
    abs_error_sum: float = Field(default=0.0, ge=0, description=_ABS_ERROR_SUM)
    abs_error_sq_sum: float = Field(default=0.0, ge=0, description="Regression: the sum of their squares.")

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def merged(self, *others: VariantWindow) -> VariantWindow:
        """All these windows' samples together (replicas of one version): counts add, histograms merge
        bucket by bucket and p50/p99 are read from the merged histogram (percentiles never average)."""
        windows = (self, *others)
        histograms = [w.latency_histogram for w in windows if w.latency_histogram is not None]
        histogram = histograms[0].merged(*histograms[1:]) if histograms else None
        classes: dict[str, int] = {}
        for window in windows:
            for cls, count in window.class_counts.items():
                classes[cls] = classes.get(cls, 0) + count
        alone = len(windows) == 1
        return VariantWindow(
            version=self.version,
            requests=sum(w.requests for w in windows),
            errors=sum(w.errors for w in windows),
            rejected=sum(w.rejected for w in windows),
            latency_p50_ms=histogram.quantile(0.5) if histogram else (self.latency_p50_ms if alone else None),
            latency_p99_ms=histogram.quantile(0.99) if histogram else (self.latency_p99_ms if alone else None),
            latency_histogram=histogram,
            class_counts=dict(sorted(classes.items())),
            labelled=sum(w.labelled for w in windows),
            correct=sum(w.correct for w in windows),
            abs_error_sum=math.fsum(w.abs_error_sum for w in windows),
            abs_error_sq_sum=math.fsum(w.abs_error_sq_sum for w in windows),
        )

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mae(self) -> float | None:
        """Regression: mean absolute error of the labelled rows (None: no labels)."""
        return self.abs_error_sum / self.labelled if self.labelled else None


class CheckOutcome(StrEnum):
    PASS = "pass"  # noqa: S105 - an outcome, not a password
    FAIL = "fail"
    NOT_YET = "not_yet"


class CheckEvidence(BaseModel):
    """One check on one window: its outcome and the numbers it rests on."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    check: CheckName
    outcome: CheckOutcome
    reason: str = Field(description="One line: the outcome and the numbers behind it.")
    alpha: float = Field(ge=0, le=1, description="Significance level this look spent (0: not tested).")
    threshold: float | None = Field(default=None, description="The policy's limit this check tests against.")
    statistic: float | None = Field(default=None, description="The measured effect, in the threshold's units.")
    interval: tuple[float, float] | None = Field(default=None, description="Confidence bounds at 1 - alpha each.")
    p_value: float | None = None
    canary_n: int = Field(ge=0, description="Canary samples used (requests, or labels for accuracy and mae).")
    champion_n: int | None = Field(default=None, ge=0, description="Champion samples used (None: not compared).")
    measures: dict[str, float] = Field(default_factory=dict, description="Secondary figures, by name.")

    def to_gate_check(self) -> GateCheck:
        """The older flat shape (`not_yet` reads as skipped), for readers that know only GateCheck."""
        verdict = {CheckOutcome.PASS: Verdict.PASS, CheckOutcome.FAIL: Verdict.FAIL}.get(self.outcome, Verdict.SKIPPED)
        low, high = self.interval if self.interval is not None else (None, None)
        return GateCheck(self.check, "canary", verdict, self.reason, self.statistic, None, self.threshold, low, high)


Variant = Literal["champion", "canary"]


class ServedWindow(VariantWindow):
    """A variant's window as the model server reports it."""

    pipeline: str
    variant: Variant

    def window(self) -> VariantWindow:
        """The window alone (what the controller judges and stores)."""
        return VariantWindow.model_validate(self.model_dump(include=set(VariantWindow.model_fields)))

    def merged_served(self, *others: ServedWindow) -> ServedWindow:
        """`VariantWindow.merged`, keeping this window's pipeline and variant."""
        merged = self.window().merged(*(other.window() for other in others))
        return ServedWindow.model_validate({**merged.model_dump(), "pipeline": self.pipeline, "variant": self.variant})


class ServedVersion(_Evidence):
    version: str
    weight: float = Field(description="Percent of the pipeline's traffic this variant gets.")


class ModelStats(_Evidence):
    """`GET /v2/models/{pipeline}/stats`: what is served now, and each variant's window, champion first."""

    name: str
    champion: ServedVersion | None
    canary: ServedVersion | None
    window_seconds: float
    variants: tuple[ServedWindow, ...] = ()

    def window(self, variant: Variant, version: int | None) -> VariantWindow:
        """That variant's window at that version; an empty one if it served nothing in the window."""
        wanted = None if version is None else str(version)
        for served in self.variants:
            if served.variant == variant and wanted is not None and served.version == wanted:
                return served.window()
        return VariantWindow(version=wanted)


REPLICA_MISSING_AFTER_S = 5.0  # five report intervals of the default 1 s (serving/reports.py)


class ReplicaShare(_Evidence):
    """One model-server replica's part of a canary window (the attempt's windows are the sums)."""

    replica: str
    canary_requests: int = Field(ge=0)
    champion_requests: int = Field(ge=0)
    labelled: int = Field(default=0, ge=0, description="Labelled rows, both variants.")


class ReplicaServing(_Evidence):
    """What one replica serves for one pipeline, as it last reported."""

    champion_version: str | None = None
    canary_version: str | None = None
    canary_weight: float = 0.0
    since: AwareDatetime | None = Field(default=None, description="When the replica began serving exactly this.")


class ServingReplica(_Evidence):
    """A model-server replica as it reports itself to the metadata database (`serving/reports.py`)."""

    replica: str
    address: str | None
    started_at: AwareDatetime
    heartbeat_at: AwareDatetime
    stopped_at: AwareDatetime | None = None
    reports_windows: bool = Field(description="Whether it reports canary windows (a server with metrics).")
    serving: dict[str, ReplicaServing] = Field(default_factory=dict, description="By pipeline name.")

    def heartbeat_age_s(self, now: datetime) -> float:
        return max(0.0, (now - self.heartbeat_at).total_seconds())

    def missing(self, now: datetime, after_s: float = REPLICA_MISSING_AFTER_S) -> bool:
        """Not stopped, yet silent for more than `after_s` seconds."""
        return self.stopped_at is None and self.heartbeat_age_s(now) > after_s

    def state(self, now: datetime) -> Literal["live", "missing", "stopped"]:
        return "stopped" if self.stopped_at is not None else ("missing" if self.missing(now) else "live")


class CanaryAttempt(_Evidence):
    """One analysed window of a rollout step; the last attempt of a finished step decided it."""

    action: CanaryAction
    reason: str
    at: AwareDatetime = Field(description="When the window was analysed.")
    elapsed_seconds: float = Field(ge=0, description="Length of the window.")
    traffic_percent: float = Field(description="The canary's traffic share after this decision (0 on rollback).")
    canary: VariantWindow
    champion: VariantWindow
    checks: tuple[GateCheck, ...] = Field(default=(), description="Each check's verdict in the flat gate shape.")
    evidence: tuple[CheckEvidence, ...] = Field(
        default=(), description="Each statistical check's evidence (empty in rows stored before the tests existed)."
    )
    server_error: str | None = Field(default=None, description="Why the model server's window could not be read.")
    replicas: tuple[ReplicaShare, ...] = Field(
        default=(), description="Each model-server replica's share of the window (empty: one server read over HTTP)."
    )
    missing_replicas: tuple[str, ...] = Field(
        default=(),
        description="Replicas whose heartbeat stopped: their unreported traffic is not in the window, and a step "
        "passes only on a window that starts after the last of them was heard.",
    )

    @property
    def psi(self) -> float | None:
        drift = next((c for c in self.evidence if c.check == "prediction_drift"), None)
        if drift is not None:
            return drift.statistic
        check = next((c for c in self.checks if c.metric in ("prediction_drift", "prediction_psi")), None)
        return check.candidate_value if check else None


class StepAnalysis(_Evidence):
    """A rollout step's `analysis`: its attempts in order, and the action and reason that closed it
    (the decisive attempt's, or the rollout's end when an operator aborted or promoted mid-step)."""

    attempts: tuple[CanaryAttempt, ...] = ()
    action: CanaryAction | RolloutStatus | None = None
    reason: str | None = None

    @property
    def decisive(self) -> CanaryAttempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def repeats(self) -> int:
        """Failed analyses below the failure limit (each repeated window counts one)."""
        return sum(1 for a in self.attempts if a.action is CanaryAction.REPEAT)
