"""Pipelines from spec files: load and validate them all, register them, build their deployments.

Each pipeline is a Prefect deployment named after it, running `run_pipeline` with the spec's
cron schedule (if any) and tagged with the pipeline's name. A changed schedule takes effect when
the deployments are built again (on restart of `retrainer serve`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from sqlalchemy.orm import Session

from domain.canary_power import spec_power_problems
from domain.entities import Pipeline
from domain.errors import SpecError
from domain.spec import PipelineSpec, load_spec
from ml.callbacks import training_parts_problems
from ml.loaders import loader_problems
from ml.losses import loss_problems
from ml.zoo import constructor_problems
from storage import repositories as repo

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def validate_spec_file(path: Path) -> PipelineSpec:
    """One spec file, validated: its schema and semantics (`load_spec`), that a loss, a data.loader, an
    optimizer (with its optimizer_params) and callbacks named by import path resolve, that a model
    asked for gradient checkpointing has the hook (`ml/callbacks.py`), and whether its canary policy
    can measure its own thresholds (`domain.canary_power`: each check's threshold must lie outside
    the sampling noise of the policy's windows). SpecError lists every problem."""
    spec = load_spec(path, constructor_problems)
    problems = (
        loss_problems(spec.hyperparameters, spec.task, spec.hyperparameters.huber_delta)
        + loader_problems(spec.data)
        + training_parts_problems(spec)
    )
    problems += spec_power_problems(spec)
    if problems:
        raise SpecError([f"{path}: {line}" for line in problems])
    return spec


def load_specs(directory: Path) -> list[PipelineSpec]:
    """Every spec in `directory`, validated; SpecError lists every problem of every file at once."""
    if not directory.is_dir():
        raise SpecError([f"{directory}: pipelines folder not found (set RETRAINER_PIPELINES_DIR)"])
    problems: list[str] = []
    specs: dict[str, tuple[Path, PipelineSpec]] = {}
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in SPEC_SUFFIXES):
        try:
            spec = validate_spec_file(path)
        except SpecError as e:
            problems += e.problems
            continue
        if spec.name in specs:
            problems.append(f"{path}: name: pipeline {spec.name!r} is already defined in {specs[spec.name][0]}")
            continue
        specs[spec.name] = (path, spec)
    if problems:
        raise SpecError(problems)
    return [spec for _, spec in specs.values()]


def sync_pipelines(session: Session, specs: list[PipelineSpec]) -> list[Pipeline]:
    """Registers each spec (or updates it); the champion alias is untouched."""
    return [repo.upsert_pipeline(session, spec.name, spec.dataset, spec.to_document()) for spec in specs]


def deployments(specs: list[PipelineSpec], *, module_entrypoint: bool = False) -> list[RunnerDeployment]:
    """One deployment per pipeline. `module_entrypoint`: the flow is found by module path (for
    work-pool workers, which run flows from a temporary folder and import the installed package)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import run_pipeline

    built: list[RunnerDeployment] = []
    for spec in specs:
        schedule = spec.triggers.schedule
        deployment = run_pipeline.to_deployment(
            name=spec.name,
            schedules=[Cron(schedule.cron, timezone=schedule.timezone)] if schedule else [],
            parameters={"pipeline": spec.name},
            tags=[f"pipeline:{spec.name}"],
            description=f"Retrain {spec.name} on dataset {spec.dataset}",
            entrypoint_type=EntrypointType.MODULE_PATH if module_entrypoint else EntrypointType.FILE_PATH,
        )
        built.append(cast("RunnerDeployment", deployment))  # sync call: never the coroutine
    return built


def deploy_to_work_pool(specs: list[PipelineSpec], work_pool: str, *, heartbeat_s: int) -> list[str]:
    """Registers each pipeline's deployment on `work_pool` (a `process` pool, created if missing),
    where `prefect worker start --pool …` processes pick its runs up, each flow run beating every
    `heartbeat_s` (the interval the run reconciler expects, flows/reconcile.py). Returns the
    deployment names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(work_pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
    for deployment in deployments(specs, module_entrypoint=True):
        deployment.job_variables = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}}
        deployment.apply(work_pool_name=work_pool)
    return [f"retrainer-pipeline/{spec.name}" for spec in specs]
