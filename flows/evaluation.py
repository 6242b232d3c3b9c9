"""The pipeline's evaluation step for either task: the candidate and the champion on the same raw
test rows, each through its own preprocessing, and what the gate reads from the two reports.

A classifier is judged by `ml.evaluation.evaluate` on class ids; a regression model by
`evaluate_regression` on the targets in their own units (each model's outputs mapped back by its
own target standardizer), so a champion trained with other statistics is compared fairly. The
gate's paired intervals (`intervals`) and the canary's expected disagreement (`expected_drift`)
come from the same reports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from domain import entities as e
from domain.errors import InvalidInputError, RetrainerError
from domain.gate import DifferenceInterval, ModelEvidence
from domain.spec import PipelineSpec
from flows.context import FlowContext
from ml.data import PreparedData, RegressionTable, Table
from ml.evaluation import EvalReport, RegressionReport, compare, disagreement, evaluate, evaluate_regression
from ml.package import load_package, manifest_task, prediction_bin_edges, target_standardizer_of
from ml.standardizer import TargetStandardizer
from ml.text import TextTokenizer

Report = EvalReport | RegressionReport


@dataclass(frozen=True)
class TestRows:
    """The raw test rows both models see: features before any standardizer, targets in their units."""

    raw_features: npt.NDArray[Any]
    targets: npt.NDArray[Any]
    fingerprint: str

    @classmethod
    def of(cls, table: Table | RegressionTable, data: PreparedData) -> TestRows:
        raw = table.features[data.splits.test]
        targets = (table.targets if isinstance(table, RegressionTable) else table.labels)[data.splits.test]
        digest = hashlib.sha256(raw.tobytes() + np.ascontiguousarray(targets).tobytes()).hexdigest()
        return cls(raw, targets, digest)


@dataclass(frozen=True)
class PairedReports:
    candidate: Report
    champion: Report | None
    champion_error: str | None  # why the champion could not be evaluated (the gate then fails closed)
    champion_bins: list[float] | None = None  # a regression champion's prediction bins (its manifest's)


def evaluate_one(
    spec: PipelineSpec,
    model: nn.Module,
    features: torch.Tensor,
    rows: TestRows,
    *,
    inverse: TargetStandardizer | None = None,
    latency_budget_s: float | None = None,
    custom: bool = True,
) -> Report:
    """One model on the test rows (its own preprocessing already applied to `features`)."""
    budget = spec.evaluation.latency_budget_seconds if latency_budget_s is None else latency_budget_s
    metrics = spec.evaluation.custom_metrics if custom else []
    if spec.task == "regression":
        return evaluate_regression(
            model,
            features,
            rows.targets,
            inverse=None if inverse is None else _in_float64(inverse),
            custom_metrics=metrics,
            latency_budget_s=budget,
            data_fingerprint=rows.fingerprint,
        )
    return evaluate(
        model,
        features,
        torch.from_numpy(np.asarray(rows.targets, dtype=np.int64)),
        num_classes=spec.output_width,
        custom_metrics=metrics,
        latency_budget_s=budget,
        data_fingerprint=rows.fingerprint,
    )


def _in_float64(scaler: TargetStandardizer) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    return lambda outputs: scaler.inverse(outputs).astype(np.float64)


def evaluate_pair(
    ctx: FlowContext,
    spec: PipelineSpec,
    champion: e.ModelVersion | None,
    model: nn.Module,
    rows: TestRows,
    data: PreparedData,
    workdir: Path,
) -> PairedReports:
    """The candidate, then the champion (if any) on the same raw rows with its own preprocessing."""
    candidate = evaluate_one(spec, model, data.test.features, rows, inverse=data.target_standardizer)
    if champion is None:
        return PairedReports(candidate, None, None)
    try:
        if manifest_task(champion.manifest) != spec.task:
            raise InvalidInputError(
                f"it is a {manifest_task(champion.manifest)} model and the spec's task is now {spec.task}; "
                "a champion of another task cannot be compared: promote by hand (retrainer champion set) or "
                "start a new pipeline"
            )
        _check_same_tokens(spec, champion)
        path = ctx.champion_package(champion, workdir)
        champion_model, standardizer = load_package(path, champion.manifest, champion.sha256)
        features = torch.from_numpy(standardizer.transform(rows.raw_features))
        inverse = target_standardizer_of(champion.manifest, source=f"champion v{champion.version}")
        report = evaluate_one(spec, champion_model, features, rows, inverse=inverse)
    except RetrainerError as error:  # unreadable, tampered or incompatible: the gate fails closed
        return PairedReports(candidate, None, f"champion v{champion.version} could not be evaluated: {error}")
    bins = None
    if isinstance(report, RegressionReport):
        stored = champion.manifest.get("prediction_bins")
        bins = [float(v) for v in stored] if isinstance(stored, list) else prediction_bin_edges(report.predictions)
    return PairedReports(candidate, report, None, bins)


def _check_same_tokens(spec: PipelineSpec, champion: e.ModelVersion) -> None:
    """A text champion sees the candidate's token ids: right only when both tokenise alike (same
    tokenizer file and sequence length); otherwise the comparison would judge it on inputs it never saw."""
    stored = champion.manifest.get("tokenizer")
    if spec.data.text_column is None or not isinstance(stored, dict):
        return
    ours = TextTokenizer.for_data(spec.data.tokenizer, spec.model.input_shape)
    if (stored.get("sha256"), stored.get("max_length")) != (ours.sha256, ours.max_length):
        raise InvalidInputError(
            f"it tokenises with tokenizer sha256 {stored.get('sha256')} at {stored.get('max_length')} tokens and this "
            f"run with {ours.sha256} at {ours.max_length}: the two cannot be compared on the same rows; keep "
            "data.tokenizer and model.input_shape, or promote by hand (retrainer champion set)"
        )


def gate_evidence(report: Report | None) -> ModelEvidence:
    """What the gate reads of one report: metrics, per-class recall (classifiers) and the row count."""
    if report is None:
        return ModelEvidence({}, {}, 0)
    recall = {cls: float(v["recall"]) for cls, v in report.per_class.items()} if isinstance(report, EvalReport) else {}
    return ModelEvidence(dict(report.metrics), recall, report.n_examples)


def intervals(spec: PipelineSpec, candidate: Report, champion: Report | None) -> dict[str, DifferenceInterval]:
    """Paired bootstrap intervals of candidate - champion for every `vs_champion` quality rule."""
    if champion is None:
        return {}
    by_confidence: dict[float, list[str]] = {}
    custom = {path.rpartition(":")[2]: path for path in spec.evaluation.custom_metrics}
    known = spec.metric_names()
    for metric, rule in spec.gates.vs_champion.items():
        if rule.min_delta is not None and metric in known:
            by_confidence.setdefault(rule.confidence, []).append(custom.get(metric, metric))
    found: dict[str, DifferenceInterval] = {}
    for confidence, metrics in by_confidence.items():
        results = compare(
            candidate,
            champion,
            metrics=metrics,
            n_resamples=spec.evaluation.bootstrap_resamples,
            confidence=confidence,
            seed=spec.data.seed,
        )
        for key, c in results.items():
            name = key.rpartition(":")[2]
            found[name] = DifferenceInterval(
                name, c.difference, c.ci_low, c.ci_high, c.confidence, c.n_examples, c.higher_is_better
            )
    return found


def expected_drift(pair: PairedReports, champion_version: int | None) -> dict[str, Any] | None:
    """What the canary's drift check allows (run evidence `disagreement`): the share of test rows on
    which the two models' predicted category (class, or the champion's prediction bin) differs."""
    if pair.champion is None or champion_version is None:
        return None
    rate = disagreement(pair.candidate, pair.champion, pair.champion_bins or ())
    return {"rate": rate, "rows": pair.candidate.n_examples, "champion_version": champion_version}


def quality_metrics(task: str) -> tuple[str, ...]:
    """The metrics the run's markdown report shows, in order."""
    if task == "regression":
        return ("rmse", "mae", "r2", "mape", "latency_p99_ms", "size_bytes")
    return ("accuracy", "macro_f1", "roc_auc", "pr_auc", "log_loss", "ece", "latency_p99_ms", "size_bytes")
