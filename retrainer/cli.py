"""The `retrainer` command line (CONTRACT section 5): the administrative commands, `serve` and
`demo`; the long-running commands of a split deployment are in `retrainer/processes.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from typer import exceptions as typer_exceptions
from typer._click import exceptions as click_exceptions  # typer 0.29 bundles its own click

if TYPE_CHECKING:
    from domain.entities import Rollout

from domain.errors import InvalidInputError, RetrainerError
from retrainer import approvals_cli, processes
from retrainer.console import err, out, print_decisive_checks
from retrainer.console import settings as _settings
from retrainer.console import unit_of_work as _unit_of_work

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

processes.register(app, rollout_app)
approvals_cli.register(runs_app)

PipelineName = Annotated[str, typer.Argument(help="Pipeline name.")]
Actor = Annotated[str, typer.Option(help="Who is doing this.")]
AliasReason = Annotated[str, typer.Option(help="Required justification (recorded in alias_history).")]
RolloutReason = Annotated[str, typer.Option(help="Required justification (stored on the rollout and alias_history).")]


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to.")] = "head") -> None:
    """Apply the Alembic migrations to RETRAINER_DATABASE_URL."""
    from retrainer import wiring

    settings = _settings()
    wiring.upgrade_database(settings, revision)
    out.print(f"database {wiring.redacted_db(settings)} is at revision {wiring.current_revision(settings)}")


ScopeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--scope",
        help="What the key may do, repeatable: read, trigger, operate (approvals, rollouts, freezes, champion "
        "moves; the model server's stats and load), admin, infer, feedback. Default: read only.",
    ),
]
KeyName = Annotated[str, typer.Argument(help="The key's name, as given at `retrainer apikey create`.")]


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for, e.g. ci-bot.")], scope: ScopeOption = None
) -> None:
    """Create an API key with its scopes and print it once (only its hash is stored)."""
    from domain.apikeys import DEFAULT_SCOPES, format_scopes
    from storage import repositories as repo

    with _unit_of_work() as session:
        key, plaintext = repo.create_api_key(session, name, scope or DEFAULT_SCOPES)
    err.print(f"API key {key.name!r} ({format_scopes(key.scopes)}) created; it is shown once, store it now:")
    out.print(plaintext, highlight=False, soft_wrap=True)


@apikey_app.command("list")
def apikey_list() -> None:
    """Every API key: name, scopes, when created, last used (by the HTTP API) and revoked."""
    from domain.apikeys import format_scopes
    from storage import repositories as repo

    with _unit_of_work() as session:
        keys = repo.list_api_keys(session)
    table = Table("name", "prefix", "scopes", "created", "last used", "revoked")
    for key in keys:
        moments = (key.created_at, key.last_used_at, key.revoked_at)
        when = [moment.isoformat(timespec="seconds") if moment else "-" for moment in moments]
        table.add_row(key.name, key.prefix, format_scopes(key.scopes), *when)
    out.print(table)


@apikey_app.command("revoke")
def apikey_revoke(name: KeyName) -> None:
    """Revoke an API key: refused (401) from the next request on, by the API and the model servers."""
    from storage import repositories as repo

    with _unit_of_work() as session:
        key = repo.revoke_api_key(session, name)
    out.print(f"API key {key.name!r} revoked", highlight=False)


@pipelines_app.command("validate")
def pipelines_validate(files: Annotated[list[Path], typer.Argument(help="Spec files (YAML or JSON).")]) -> None:
    """Validate pipeline specs (schema, semantics, and a canary policy's power: each threshold must lie
    outside its windows' sampling noise): exit 0, or exit 2 with one line per problem
    (FILE: key.path: message, e.g. the `canary.min_requests` that would make the policy sound)."""
    from domain.errors import SpecError
    from flows.registry import validate_spec_file

    problems: list[str] = []
    for path in files:
        try:
            spec = validate_spec_file(path)
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
    for name in deploy_to_work_pool(specs, pool, heartbeat_s=settings.run_heartbeat_s):
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


@pipelines_app.command("show")
def pipelines_show(name: PipelineName) -> None:
    """A pipeline's champion and the model-server replicas serving it: what each serves (champion,
    canary and weight, since when) and how long ago it was heard (missing: silent, not stopped)."""
    from datetime import UTC, datetime, timedelta

    from storage import repositories as repo

    now = datetime.now(UTC)
    with _unit_of_work() as session:
        pipeline = repo.get_pipeline(session, name)
        champion = repo.get_champion(session, name)
        replicas = repo.serving_replicas(session, heard_since=now - timedelta(hours=1), pipeline=name)
    out.print(
        f"{pipeline.name} (dataset {pipeline.dataset}): champion {f'v{champion.version}' if champion else 'none yet'}",
        highlight=False,
    )
    table = Table("replica", "address", "champion", "canary", "weight %", "since", "heard", "state")
    for replica in replicas:
        served = replica.serving[name]
        since = served.since.isoformat(timespec="seconds") if served.since else "-"
        table.add_row(
            replica.replica, replica.address or "-", served.champion_version or "-", served.canary_version or "-",
            f"{served.canary_weight:g}", since, f"{replica.heartbeat_age_s(now):.1f} s ago", replica.state(now),
        )  # fmt: skip
    out.print(table if replicas else "no model-server replica has reported serving it in the last hour")


@pipelines_app.command("freeze")
def pipelines_freeze(
    name: PipelineName,
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
def pipelines_unfreeze(name: PipelineName) -> None:
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
    pipeline: PipelineName,
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
        # this process runs it: claimed, so a trigger service on the same database does not submit it too
        repo.claim_submission(session, run.id)
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

    from flows.records import decision_record

    with _unit_of_work() as session:
        record = decision_record(session, run_id)
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
def models_list(pipeline: PipelineName) -> None:
    """A pipeline's model versions with their stage and their task's quality metrics (a classifier's
    accuracy, ...; a regression model's rmse, mae, r2, mape)."""
    from storage import repositories as repo
    from web.render import metric
    from web.views import model_metric_columns

    def cell(value: object, name: str) -> str:
        return metric(float(value), name) if isinstance(value, int | float) else "-"

    with _unit_of_work() as session:
        pipeline_task = repo.get_pipeline(session, pipeline).spec.get("task")
        versions = repo.list_model_versions(session, pipeline)
    columns = model_metric_columns(pipeline_task, [(v.manifest.get("task"), v.metrics) for v in versions])
    table = Table("version", "stage", *columns, "sha256", "run")
    for version in versions:
        table.add_row(
            f"v{version.version}",
            version.stage.value,
            *(cell(version.metrics.get(name), name) for name in columns),
            version.sha256[:12],
            version.run_id or "-",
        )
    out.print(table)


@models_app.command("promote")
def models_promote(
    pipeline: PipelineName,
    version: Annotated[int, typer.Argument(help="Model version number to make champion.")],
    reason: AliasReason,
    actor: Actor = "cli",
) -> None:
    """Force-promote a version past the gate, with a justification."""
    from flows import champion

    with _unit_of_work() as session:
        move = champion.force_promote(session, pipeline, version, actor=actor, reason=reason)
    out.print(f"{pipeline}: champion is now v{version} (alias move {move.id}, by {move.actor})", highlight=False)


@models_app.command("rollback")
def models_rollback(
    pipeline: PipelineName,
    reason: AliasReason,
    to: Annotated[int | None, typer.Option(help="Earlier champion version; default: the previous one.")] = None,
    actor: Actor = "cli",
) -> None:
    """Roll the champion back to an earlier champion; the current one becomes rolled_back."""
    from flows import champion
    from storage import repositories as repo

    with _unit_of_work() as session:
        move = champion.rollback(session, pipeline, to_version=to, actor=actor, reason=reason)
        target = repo.get_model_version_by_id(session, move.to_version_id or 0)
    out.print(f"{pipeline}: champion rolled back to v{target.version} (by {move.actor})", highlight=False)


@rollout_app.command("show")
def rollout_show(pipeline: PipelineName) -> None:
    """The current or last rollout: each step's traffic, verdict and the reason of its last analysis,
    then the checks of its latest window (outcome, statistic and limit, interval or p, alpha, n)."""
    from storage import repositories as repo

    with _unit_of_work() as session:
        rollout = repo.latest_rollout(session, pipeline)
        if rollout is None:
            raise RetrainerError(f"{pipeline} has had no canary rollout yet")
        candidate = repo.get_model_version_by_id(session, rollout.candidate_version_id).version
    table = Table("step", "traffic %", "verdict", "windows", "reason", title=f"{pipeline} rollout {rollout.id}")
    for step in rollout.steps:
        verdict = step.verdict.value if step.verdict else ("open" if step.finished_at is None else "-")
        table.add_row(
            str(step.step_index + 1),
            f"{step.traffic_percent:g}",
            verdict,
            str(len(step.analysis.attempts)),
            step.analysis.reason or "-",
        )
    out.print(table)
    print_decisive_checks(rollout)
    latest = next((step.analysis.decisive for step in reversed(rollout.steps) if step.analysis.decisive), None)
    if latest is not None and latest.replicas:
        shares = ", ".join(f"{r.replica} {r.canary_requests}+{r.champion_requests}" for r in latest.replicas)
        missing = f"; missing: {', '.join(latest.missing_replicas)}" if latest.missing_replicas else ""
        out.print(f"latest window by replica (canary+champion requests): {shares}{missing}", highlight=False)
    out.print(f"candidate v{candidate}: {rollout.status.value} {rollout.reason or ''}", highlight=False)


@rollout_app.command("abort")
def rollout_abort(pipeline: PipelineName, reason: RolloutReason, actor: Actor = "cli") -> None:
    """Abort the active rollout: canary traffic 0 now, candidate rolled_back, champion untouched."""
    from flows.champion import abort_rollout

    _rollout_override(abort_rollout, pipeline, actor, reason)


@rollout_app.command("promote")
def rollout_promote(pipeline: PipelineName, reason: RolloutReason, actor: Actor = "cli") -> None:
    """Promote the active rollout's candidate now, without waiting for the remaining steps."""
    from flows.champion import promote_rollout

    _rollout_override(promote_rollout, pipeline, actor, reason)


def _rollout_override(action: Callable[..., Rollout], pipeline: str, actor: str, reason: str) -> None:
    with _unit_of_work() as session:
        rollout = action(session, pipeline, actor=actor, reason=reason)
    out.print(f"{pipeline}: rollout {rollout.id} {rollout.status.value}: {rollout.reason}", highlight=False)


@publish_app.command("data-changed")
def publish_data_changed(
    dataset: Annotated[str, typer.Option(help="Dataset name (data.dataset).")],
    uri: Annotated[str, typer.Option(help="file:// or s3:// URI of the new data (data.uri).")],
    version: Annotated[str | None, typer.Option(help="Version label (data.version).")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="CloudEvent id (idempotency key); default: new.")] = None,
    rows: Annotated[int | None, typer.Option(help="Row count (data.rows).")] = None,
    traceparent: Annotated[
        bool,
        typer.Option(
            "--traceparent",
            help="Start a trace even when tracing is off (no OTEL_* variables): the event carries a new W3C "
            "traceparent, which the consumer and the run continue. With tracing on it carries this command's span's.",
        ),
    ] = False,
) -> None:
    """Publish one data-change CloudEvent (structured mode) to the data-change topic."""
    from opentelemetry.trace import SpanKind

    from consumers.publisher import data_changed_event, with_traceparent
    from consumers.publisher import publish_data_changed as publish
    from flows.tracing import span

    settings = _settings()
    with span("publish", kind=SpanKind.PRODUCER, topic=settings.kafka_topic, dataset=dataset):
        built = data_changed_event(dataset, uri, version=version, rows=rows, event_id=event_id)
        event = with_traceparent(built, new_trace=traceparent)
        published = publish(settings.kafka_bootstrap_servers, settings.kafka_topic, event)
    sent = event.get_extension("traceparent")
    trace = f" (traceparent {sent})" if sent else ""
    out.print(f"published {published} to {settings.kafka_topic}{trace}", highlight=False, soft_wrap=True)


@app.command("trigger")
def trigger(
    pipeline: PipelineName,
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
            f"Prefect {running.prefect_api_url} (UI {running.prefect_ui_url or 'off'}), "
            f"dashboard {running.api_url}/ui/",
            highlight=False,
        )

    serve_forever(settings, on_ready=ready)


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
    from retrainer.demo import run_demo

    run_demo(out)


def main() -> None:
    """Entry point: RetrainerErrors become one line on stderr and exit 1, never a traceback."""
    from retrainer.wiring import quiet_prefect

    quiet_prefect()
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
        # Input the user can fix (a spec, an event, an argument) exits 2; a failing service exits 1.
        sys.exit(2 if isinstance(e, InvalidInputError) else 1)
