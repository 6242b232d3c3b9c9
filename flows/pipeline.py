"""The pipeline flow: one Prefect flow run takes a dataset version to a gated decision.

    resolve inputs → fetch data → prepare → resolve `model.init` → train (retried; resumes from the
    checkpoint kept in the artifact store) → quantize and choose a variant → evaluate candidate AND champion on the
    same test rows → paired comparison → gate → register the version → promote / reject

Tasks are thin: the ML work is `ml/`, the rules are `domain/`, the rows are `storage/`. The Run
row's status is true at every moment (queued → running → promoted | rejected | canary | skipped |
failed | awaiting_approval, see flows/approvals.py), and nothing touches the champion except the
final compare-and-set move, so a crash at any earlier point leaves it untouched.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled

from domain import entities as e
from domain.errors import RetrainerError
from domain.gate import ChampionEvidence, GateDecision, decide_promotion
from domain.logcontext import log_context
from domain.spec import PipelineSpec, parse_spec
from domain.task import QUALITY_METRICS
from flows import approvals, tracing
from flows.context import FlowContext
from flows.distributed import train_distributed
from flows.evaluation import (
    PairedReports,
    Report,
    TestRows,
    evaluate_one,
    evaluate_pair,
    expected_drift,
    gate_evidence,
    intervals,
    quality_metrics,
)
from flows.tuning import search
from flows.warm_start import StartingWeights, resolve_starting_weights, with_champion_preprocessing
from ml.data import PreparedData, RegressionTable, Table, prepare
from ml.evaluation import RegressionReport
from ml.loaders import load_data
from ml.losses import Objective
from ml.package import RegressionOutputs, manifest_for, prediction_bin_edges, save_package
from ml.quantization import MetricBudget, QuantizationOutcome, VariantScore, quantize_and_select
from ml.training import TrainProgress, TrainResult, seed_everything, train
from ml.zoo import build_for_spec, constructor_problems
from storage import repositories as repo
from storage.artifacts.fetch import fetch_uri

log = logging.getLogger("retrainer.flows.pipeline")
CHECKPOINT_PREFIX = "runs/{run_id}/checkpoints/"


@dataclass(frozen=True)
class RunInputs:
    spec: PipelineSpec
    run: e.Run
    dataset: e.DatasetVersion
    champion: e.ModelVersion | None


# ----------------------------------------------------------------------------- tasks


@task(name="resolve-inputs", cache_policy=NO_CACHE)
@tracing.traced("resolve-inputs")
def resolve_inputs(ctx: FlowContext, pipeline: str, run_id: str) -> RunInputs:
    """Marks the run running and finds its dataset version: the newest of its events, else the
    latest known version of the pipeline's dataset (schedule and manual runs)."""
    with ctx.tx() as session:
        this_flow_run = str(current_flow_run.id or "")
        _refuse_if_superseded(repo.get_run(session, run_id), this_flow_run)
        run = repo.update_run(session, run_id, status=e.RunStatus.RUNNING, prefect_flow_run_id=this_flow_run)
        row = repo.get_pipeline(session, pipeline)
        spec = parse_spec(row.spec, source=f"pipeline {pipeline}", param_checker=constructor_problems)
        dataset = None
        if run.event_ids:
            event = repo.get_event(session, run.event_ids[-1])
            data = event.payload.get("data", event.payload)
            dataset = repo.record_dataset_version(
                session,
                spec.dataset,
                str(data.get("version") or event.event_id),
                str(data["uri"]),
                rows=data.get("rows"),
            )
        else:
            dataset = repo.latest_dataset_version(session, spec.dataset)
        if dataset is None:
            raise RetrainerError(
                f"no version of dataset {spec.dataset!r} is known yet; publish a data-changed event for it first"
            )
        run = repo.update_run(session, run_id, dataset_version_id=dataset.id)
        champion = repo.get_champion(session, pipeline)
    _describe_flow_run(pipeline, run.trigger_kind.value, dataset.version)
    return RunInputs(spec, run, dataset, champion)


class SupersededFlowRun(RetrainerError, code="superseded_flow_run"):
    """This flow run no longer owns its run: the reconciler gave the run to another flow run (or ended it)
    after this one stayed PENDING too long, and a slow worker started this one anyway."""


def _refuse_if_superseded(run: e.Run, this_flow_run: str) -> None:
    owner = run.prefect_flow_run_id
    if run.status.is_final:
        raise SupersededFlowRun(f"run {run.id} already ended {run.status.value}; flow run {this_flow_run} does nothing")
    if this_flow_run and owner not in (None, "", repo.SUBMITTING, this_flow_run):
        raise SupersededFlowRun(
            f"run {run.id} belongs to flow run {owner} now (this one, {this_flow_run}, started after the run "
            "reconciler gave up on it: RETRAINER_RUN_START_TIMEOUT_S); it does nothing"
        )


def retry_unless_final(task: object, task_run: object, state: State[Any]) -> bool:
    """Prefect's `retry_condition_fn`: a RetrainerError that says retrying cannot help (a digest that
    does not match, an empty dataset folder, a loss that returns the wrong thing) fails the task at
    once; anything else (a network error, a worker that died) goes on to the task's retries."""
    error = state.data
    return not isinstance(error, RetrainerError) or error.retryable


@task(name="fetch-data", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_final, cache_policy=NO_CACHE)
@tracing.traced("fetch-data")
def fetch_data(ctx: FlowContext, dataset: e.DatasetVersion, workdir: Path) -> Path:
    dest = workdir / "data" / Path(dataset.uri).name
    # The artifact store keeps a folder's manifest, so a later mismatch can name the file that changed.
    digest = fetch_uri(dataset.uri, dest, ctx.settings, expected_sha256=dataset.sha256, manifests=ctx.store)
    if dataset.sha256 is None:
        with ctx.tx() as session:
            repo.set_dataset_sha256(session, dataset.id, digest)
    return dest


@task(
    name="resolve-init", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_final, cache_policy=NO_CACHE
)
@tracing.traced("resolve-init")
def resolve_init(ctx: FlowContext, inputs: RunInputs, workdir: Path) -> StartingWeights:
    """`model.init` verified and tried on the model before training (flows/warm_start.py)."""
    return resolve_starting_weights(ctx, inputs.spec, inputs.champion, workdir)


@task(name="train", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_final, cache_policy=NO_CACHE)
@tracing.traced("train")
def train_candidate(
    ctx: FlowContext,
    spec: PipelineSpec,
    data: PreparedData,
    run_id: str,
    workdir: Path,
    start: StartingWeights | None = None,
) -> TrainResult:
    """Trains from the newest checkpoint in the artifact store, if a previous attempt left one, else
    from `start`'s weights (random ones without)."""
    checkpoint_dir = workdir / "checkpoints"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the store, not this disk, is the source of truth
    prefix = CHECKPOINT_PREFIX.format(run_id=run_id)
    saved = ctx.store.list_keys(prefix)
    if saved:
        stored = ctx.store.stat(saved[-1])
        if stored is not None:
            ctx.store.download(stored, checkpoint_dir / "last.pt")
            get_run_logger().info("resuming from checkpoint %s", stored.uri)

    def upload(path: Path, step: int) -> None:
        ctx.store.put_file(path, key=f"{prefix}step-{step:09d}.pt")

    progress_id = cast(UUID, create_progress_artifact(progress=0.0, description=f"training {spec.name}"))
    last_reported = [0.0]

    def report(p: TrainProgress) -> None:
        done = 100.0 * p.step / max(1, p.total_steps)
        if done - last_reported[0] >= 5 or p.epoch_metrics is not None:
            update_progress_artifact(progress_id, progress=min(done, 100.0))
            last_reported[0] = done

    if spec.distributed.strategy == "ddp":  # torchrun's processes train it (flows/distributed.py)
        result = train_distributed(
            spec,
            data.training_data(),
            checkpoint_dir,
            ctx.settings,
            job_id=run_id,
            init_state=None if start is None else start.state,
            progress=report,
            on_checkpoint=upload,
        )
        update_progress_artifact(progress_id, progress=100.0)
        return result
    seed_everything(spec.data.seed)
    model = build_for_spec(spec)
    if start is not None:
        start.load_into(model, spec)
    result = train(
        model,
        data.training_data(),
        spec,
        checkpoint_dir,
        resume=True,
        progress=report,
        on_checkpoint=upload,
        objective=Objective.for_spec(spec),
    )
    update_progress_artifact(progress_id, progress=100.0)
    return result


@task(name="quantize", cache_policy=NO_CACHE)
@tracing.traced("quantize")
def quantize_candidate(
    spec: PipelineSpec, model: torch.nn.Module, table: Table | RegressionTable, data: PreparedData
) -> QuantizationOutcome:
    rows = TestRows.of(table, data)

    def score(candidate: torch.nn.Module) -> VariantScore:
        report = evaluate_one(
            spec,
            candidate,
            data.test.features,
            rows,
            inverse=data.target_standardizer,
            latency_budget_s=spec.evaluation.latency_budget_seconds / 4,
            custom=False,
        )
        return VariantScore(
            report.metrics.get("accuracy"),
            report.metrics["latency_p50_ms_b32"],
            int(report.metrics["size_bytes"]),
            metrics={name: report.metrics[name] for name in QUALITY_METRICS[spec.task]},
        )

    calibration = list(torch.split(data.train.features, spec.hyperparameters.batch_size))
    metric, max_drop = spec.quantization.budget(spec.task)
    return quantize_and_select(
        model,
        kind=spec.quantization.type,
        calibration=calibration,
        evaluate=score,
        budget=MetricBudget(metric, max_drop, QUALITY_METRICS[spec.task][metric]),
        calibration_batches=spec.quantization.calibration_batches,
    )


@task(name="evaluate", cache_policy=NO_CACHE)
@tracing.traced("evaluate")
def evaluate_both(
    ctx: FlowContext, inputs: RunInputs, model: torch.nn.Module, rows: TestRows, data: PreparedData, workdir: Path
) -> PairedReports:
    """The candidate and the champion on the same raw test rows, each with its own preprocessing
    (flows/evaluation.py); the champion's report is None, with the reason, when it cannot be evaluated."""
    return evaluate_pair(ctx, inputs.spec, inputs.champion, model, rows, data, workdir)


@task(name="gate-and-record", cache_policy=NO_CACHE)
@tracing.traced("gate-and-record")
def gate_and_record(
    ctx: FlowContext,
    inputs: RunInputs,
    trained: TrainResult,
    quantized: QuantizationOutcome,
    reports: PairedReports,
    data: PreparedData,
    workdir: Path,
    start: StartingWeights | None = None,
) -> dict[str, Any]:
    spec, run_id = inputs.spec, inputs.run.id
    candidate, champion, champion_error = reports.candidate, reports.champion, reports.champion_error
    paired = intervals(spec, candidate, champion)
    with tracing.span("gate", champion=inputs.champion.version if inputs.champion else None) as gate_span:
        decision = decide_promotion(
            gate_evidence(candidate),
            None
            if inputs.champion is None
            else ChampionEvidence(gate_evidence(champion) if champion else None, paired, champion_error),
            spec.gates,
        )
        gate_span.set_attribute("retrainer.passed", decision.passed)
    manifest = manifest_for(
        spec,
        quantized.report.chosen,
        data.standardizer,
        data.feature_names,
        regression=_regression_outputs(data, candidate),
    )
    saved = save_package(quantized.model, manifest, workdir / "model.pt")
    ref = ctx.store.put_file(saved.path)
    evidence = {
        "data_split": {name: len(getattr(data, name)) for name in ("train", "validation", "test")},
        "training": {
            "best_epoch": trained.best_epoch,
            "stopped_early": trained.stopped_early,
            "global_steps": trained.global_steps,
            "resumed_from_step": trained.resumed_from_step,
            "world_size": trained.world_size,
            "history": trained.history_dicts(),
            "warnings": trained.warnings,
            "init": None if start is None else start.report.to_dict(),
            "parameters": {"trainable": trained.trainable_parameters, "frozen": trained.frozen_parameters},
        },
        "candidate": candidate.to_dict(),
        "champion": None
        if inputs.champion is None
        else {
            "version": inputs.champion.version,
            "report": champion.to_dict() if champion else None,
            "error": champion_error,
        },
        "comparisons": {k: v.to_dict() for k, v in paired.items()},
        # what the canary's drift check allows: a better model changes this share of predictions
        "disagreement": expected_drift(reports, None if inputs.champion is None else inputs.champion.version),
        "quantization": quantized.report.to_dict(),
    }
    with ctx.tx() as session:
        version = repo.register_model_version(
            session,
            spec.name,
            artifact_uri=ref.uri,
            sha256=ref.sha256,
            size_bytes=ref.size,
            # an undefined metric (NaN roc_auc on one class) is left out: JSON has no NaN
            metrics={name: value for name, value in candidate.metrics.items() if math.isfinite(value)},
            run_id=run_id,
            manifest=manifest,
        )
        repo.record_gate_checks(session, run_id, decision.checks, model_version_id=version.id)
        repo.update_run(session, run_id, model_version_id=version.id, evidence=evidence)
    outcome = _decide_outcome(ctx, inputs, decision, version)
    with ctx.tx() as session:
        repo.update_run(session, run_id, status=outcome["status"], evidence={"outcome": _jsonable(outcome)})
    _markdown_report(spec, inputs, candidate, champion, decision, quantized, outcome, version)
    return _jsonable(outcome)


# ---------------------------------------------------------------------------- the flow


@flow(name="retrainer-pipeline", flow_run_name="{pipeline}", validate_parameters=True)
def run_pipeline(pipeline: str, run_id: str | None = None) -> dict[str, Any]:
    """Runs one pipeline run. Without `run_id` (a scheduled run) it creates its own Run row,
    once per schedule slot."""
    ctx = FlowContext.open()
    try:
        run_id = run_id or _scheduled_run(ctx, pipeline)
        with ctx.tx() as session:  # the trace the run's submission (or trigger) left for it to continue
            parent = tracing.run_traceparent(repo.get_run(session, run_id).evidence)
        with (
            tracing.span("pipeline", parent=parent, pipeline=pipeline, run_id=run_id),
            log_context(pipeline=pipeline, run_id=run_id),
        ):
            try:
                return _execute(ctx, pipeline, run_id)
            except SupersededFlowRun as error:  # the run is another flow run's: touch nothing, end cancelled
                log.warning("%s", error)
                return Cancelled(message=str(error))  # type: ignore[return-value]  # Prefect: the flow run's final state
            except BaseException as error:
                _mark_failed(ctx, run_id, error)
                raise
    finally:
        ctx.close()


def _execute(ctx: FlowContext, pipeline: str, run_id: str) -> dict[str, Any]:
    workdir = ctx.workdir(run_id)
    inputs = resolve_inputs(ctx, pipeline, run_id)
    spec = inputs.spec
    path = fetch_data(ctx, inputs.dataset, workdir)
    table = load_data(path, spec.data, task=spec.task, input_shape=spec.model.input_shape)
    data = prepare(
        table,
        input_shape=spec.model.input_shape,
        output_classes=spec.model.output_classes,
        validation_fraction=spec.data.validation_fraction,
        test_fraction=spec.data.test_fraction,
        seed=spec.data.seed,
        standardize=spec.data.standardize,
        task=spec.task,
        outputs=spec.model.outputs,
    )
    start = resolve_init(ctx, inputs, workdir)
    data = with_champion_preprocessing(start, data, table)
    if spec.tuning is not None:  # the best trial's configuration is the one trained and gated (flows/tuning.py)
        spec = search(ctx, spec, data, run_id, start)
        inputs = replace(inputs, spec=spec)
    trained = train_candidate(ctx, spec, data, run_id, workdir, start)
    quantized = quantize_candidate(spec, trained.model, table, data)
    reports = evaluate_both(ctx, inputs, quantized.model, TestRows.of(table, data), data, workdir)
    outcome = gate_and_record(ctx, inputs, trained, quantized, reports, data, workdir, start)
    shutil.rmtree(workdir, ignore_errors=True)
    log.info("run finished: %s", outcome["status"], extra={"outcome": outcome})
    return outcome


# ------------------------------------------------------------------------------ helpers


def _scheduled_run(ctx: FlowContext, pipeline: str) -> str:
    slot = current_flow_run.scheduled_start_time or datetime.now(UTC)
    with ctx.tx() as session:
        run, _ = repo.create_run(
            session, pipeline, e.TriggerKind.SCHEDULE, reason="cron schedule", dedupe_key=f"schedule:{slot.isoformat()}"
        )
    return run.id


def _describe_flow_run(pipeline: str, trigger: str, version: str) -> None:
    """Flow-run name and tags that say what the run is (best effort: needs a Prefect API)."""
    flow_run_id = current_flow_run.id
    if not flow_run_id:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(
                flow_run_id,
                name=f"{pipeline}·{trigger}·{version}",
                tags=[f"pipeline:{pipeline}", f"trigger:{trigger}", f"dataset-version:{version}"],
            )
    except Exception as error:  # naming is cosmetic; it must never fail a run
        log.warning("could not rename the flow run: %s", error)


def _mark_failed(ctx: FlowContext, run_id: str, error: BaseException) -> None:
    """Ends the run `failed` when the code failed. A crash (SystemExit, an interrupt or termination
    signal: no Exception) leaves it in progress: Prefect marks the flow run CRASHED, and the
    reconciler (flows/reconcile.py) submits it again to resume from its checkpoint, or fails it."""
    if not isinstance(error, Exception):
        log.warning("run %s crashed (%s); the run reconciler settles it", run_id, type(error).__name__)
        return
    try:
        with ctx.tx() as session:
            run = repo.get_run(session, run_id)
            if not run.status.is_final:
                repo.update_run(session, run_id, status=e.RunStatus.FAILED, error=f"{type(error).__name__}: {error}")
    except Exception:  # the original error matters more than this bookkeeping
        log.exception("could not mark run %s failed", run_id)


def _regression_outputs(data: PreparedData, candidate: Report) -> RegressionOutputs | None:
    """A regression model's manifest additions; its prediction bins come from its test predictions."""
    if data.target_standardizer is None or not isinstance(candidate, RegressionReport):
        return None
    return RegressionOutputs(data.target_names, data.target_standardizer, prediction_bin_edges(candidate.predictions))


def _decide_outcome(
    ctx: FlowContext, inputs: RunInputs, decision: GateDecision, version: e.ModelVersion
) -> dict[str, Any]:
    """Turns the gate decision into stages, alias moves and the run's status: a passed gate goes on
    as flows/approvals.py says (a hold, an approval to wait for, a canary rollout or a champion move)."""
    with ctx.tx() as session:
        if not decision.passed:
            repo.set_model_stage(session, version.id, e.ModelStage.REJECTED)
            return {"status": e.RunStatus.REJECTED, "reason": decision.reason, "version": version.version}
        champion_id = inputs.champion.id if inputs.champion else None
        passed = approvals.PassedCandidate(inputs.run.id, version, champion_id, decision.reason)
        return approvals.after_gate(session, inputs.spec, passed)


def _jsonable(outcome: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, e.RunStatus) else v) for k, v in outcome.items()}


def _markdown_report(
    spec: PipelineSpec,
    inputs: RunInputs,
    candidate: Report,
    champion: Report | None,
    decision: GateDecision,
    quantized: QuantizationOutcome,
    outcome: dict[str, Any],
    version: e.ModelVersion,
) -> None:
    rows = ["| metric | candidate | champion |", "|---|---|---|"]
    for metric in quality_metrics(spec.task):
        champ = f"{champion.metrics[metric]:.4g}" if champion and metric in champion.metrics else "—"
        rows.append(f"| {metric} | {candidate.metrics.get(metric, float('nan')):.4g} | {champ} |")
    gate = ["| check | metric | verdict | reason |", "|---|---|---|---|"]
    gate += [f"| {c.check} | {c.metric} | {c.verdict.value} | {c.reason} |" for c in decision.checks]
    markdown = "\n".join(
        [
            f"# {spec.name}: run {inputs.run.id}",
            f"Dataset **{inputs.dataset.dataset} {inputs.dataset.version}**; candidate **v{version.version}**; "
            f"champion {'v' + str(inputs.champion.version) if inputs.champion else 'none (first model)'}.",
            f"**Outcome: {_jsonable(outcome)['status']}** — {outcome['reason']}",
            "## Evaluation (same test rows)",
            *rows,
            "## Gate",
            *gate,
            f"## Quantization\nchosen **{quantized.report.chosen}**: {quantized.report.reason}",
        ]
    )
    create_markdown_artifact(markdown, key=f"run-{inputs.run.id[:8]}", description=f"{spec.name} decision")
