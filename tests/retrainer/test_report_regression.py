"""The HTML report and the CLI's model list of a regression pipeline: rmse, mae, r2 and mape with
their paired intervals, lower-is-better read the right way round (a classifier's report is in
tests/retrainer/test_report.py)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from domain import entities as e
from domain.gate import DifferenceInterval
from ml.evaluation.comparison import compare
from ml.evaluation.report import RegressionReport
from ml.quantization.selection import MetricBudget, QuantizationReport, VariantResult, VariantScore
from retrainer.report import collect_report, write_report
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from storage.orm import Base
from tests.retrainer.test_cli_errors import run_cli
from web.views import PipelineReport, RunReport

PIPELINE = "demand"
TARGETS = np.linspace(100.0, 300.0, 60)  # no target is 0: mape is defined
ZERO_TARGETS = np.concatenate([[0.0], TARGETS[1:]])  # the first run's test rows: mape undefined
MANIFEST = {"format": "retrainer.model/1", "task": "regression", "outputs": 1}


def regression_report(targets: np.ndarray, noise: float, seed: int) -> RegressionReport:
    """A report as evaluate_regression makes it: metrics computed from the rows it keeps."""
    predictions = targets + np.random.default_rng(seed).normal(0.0, noise, size=targets.shape)
    error = predictions - targets
    undefined = {"mape": "1 of 60 test rows has a target of 0"} if (targets == 0).any() else {}
    metrics = {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "r2": float(1 - np.sum(error**2) / np.sum((targets - targets.mean()) ** 2)),
        "mape": float("nan") if undefined else float(np.mean(np.abs(error) / np.abs(targets))),
        "latency_p99_ms": 0.4,
        "size_bytes": 20_000.0,
    }
    return RegressionReport(metrics, targets, predictions, undefined_metrics=undefined)


def paired(candidate: RegressionReport, champion: RegressionReport) -> dict[str, Any]:
    """The run evidence's `comparisons`, as flows/evaluation.py's `intervals` stores them."""
    found = compare(candidate, champion, metrics=["rmse", "r2"], n_resamples=1000, confidence=0.95, seed=3)
    return {
        name: DifferenceInterval(
            name, c.difference, c.ci_low, c.ci_high, c.confidence, c.n_examples, c.higher_is_better
        ).to_dict()
        for name, c in found.items()
    }


def quantization(float_rmse: float) -> dict[str, Any]:
    budget = MetricBudget("rmse", 0.5, higher_is_better=False)
    results = (
        VariantResult("none", True, True, "float baseline", VariantScore(None, 0.8, 20_000, {"rmse": float_rmse})),
        VariantResult(
            "dynamic",
            True,
            True,
            "1.9x faster, 3.4x smaller",
            VariantScore(None, 0.42, 6_000, {"rmse": float_rmse + 0.2}),
            drop=0.2,
        ),
    )
    return QuantizationReport("dynamic", "fastest variant within rmse +0.5", budget, results).to_dict()


def record_run(
    session: Session,
    candidate: RegressionReport,
    champion: tuple[int, RegressionReport] | None,
    status: e.RunStatus,
    reason: str,
    *,
    old_evidence: bool = False,
) -> str:
    run, _ = repo.create_run(session, PIPELINE, e.TriggerKind.MANUAL, reason=reason)
    stored = candidate.to_dict()
    # the flow leaves an undefined metric (null in the report) out of the version's metrics
    metrics = {k: v for k, v in stored["metrics"].items() if v is not None}
    artifact = {"artifact_uri": f"file:///tmp/{run.id}.pt", "sha256": sha256(run.id.encode()).hexdigest()}
    version = repo.register_model_version(
        session, PIPELINE, size_bytes=6_000, metrics=metrics, run_id=run.id, manifest=MANIFEST, **artifact
    )
    if old_evidence:  # a report stored before reports named their task
        stored.pop("task")
    evidence: dict[str, Any] = {"candidate": stored, "quantization": quantization(candidate.metrics["rmse"])}
    if champion is not None:
        evidence["champion"] = {"version": champion[0], "report": champion[1].to_dict(), "error": None}
        evidence["comparisons"] = paired(candidate, champion[1])
    repo.update_run(session, run.id, model_version_id=version.id, evidence=evidence)
    repo.update_run(session, run.id, status=status, evidence={"outcome": {"status": status.value, "reason": reason}})
    return run.id


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('regression') / 'retrainer.db'}")
    Base.metadata.create_all(engine)
    made = make_sessions(engine)
    first = regression_report(ZERO_TARGETS, noise=20.0, seed=1)
    better = regression_report(TARGETS, noise=5.0, seed=2)
    worse = regression_report(TARGETS, noise=30.0, seed=4)
    with transaction(made) as s:
        repo.upsert_pipeline(s, PIPELINE, "sales", {"name": PIPELINE, "task": "regression"})
        record_run(s, first, None, e.RunStatus.PROMOTED, "first model", old_evidence=True)
        record_run(s, better, (1, regression_report(TARGETS, 20.0, 1)), e.RunStatus.PROMOTED, "rmse better")
        record_run(s, worse, (2, better), e.RunStatus.REJECTED, "rmse worse than the champion's")
    yield made
    engine.dispose()


@pytest.fixture(scope="module")
def pipeline(sessions: sessionmaker[Session]) -> PipelineReport:
    with transaction(sessions) as session:
        (found,) = collect_report(session).pipelines
    return found


def test_a_regression_run_shows_the_regression_metrics_and_no_accuracy(pipeline: PipelineReport) -> None:
    assert (pipeline.task, pipeline.headline_metric) == ("regression", "rmse")
    for run in pipeline.runs:
        assert run.task == "regression"  # the first run's report predates the key: the pipeline's task
        assert [m.name for m in run.metrics] == ["rmse", "mae", "r2", "mape", "latency_p99_ms", "size_bytes"]
        assert run.metric("accuracy") is None
        assert run.headline is run.metric("rmse")
    first = pipeline.runs[0].metric("mape")
    assert first is not None and first.candidate is None  # undefined on a target of 0: a dash, not 0


def pair(run: RunReport, name: str) -> tuple[bool | None, bool | None]:
    found = run.metric(name)
    assert found is not None and found.candidate is not None and found.champion is not None
    return found.improved, found.interval_says


def test_lower_rmse_is_better_and_the_paired_interval_agrees(pipeline: PipelineReport) -> None:
    _, better, worse = pipeline.runs
    assert pair(better, "rmse") == (True, True)  # rmse fell, the whole interval below 0
    assert pair(better, "r2") == (True, True)  # r2 rose: higher is better
    assert pair(worse, "rmse") == (False, False)
    assert pair(worse, "mae") == (False, None)  # not compared by a vs_champion rule: no interval
    rmse = better.metric("rmse")
    assert rmse is not None and rmse.interval is not None and rmse.interval.confidence == 0.95
    assert rmse.interval.high is not None and rmse.interval.high < 0


def test_the_quantization_budget_is_on_rmse(pipeline: PipelineReport) -> None:
    quantized = pipeline.runs[1].quantization
    assert quantized is not None
    assert (quantized.metric, quantized.higher_is_better, quantized.max_drop) == ("rmse", False, 0.5)
    rmse = pipeline.runs[1].metric("rmse")
    assert rmse is not None and rmse.candidate is not None
    assert [(v.variant, v.value) for v in quantized.variants] == [
        ("none", pytest.approx(rmse.candidate)),
        ("dynamic", pytest.approx(rmse.candidate + 0.2)),
    ]


def card(document: str, run_id: str) -> str:
    start = document.index(f'id="run-{run_id}"')
    ends = [document.find(mark, start + 1) for mark in ('<div class="card"', "<h3>Champion alias history")]
    return document[start : min(end for end in ends if end > 0)]


def text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def test_the_html_report_charts_rmse_lower_is_better_and_colours_by_direction(
    sessions: sessionmaker[Session], pipeline: PipelineReport, tmp_path: Path
) -> None:
    document = write_report(sessions, tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'aria-label="rmse per run (lower is better): candidate vs champion (same test rows)"' in document
    assert 'aria-label="rmse (lower is better)"' in document
    assert 'aria-label="accuracy' not in document and ">accuracy<" not in document
    _, better, worse = pipeline.runs
    rmse = worse.metric("rmse")
    assert rmse is not None and rmse.delta is not None and rmse.interval is not None
    assert rmse.interval.low is not None and rmse.interval.high is not None
    worse_card = card(document, worse.run_id)
    shown = f"[+{rmse.interval.low:.4f}, +{rmse.interval.high:.4f}] at 95 %"
    assert f'<span class="worse">{shown}</span>' in worse_card
    assert f'<span class="worse">+{rmse.delta:.4f}</span>' in worse_card
    better_rmse = better.metric("rmse")
    assert better_rmse is not None and better_rmse.delta is not None
    assert f'<span class="better">\u2212{abs(better_rmse.delta):.4f}</span>' in card(document, better.run_id)
    words = text(worse_card)
    assert "rmse (lower is better)" in words and "r2 (lower is better)" not in words
    assert "(max rmse rise 0.5000)" in words
    assert "variant available eligible rmse p50 latency (batch 32)" in words


def test_models_list_shows_the_regression_metrics(tmp_path: Path) -> None:
    assert run_cli("db", "upgrade", tmp_path=tmp_path).returncode == 0
    engine = create_db_engine(f"sqlite:///{tmp_path / '.retrainer' / 'retrainer.db'}")
    with transaction(make_sessions(engine)) as s:
        repo.upsert_pipeline(s, PIPELINE, "sales", {"name": PIPELINE, "task": "regression"})
        record_run(s, regression_report(TARGETS, 5.0, 2), None, e.RunStatus.PROMOTED, "first model")
        repo.upsert_pipeline(s, "digits", "digits", {"name": "digits"})
        repo.register_model_version(
            s, "digits", artifact_uri="file:///d.pt", sha256="b" * 64, size_bytes=1, metrics={"accuracy": 0.0}
        )
    engine.dispose()

    shown = run_cli("models", "list", PIPELINE, tmp_path=tmp_path, COLUMNS="200")
    assert shown.returncode == 0, shown.stderr
    header, row = (line for line in shown.stdout.splitlines() if "version" in line or "v1" in line)
    cells = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    assert cells == ["version", "stage", "rmse", "mae", "r2", "mape", "sha256", "run"]
    values = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert values[:2] == ["v1", "candidate"] and all(re.fullmatch(r"\d+\.\d{4}", v) for v in values[2:6])

    classifier = run_cli("models", "list", "digits", tmp_path=tmp_path, COLUMNS="200")
    assert classifier.returncode == 0, classifier.stderr
    header, row = (line for line in classifier.stdout.splitlines() if "version" in line or "v1" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")][2] == "accuracy"
    assert [cell.strip() for cell in row.strip("│ ").split("│")][2] == "0.0000"  # 0 is a value, not "-"
