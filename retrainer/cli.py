"""The `retrainer` command line (CONTRACT section 5).

Commands that later issues add (serve, pipelines validate, publish, trigger) are not registered
until they really work; `retrainer --help` lists what exists now.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer import exceptions as typer_exceptions
from typer._click import exceptions as click_exceptions  # typer 0.29 bundles its own click

from domain.errors import RetrainerError
from domain.settings import Settings, load_settings
from retrainer.logs import setup_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(
    help="Retrainer: event-driven retraining, gating and canary rollouts for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The metadata database.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True)
pipelines_app = typer.Typer(help="Pipeline specs.", no_args_is_help=True)
runs_app = typer.Typer(help="Pipeline runs and their decision records.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions and the champion alias.", no_args_is_help=True)
datasets_app = typer.Typer(help="Dataset versions.", no_args_is_help=True)
publish_app = typer.Typer(help="Publish events to Kafka.", no_args_is_help=True)
rollout_app = typer.Typer(help="Canary rollouts: watch, run the controller, abort, promote.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
app.add_typer(publish_app, name="publish")
app.add_typer(runs_app, name="runs")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(db_app, name="db")
app.add_typer(apikey_app, name="apikey")
app.add_typer(pipelines_app, name="pipelines")

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    return settings


@contextmanager
def _unit_of_work() -> Iterator[Session]:
    """Settings, logging and one database transaction: what most commands need."""
    from retrainer import wiring
    from storage.db import transaction

    with transaction(wiring.sessions(_settings())) as session:
        yield session


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to.")] = "head") -> None:
    """Apply the Alembic migrations to RETRAINER_DATABASE_URL."""
    from retrainer import wiring

    settings = _settings()
    wiring.upgrade_database(settings, revision)
    out.print(f"database {wiring.redacted_db(settings)} is at revision {wiring.current_revision(settings)}")


@apikey_app.command("create")
def apikey_create(name: Annotated[str, typer.Argument(help="Who or what the key is for, e.g. ci-bot.")]) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from storage import repositories as repo

    with _unit_of_work() as session:
        key, plaintext = repo.create_api_key(session, name)
    err.print(f"API key {key.name!r} created; it is shown once, store it now:")
    out.print(plaintext, highlight=False, soft_wrap=True)


@pipelines_app.command("validate")
def pipelines_validate(files: Annotated[list[Path], typer.Argument(help="Spec files (YAML or JSON).")]) -> None:
    """Validate pipeline specs: exit 0, or exit 2 with one line per problem (FILE: key.path: message)."""
    from domain.errors import SpecError
    from domain.spec import load_spec
    from ml.zoo import constructor_problems

    problems: list[str] = []
    for path in files:
        try:
            spec = load_spec(path, constructor_problems)
        except SpecError as e:
            problems += e.problems
        else:
            out.print(f"{path}: ok (pipeline {spec.name}, dataset {spec.dataset})", highlight=False)
    for line in problems:
        err.print(line, highlight=False, soft_wrap=True, markup=False)
    if problems:
        raise typer.Exit(2)


@pipelines_app.command("sync")
def pipelines_sync() -> None:
    """Validate every spec in RETRAINER_PIPELINES_DIR and register it (exit 2 listing problems)."""
    from flows.registry import load_specs, sync_pipelines
    from retrainer import wiring
    from storage.db import transaction

    settings = _settings()
    specs = load_specs(settings.pipelines_dir)
    with transaction(wiring.sessions(settings)) as session:
        registered = sync_pipelines(session, specs)
    for pipeline in registered:
        out.print(f"registered {pipeline.name} (dataset {pipeline.dataset})", highlight=False)


@pipelines_app.command("deploy")
def pipelines_deploy(
    pool: Annotated[str, typer.Option(help="Prefect work pool (type process; created if missing).")] = "retrainer",
) -> None:
    """Validate and register every spec, then make each pipeline's Prefect deployment
    (`retrainer-pipeline/NAME`, the spec's cron) on a work pool, for `prefect worker start --pool`
    processes to run. For a split deployment (compose, Kubernetes); `retrainer serve` needs none of it."""
    from flows.registry import deploy_to_work_pool, load_specs, sync_pipelines
    from retrainer import wiring
    from storage.db import transaction

    settings = _settings()
    specs = load_specs(settings.pipelines_dir)
    with transaction(wiring.sessions(settings)) as session:
        sync_pipelines(session, specs)
    for name in deploy_to_work_pool(specs, pool):
        out.print(f"deployment {name} on work pool {pool}", highlight=False)


@pipelines_app.command("list")
def pipelines_list() -> None:
    """Registered pipelines and their champions."""
    from storage import repositories as repo

    table = Table("pipeline", "dataset", "champion", "frozen until")
    with _unit_of_work() as session:
        for pipeline in repo.list_pipelines(session):
            champion = repo.get_champion(session, pipeline.name)
            frozen = pipeline.frozen_until.isoformat() if pipeline.frozen_until else ""
            table.add_row(pipeline.name, pipeline.dataset, f"v{champion.version}" if champion else "-", frozen)
    out.print(table)


@pipelines_app.command("freeze")
def pipelines_freeze(
    name: Annotated[str, typer.Argument(help="Pipeline name.")],
    until: Annotated[str, typer.Option(help="ISO time with zone, e.g. 2026-12-24T00:00:00Z.")],
    reason: Annotated[str, typer.Option(help="Why promotions are held.")],
) -> None:
    """Hold automatic promotions until a time (gates still run and record their verdicts)."""
    from datetime import datetime

    from flows import champion

    moment = datetime.fromisoformat(until.replace("Z", "+00:00"))
    with _unit_of_work() as session:
        champion.freeze(session, name, until=moment)
    out.print(f"{name}: promotions frozen until {moment.isoformat()} ({reason})", highlight=False)


@pipelines_app.command("unfreeze")
def pipelines_unfreeze(name: Annotated[str, typer.Argument(help="Pipeline name.")]) -> None:
    """Lift a promotion freeze."""
    from flows import champion

    with _unit_of_work() as session:
        champion.freeze(session, name, until=None)
    out.print(f"{name}: promotions allowed again", highlight=False)


@datasets_app.command("add")
def datasets_add(
    dataset: Annotated[str, typer.Argument(help="Dataset name (a spec's `dataset`).")],
    version: Annotated[str, typer.Argument(help="Version label, e.g. v3.")],
    uri: Annotated[str, typer.Argument(help="file:// or s3:// URI of the data.")],
) -> None:
    """Record a dataset version (what a data-changed event does), for manual and scheduled runs."""
    from storage import repositories as repo

    with _unit_of_work() as session:
        recorded = repo.record_dataset_version(session, dataset, version, uri)
    out.print(f"{recorded.dataset} {recorded.version}: {recorded.uri}", highlight=False)


@app.command("run")
def run_now(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    reason: Annotated[str, typer.Option(help="Why this run.")] = "manual run from the CLI",
) -> None:
    """Run a pipeline here and now on its dataset's latest version (a manual trigger, in-process)."""
    import json

    from domain.entities import TriggerKind
    from flows.pipeline import run_pipeline
    from flows.registry import load_specs, sync_pipelines
    from retrainer import wiring
    from storage import repositories as repo
    from storage.db import transaction

    settings = _settings()
    with transaction(wiring.sessions(settings)) as session:
        sync_pipelines(session, load_specs(settings.pipelines_dir))
        run, _ = repo.create_run(session, pipeline, TriggerKind.MANUAL, reason=reason)
    err.print(f"run {run.id} started")
    with out.status(f"running {pipeline}…"):
        outcome = run_pipeline(pipeline, run.id)
    out.print(json.dumps(outcome), highlight=False)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole decision record as JSON.")] = False,
) -> None:
    """A run's decision record: events, data, candidate vs champion, gate verdicts, outcome."""
    import json

    from storage import repositories as repo

    with _unit_of_work() as session:
        record = repo.decision_record(session, run_id)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    decision = record["decision"]
    out.print(f"run {record['run_id']} · {record['pipeline']} · {record['trigger']['kind']} · {record['status']}")
    if decision["dataset"]:
        out.print(f"dataset {decision['dataset']['dataset']} {decision['dataset']['version']}", highlight=False)
    table = Table("check", "metric", "verdict", "reason")
    for verdict in decision["gate"]:
        table.add_row(verdict["check"], verdict["metric"], verdict["verdict"], verdict["reason"])
    out.print(table)
    if decision["outcome"]:
        out.print(f"outcome: {decision['outcome']['status']} — {decision['outcome']['reason']}", highlight=False)
    if record["error"]:
        out.print(f"error: {record['error']}", highlight=False)


@runs_app.command("list")
def runs_list(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
) -> None:
    """Recent runs, newest first."""
    from storage import repositories as repo

    table = Table("run", "pipeline", "trigger", "status", "created")
    with _unit_of_work() as session:
        for run in repo.list_runs(session, pipeline, limit):
            table.add_row(
                run.id,
                run.pipeline,
                run.trigger_kind.value,
                run.status.value,
                run.created_at.isoformat(timespec="seconds"),
            )
    out.print(table)


@models_app.command("list")
def models_list(pipeline: Annotated[str, typer.Argument(help="Pipeline name.")]) -> None:
    """A pipeline's model versions with their stage."""
    from storage import repositories as repo

    table = Table("version", "stage", "accuracy", "sha256", "run")
    with _unit_of_work() as session:
        for version in repo.list_model_versions(session, pipeline):
            accuracy = version.metrics.get("accuracy")
            table.add_row(
                f"v{version.version}",
                version.stage.value,
                f"{accuracy:.4f}" if accuracy else "-",
                version.sha256[:12],
                version.run_id or "-",
            )
    out.print(table)


@models_app.command("promote")
def models_promote(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    version: Annotated[int, typer.Argument(help="Model version number to make champion.")],
    reason: Annotated[str, typer.Option(help="Required justification (recorded in alias_history).")],
    actor: Annotated[str, typer.Option(help="Who is doing this.")] = "cli",
) -> None:
    """Force-promote a version past the gate, with a justification."""
    from flows import champion

    with _unit_of_work() as session:
        move = champion.force_promote(session, pipeline, version, actor=actor, reason=reason)
    out.print(f"{pipeline}: champion is now v{version} (alias move {move.id}, by {move.actor})", highlight=False)


@models_app.command("rollback")
def models_rollback(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    reason: Annotated[str, typer.Option(help="Required justification (recorded in alias_history).")],
    to: Annotated[int | None, typer.Option(help="Earlier champion version; default: the previous one.")] = None,
    actor: Annotated[str, typer.Option(help="Who is doing this.")] = "cli",
) -> None:
    """Roll the champion back to an earlier champion; the current one becomes rolled_back."""
    from flows import champion
    from storage import repositories as repo

    with _unit_of_work() as session:
        move = champion.rollback(session, pipeline, to_version=to, actor=actor, reason=reason)
        target = repo.get_model_version_by_id(session, move.to_version_id or 0)
    out.print(f"{pipeline}: champion rolled back to v{target.version} (by {move.actor})", highlight=False)


@rollout_app.command("show")
def rollout_show(pipeline: Annotated[str, typer.Argument(help="Pipeline name.")]) -> None:
    """The current or last rollout: each step's traffic, verdict and the reason of its last analysis."""
    from storage import repositories as repo

    with _unit_of_work() as session:
        rollout = repo.latest_rollout(session, pipeline)
        if rollout is None:
            raise RetrainerError(f"{pipeline} has had no canary rollout yet")
        candidate = repo.get_model_version_by_id(session, rollout.candidate_version_id).version
    table = Table("step", "traffic %", "verdict", "windows", "reason", title=f"{pipeline} rollout {rollout.id}")
    for step in rollout.steps:
        attempts = step.analysis.get("attempts", [])
        verdict = step.verdict.value if step.verdict else ("open" if step.finished_at is None else "-")
        table.add_row(
            str(step.step_index + 1),
            f"{step.traffic_percent:g}",
            verdict,
            str(len(attempts)),
            str(step.analysis.get("reason") or "-"),
        )
    out.print(table)
    out.print(f"candidate v{candidate}: {rollout.status.value} {rollout.reason or ''}", highlight=False)


@rollout_app.command("run")
def rollout_run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    serving_url: Annotated[
        str | None, typer.Option(help="Model server base URL; default RETRAINER_SERVING_URL or its address.")
    ] = None,
) -> None:
    """Run the canary controller for the pipeline's active rollout until it is promoted or rolled
    back (resumes at the stored step after a restart)."""
    from flows.canary import canary_rollout

    _settings()
    result = canary_rollout(pipeline, serving_url=serving_url)
    out.print(f"{pipeline}: rollout {result.get('status') or 'none'}: {result.get('reason')}", highlight=False)


@rollout_app.command("supervise")
def rollout_supervise(
    serving_url: Annotated[
        str | None, typer.Option(help="Model server base URL; default RETRAINER_SERVING_URL or its address.")
    ] = None,
) -> None:
    """Run a canary controller for every active rollout, now and as they start, until SIGTERM or
    Ctrl-C (what `retrainer serve` does in-process; one per deployment)."""
    import threading

    from flows.canary import supervise_rollouts
    from retrainer import wiring
    from retrainer.service import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    settings = _settings()
    stop = threading.Event()
    err.print("supervising canary rollouts (Ctrl-C to stop)", highlight=False)
    try:
        supervise_rollouts(wiring.sessions(settings), serving_url, stop)
    except KeyboardInterrupt:
        stop.set()
        err.print("stopped", highlight=False)


@rollout_app.command("abort")
def rollout_abort(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    reason: Annotated[str, typer.Option(help="Required justification (stored on the rollout).")],
    actor: Annotated[str, typer.Option(help="Who is doing this.")] = "cli",
) -> None:
    """Abort the active rollout: canary traffic 0 now, candidate rolled_back, champion untouched."""
    from flows import champion

    with _unit_of_work() as session:
        rollout = champion.abort_rollout(session, pipeline, actor=actor, reason=reason)
    out.print(f"{pipeline}: rollout {rollout.id} {rollout.status.value}: {rollout.reason}", highlight=False)


@rollout_app.command("promote")
def rollout_promote(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    reason: Annotated[str, typer.Option(help="Required justification (stored on the rollout and alias_history).")],
    actor: Annotated[str, typer.Option(help="Who is doing this.")] = "cli",
) -> None:
    """Promote the active rollout's candidate now, without waiting for the remaining steps."""
    from flows import champion

    with _unit_of_work() as session:
        rollout = champion.promote_rollout(session, pipeline, actor=actor, reason=reason)
    out.print(f"{pipeline}: rollout {rollout.id} {rollout.status.value}: {rollout.reason}", highlight=False)


@publish_app.command("data-changed")
def publish_data_changed(
    dataset: Annotated[str, typer.Option(help="Dataset name (data.dataset).")],
    uri: Annotated[str, typer.Option(help="file:// or s3:// URI of the new data (data.uri).")],
    version: Annotated[str | None, typer.Option(help="Version label (data.version).")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="CloudEvent id (idempotency key); default: new.")] = None,
    rows: Annotated[int | None, typer.Option(help="Row count (data.rows).")] = None,
) -> None:
    """Publish one data-change CloudEvent (structured mode) to the data-change topic."""
    from consumers.publisher import data_changed_event
    from consumers.publisher import publish_data_changed as publish

    settings = _settings()
    event = data_changed_event(dataset, uri, version=version, rows=rows, event_id=event_id)
    published = publish(settings.kafka_bootstrap_servers, settings.kafka_topic, event)
    out.print(f"published {published} to {settings.kafka_topic}", highlight=False)


@app.command("consume")
def consume(
    max_records: Annotated[int, typer.Option(help="Records per poll batch.")] = 500,
) -> None:
    """Run the Kafka consumer: data-change events into the inbox, invalid ones to the DLQ."""
    from consumers.consumer import DataChangeConsumer
    from retrainer import wiring

    settings = _settings()
    consumer = DataChangeConsumer(settings, wiring.sessions(settings), max_records=max_records)
    consumer.install_signal_handlers()
    err.print(f"consuming {settings.kafka_topic} as group {settings.kafka_consumer_group}")
    consumer.run_forever()


@app.command("triggers")
def triggers(
    interval: Annotated[float, typer.Option(help="Seconds between debouncer passes.")] = 1.0,
    once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False,
    submit: Annotated[bool, typer.Option(help="Submit flow runs to the pipelines' Prefect deployments.")] = True,
) -> None:
    """Run the debouncer: pending events become one run per pipeline per window."""
    import signal
    import threading

    from flows.triggers import prefect_submitter, process_pending_events
    from retrainer import wiring

    settings = _settings()
    sessions = wiring.sessions(settings)
    submitter = prefect_submitter() if submit else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while True:
        for result in process_pending_events(sessions, submitter):
            if result.created:
                err.print(f"run {result.run.id} for {result.run.pipeline} ({len(result.run.event_ids)} events)")
        if once or stop.wait(interval):
            return


@app.command("trigger")
def trigger(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    reason: Annotated[str | None, typer.Option(help="Why this run (recorded with it).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run has a final status.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600,
) -> None:
    """Manual trigger through the HTTP API (needs RETRAINER_API_KEY)."""
    import json

    from api.client import RetrainerClient
    from domain.errors import ConfigurationError

    settings = _settings()
    if settings.api_key is None:
        raise ConfigurationError("RETRAINER_API_KEY is not set; create one with `retrainer apikey create NAME`")
    client = RetrainerClient(settings.api_address, settings.api_key.get_secret_value())
    answer = client.trigger(pipeline, reason=reason)
    out.print(json.dumps(answer), highlight=False)
    if wait:
        with out.status(f"waiting for run {answer['run_id']}…"):
            final = client.wait(answer["run_id"], timeout_s=timeout)
        out.print(f"run {final['run_id']}: {final['status']}", highlight=False)


@app.command("api")
def api() -> None:
    """Run the HTTP API on RETRAINER_API_ADDRESS (submits runs to the pipelines' Prefect deployments)."""
    from api.app import create_app
    from api.server import serve_api
    from flows.triggers import prefect_submitter
    from retrainer import wiring

    settings = _settings()
    app_ = create_app(sessions=wiring.sessions(settings), settings=settings, submit=prefect_submitter())
    serve_api(app_, settings.api_address)


@app.command("serve")
def serve() -> None:
    """Run the whole service: HTTP API, Kafka consumer, trigger service, Prefect (a local server
    unless PREFECT_API_URL is set, and a runner with each pipeline's deployment and schedule), the
    model server and the canary controller. /healthz on the API reports every part; SIGTERM stops all."""
    from retrainer.service import Running, serve_forever

    settings = _settings()

    def ready(running: Running) -> None:
        err.print(
            f"retrainer is serving: API {running.api_url}, models {running.serving_url}, "
            f"Prefect {running.prefect_api_url}",
            highlight=False,
        )

    serve_forever(settings, on_ready=ready)


@app.command("serve-models")
def serve_models_command(
    refresh: Annotated[float, typer.Option(help="Seconds between reloads of champions from the database.")] = 10.0,
) -> None:
    """Run the model server (Open Inference Protocol v2) on RETRAINER_SERVING_ADDRESS with each
    pipeline's champion from the metadata database, reloading when the champion moves."""
    from retrainer import wiring
    from serving.app import create_serving_app
    from serving.loader import MetadataFollower
    from serving.registry import ModelRegistry
    from serving.server import serve_models, tune_process

    settings = _settings()
    tune_process(settings.serving_torch_threads)
    follower = MetadataFollower(ModelRegistry(), wiring.sessions(settings), wiring.artifact_store(settings))
    for pipeline, what in follower.sync().items():
        err.print(f"{pipeline}: {what}", highlight=False)
    follower.start(refresh)
    try:
        serve_models(create_serving_app(follower.registry, reload=follower.sync), settings.serving_address)
    finally:
        follower.stop()


@app.command("check")
def check() -> None:
    """Check that the database, artifact store and Kafka answer; exit 1 naming what does not."""
    from retrainer import wiring

    settings = _settings()
    failed = False
    for name, _setting, probe in wiring.dependency_probes(settings):
        try:
            line = f"[green]ok[/green]     {name:<10} {probe()}"
        except RetrainerError as e:
            failed = True
            line = f"[red]failed[/red] {name:<10} {e}"
        out.print(line, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command("demo")
def demo() -> None:
    """The whole story on embedded defaults through the running service: events on Kafka, the gate,
    a canary under live traffic promoted, a poisoned dataset rejected, a slow candidate rolled back;
    ends with a table and a self-contained HTML report."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from retrainer import demo as story
    from retrainer import wiring
    from retrainer.report import write_report
    from retrainer.service import exit_cleanly_on_sigterm, running_service

    exit_cleanly_on_sigterm()
    started = time.perf_counter()
    home = story.fresh_home(Path(load_settings().home_dir).resolve() / "demo")
    story.apply_environment(story.demo_environment(home))
    settings = _settings()
    with out.status("preparing: digits data, Kafka…"):
        from ml.demo_data import digits_versions

        data = digits_versions(home / "data")
        story.write_spec(settings.pipelines_dir, story.spec_for(story.ACTS[0]))
        out.print(story.ensure_kafka(settings), highlight=False)
        story.create_topics(settings)
    with out.status("starting the service: Prefect server and runner, model server, API, consumer…"):
        service = running_service(settings)
        running = service.__enter__()
    try:
        out.print(
            f"service up: API {running.api_url}, models {running.serving_url}, Prefect {running.prefect_api_url}",
            highlight=False,
        )
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=out) as bar:
            tasks = {act.key: bar.add_task(f"{act.key}: {act.story}", start=False) for act in story.ACTS}

            def progress(key: str, text: str) -> None:
                bar.start_task(tasks[key])
                act = next(a for a in story.ACTS if a.key == key)
                bar.update(tasks[key], description=f"[bold]{key}[/bold] {act.story}: {text}")

            results = story.run_story(
                settings,
                wiring.sessions(settings),
                serving_url=running.serving_url,
                data={key: path.resolve().as_uri() for key, path in data.items()},
                traffic_rows=data["v2"],
                progress=progress,
            )
            for task in tasks.values():
                bar.stop_task(task)
    finally:
        service.__exit__(None, None, None)
        story.delete_topics(settings)
    report = write_report(wiring.sessions(settings), home / "report.html")
    table = Table(title="Runs and decisions")
    for column in ("act", "expected", "status", "model", "seconds", "served (version: requests)", "reason"):
        table.add_column(column, overflow="fold")
    unexpected = []
    for result in results:
        ok = result.status == result.act.expect
        if not ok:
            unexpected.append(result.act.key)
        table.add_row(
            f"{result.act.key}: {result.act.story}",
            result.act.expect,
            f"[green]{result.status}[/green]" if ok else f"[red]{result.status}[/red]",
            f"v{result.model_version}" if result.model_version else "-",
            f"{result.seconds:.0f}",
            ", ".join(f"v{v}: {n}" for v, n in sorted(result.traffic.items())) or "-",
            result.reason,
        )
    out.print(table)
    out.print(f"decision records: retrainer runs show RUN_ID --json  (e.g. {results[-1].run_id})", highlight=False)
    out.print(f"report: {report}", highlight=False)
    out.print(f"demo finished in {time.perf_counter() - started:.1f} s; state under {home}", highlight=False)
    if unexpected:
        raise RetrainerError(f"the story did not go as expected for {', '.join(unexpected)}; see the report")


def main() -> None:
    """Entry point: RetrainerErrors become one line on stderr and exit 1, never a traceback."""
    try:
        # standalone_mode=False: click returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer_exceptions.Exit as e:
        sys.exit(e.exit_code)
    except typer_exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click_exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except RetrainerError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2 if e.code in ("invalid_input", "unsafe_artifact_key") else 1)
