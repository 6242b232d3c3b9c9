"""The hyperparameter search (the spec's `tuning` section, domain/tuning_spec.py), with Optuna.

    open the study (metadata DB) → until `trials` have finished or `timeout_seconds` passed:
    ask → one Prefect task per trial (task run `trial-<number>`) trains the trial's spec on the
    train split and reports the validation metric each epoch (the pruner may stop it) → tell
    → record every trial in the run's evidence → the best trial's spec

Decisions, and why:

- **The study lives in the metadata database**: Optuna's RDB storage on `settings.database_url`
  (SQLite embedded, PostgreSQL in production; see `study_storage` for where its tables go), study
  `<pipeline>-<run_id>`, loaded if it exists.
  A killed run that is retried continues its study: finished trials (complete, pruned or failed)
  count toward `trials` and are not run again; a trial the kill left running is marked failed
  (listed in the study's user attribute `interrupted`), does not count, and its parameters are
  queued to run again.
- **The best configuration is retrained, not kept**: the pipeline trains the best trial's spec in
  its ordinary `train` task, so the candidate gets the checkpointed, retried path (a crash there
  resumes from the store, not from a trial's scratch folder). Both start from `data.seed`, so on
  CPU the candidate is the best trial's model again.
- **A trial's value** is the metric at the epoch whose weights the trial ends with: the last
  epoch, or the best one when early stopping restored it.
- **Pruning** uses the training loop's per-epoch progress hook (`TrainProgress.epoch_metrics`):
  each epoch's metric is reported to the trial and `TrialPruned` is raised when the pruner says so.
- **Seeds**: the sampler is seeded with `data.seed` plus the trials the study already holds, so a
  resumed study does not draw the same parameters again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from sqlalchemy import text

from domain.errors import ConfigurationError, TrainingError
from domain.spec import PipelineSpec, parse_spec
from domain.tuning_spec import TuningSpec, decoded_params, with_value
from flows.context import FlowContext
from flows.warm_start import StartingWeights
from ml.data import PreparedData
from ml.losses import Objective
from ml.training import TrainProgress, TrainResult, seed_everything, train
from ml.zoo import build_for_spec, constructor_problems
from storage import repositories as repo

try:
    import optuna

    _MISSING: ImportError | None = None
except ImportError as missing:  # an optional extra: only a spec with a tuning section needs it
    _MISSING = missing

INTERRUPTED = "interrupted"
OPTUNA_SCHEMA = "optuna"


def _require_optuna() -> None:
    if _MISSING is not None:
        raise ConfigurationError(
            "the spec has a tuning section but Optuna is not installed; install the extra: "
            "pip install 'retrainer[tuning]' (or remove tuning from the spec)"
        ) from _MISSING


@dataclass(frozen=True)
class TrialOutcome:
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None
    error: str | None = None


def trial_spec(spec: PipelineSpec, params: dict[str, Any]) -> PipelineSpec:
    """The spec with the trial's values in place and no tuning section (a trial does not search)."""
    document = {k: v for k, v in spec.to_document().items() if k != "tuning"}
    for path, value in params.items():
        document = with_value(document, path, value)
    return parse_spec(document, source=f"pipeline {spec.name} (tuning trial)", param_checker=constructor_problems)


def open_study(ctx: FlowContext, spec: PipelineSpec, run_id: str) -> optuna.study.Study:
    """The run's study in the metadata database, created or loaded; stale running trials handled."""
    _require_optuna()
    tuning = _tuning(spec)
    storage = study_storage(ctx)
    name = study_name(spec.name, run_id)
    try:
        held = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:  # no study yet: this is the run's first attempt
        held = 0
    seed = spec.data.seed + held
    sampler = (
        optuna.samplers.TPESampler(seed=seed) if tuning.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=tuning.pruner_startup_trials)
        if tuning.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        load_if_exists=True,
        direction=tuning.objective_direction,
        sampler=sampler,
        pruner=pruner,
    )
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:  # this run owns the study, so a running trial is one a killed attempt left behind
        interrupted = [*study.user_attrs.get(INTERRUPTED, []), *(t.number for t in running)]
        study.set_user_attr(INTERRUPTED, interrupted)
        for stale in running:
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(stale.params)
    return study


def study_name(pipeline: str, run_id: str) -> str:
    return f"{pipeline}-{run_id}"


def study_storage(ctx: FlowContext) -> optuna.storages.RDBStorage:
    """Optuna's storage in the metadata database. On PostgreSQL its tables (and its own Alembic
    version table) live in the schema `optuna`, apart from ours. SQLite has no schemas: there they sit
    beside ours, and Optuna's schema check is skipped because `alembic_version` is the project's."""
    _require_optuna()
    url = ctx.engine.url.render_as_string(hide_password=False)  # the driver the project ships
    if ctx.engine.dialect.name != "postgresql":
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=True)
    with ctx.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
    engine_kwargs = {"connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"}, "pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def search(
    ctx: FlowContext,
    spec: PipelineSpec,
    data: PreparedData,
    run_id: str,
    start: StartingWeights | None = None,
    *,
    trials: int | None = None,
) -> PipelineSpec:
    """Runs the study until `trials` (default: the spec's) have finished or the timeout passed, writes
    evidence["tuning"] on the run and returns the best trial's spec. TrainingError when no trial completed."""
    tuning = _tuning(spec)
    wanted = trials if trials is not None else tuning.trials
    study = open_study(ctx, spec, run_id)
    workdir = ctx.workdir(run_id)
    started = time.monotonic()
    stopped = "trials"
    while _finished(study) < wanted:
        if tuning.timeout_seconds is not None and time.monotonic() - started >= tuning.timeout_seconds:
            stopped = "timeout"
            break
        trial = study.ask()
        params = _suggest(trial, tuning)
        outcome = run_trial(spec, params, data, workdir, start, trial, number=trial.number)
        state = getattr(optuna.trial.TrialState, outcome.state)
        if outcome.error is not None:
            trial.set_user_attr("error", outcome.error)
        study.tell(trial, outcome.value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    record = tuning_record(study, tuning, stopped)
    with ctx.tx() as session:
        repo.update_run(session, run_id, evidence={"tuning": record})
    if record["best"] is None:
        raise TrainingError(
            f"tuning: none of the {len(record['trials'])} trials completed (all pruned or failed); "
            "widen or move tuning.search_space, or raise tuning.pruner_startup_trials"
        )
    return trial_spec(spec, record["best"]["params"])


@task(name="tuning-trial", task_run_name="trial-{number}", cache_policy=NO_CACHE)
def run_trial(
    spec: PipelineSpec,
    params: dict[str, Any],
    data: PreparedData,
    workdir: Path,
    start: StartingWeights | None,
    trial: optuna.trial.Trial,
    number: int,
) -> TrialOutcome:
    """Trains one configuration on the train split; its value is the validation metric. A diverging
    configuration (TrainingError: NaN loss) is a failed trial, not a failed run."""
    metric = _tuning(spec).metric
    configured = trial_spec(spec, params)
    folder = workdir / "tuning" / f"trial-{number}"
    shutil.rmtree(folder, ignore_errors=True)  # a trial never resumes: an interrupted one is rerun whole

    def prune(progress: TrainProgress) -> None:
        value = None if progress.epoch_metrics is None else progress.epoch_metrics.monitored(metric)
        if value is None:
            return
        trial.report(value, progress.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {value:.4g} at epoch {progress.epoch}")

    seed_everything(configured.data.seed)
    model = build_for_spec(configured)
    if start is not None:
        start.load_into(model, configured)
    try:
        result = train(
            model,
            data.training_data(),
            configured,
            folder,
            resume=False,
            progress=prune,
            objective=Objective.for_spec(configured),
        )
    except optuna.TrialPruned as pruned:
        get_run_logger().info("trial %d pruned: %s", number, pruned)
        return TrialOutcome("PRUNED", None)
    except TrainingError as error:
        return TrialOutcome("FAIL", None, error.message)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return TrialOutcome("COMPLETE", _final_value(result, configured, metric))


def tuning_record(study: optuna.study.Study, tuning: TuningSpec, stopped: str) -> dict[str, Any]:
    """evidence["tuning"]: the metric, the best trial and every trial (params as spec values)."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    trials = []
    for frozen in study.get_trials(deepcopy=False):
        if frozen.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING):
            continue
        duration = frozen.duration.total_seconds() if frozen.duration is not None else None
        entry: dict[str, Any] = {
            "number": frozen.number,
            "params": decoded_params(tuning, frozen.params),
            "value": frozen.value,
            "state": frozen.state.name,
            "duration_s": duration,
        }
        if frozen.state == optuna.trial.TrialState.PRUNED and frozen.intermediate_values:
            entry["pruned_at_epoch"] = max(frozen.intermediate_values)
        if "error" in frozen.user_attrs:
            entry["error"] = frozen.user_attrs["error"]
        if frozen.number in interrupted:
            entry[INTERRUPTED] = True
        trials.append(entry)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        best_trial = study.best_trial
        best = {
            "number": best_trial.number,
            "params": decoded_params(tuning, best_trial.params),
            "value": best_trial.value,
        }
    return {
        "study": study.study_name,
        "metric": tuning.metric,
        "direction": tuning.objective_direction,
        "sampler": tuning.sampler,
        "pruner": tuning.pruner,
        "stopped_by": stopped,
        "best": best,
        "trials": trials,
    }


def _tuning(spec: PipelineSpec) -> TuningSpec:
    if spec.tuning is None:
        raise ConfigurationError(f"pipeline {spec.name}: the spec has no tuning section to search")
    return spec.tuning


def _finished(study: optuna.study.Study) -> int:
    """Trials that count toward `tuning.trials`: every finished one except those a kill interrupted."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in interrupted)


def _suggest(trial: optuna.trial.Trial, tuning: TuningSpec) -> dict[str, Any]:
    """The trial's values as spec values, drawn from each range."""
    params: dict[str, Any] = {}
    for path, space in tuning.search_space.items():
        if space.type == "choice":
            params[path] = space.decode(trial.suggest_categorical(path, space.labels()))
        elif space.type == "int":
            low, high = space.bounds()
            params[path] = trial.suggest_int(path, low, high, step=int(space.step or 1))
        else:
            low, high = space.bounds()
            params[path] = trial.suggest_float(path, low, high, step=space.step, log=space.type == "loguniform")
    return params


def _final_value(result: TrainResult, spec: PipelineSpec, metric: str) -> float:
    restored = spec.hyperparameters.early_stopping is not None and result.best_epoch >= 1
    epoch = result.history[result.best_epoch - 1] if restored else result.history[-1]
    value = epoch.monitored(metric)
    if value is None:
        raise TrainingError(f"tuning.metric: {metric} was not recorded; the validation split is empty")
    return value
