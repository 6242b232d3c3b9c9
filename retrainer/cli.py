"""The `retrainer` command line (CONTRACT section 5).

Commands that later issues add (serve, pipelines validate, publish, trigger) are not registered
until they really work; `retrainer --help` lists what exists now.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from domain.errors import RetrainerError
from domain.settings import Settings, load_settings
from retrainer.logs import setup_logging

app = typer.Typer(
    help="Retrainer: event-driven retraining, gating and canary rollouts for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The metadata database.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True)
pipelines_app = typer.Typer(help="Pipeline specs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(apikey_app, name="apikey")
app.add_typer(pipelines_app, name="pipelines")

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    return settings


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
    from retrainer import wiring
    from storage import repositories as repo
    from storage.db import transaction

    settings = _settings()
    with transaction(wiring.sessions(settings)) as session:
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
    """The whole story on embedded defaults. Today: the foundation (metadata DB, artifact store)."""
    from retrainer import wiring

    settings = _settings()
    started = time.perf_counter()
    steps: list[tuple[str, Callable[[], str]]] = [
        ("metadata database (migrations)", lambda: wiring.demo_database(settings)),
        ("artifact store (write, verify, refuse tampering)", lambda: wiring.demo_artifacts(settings)),
    ]
    table = Table(title="Retrainer demo: foundation")
    table.add_column("step")
    table.add_column("result")
    with out.status("running the demo…"):
        for label, step in steps:
            table.add_row(label, step())
    out.print(table)
    out.print(
        "[bold]Not built yet:[/bold] pipeline specs and training (issue 3), Prefect flows and the gate "
        "(issue 4), Kafka/cron/API triggers (issue 5), serving and canary rollouts (issue 6), the "
        "end-to-end story (issue 7)."
    )
    elapsed = time.perf_counter() - started
    out.print(f"demo finished in {elapsed:.1f} s; state under {Path(settings.home_dir).resolve()}")


def main() -> None:
    """Entry point: RetrainerErrors become one line on stderr and exit 1, never a traceback."""
    try:
        # standalone_mode=False: click returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except RetrainerError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2 if e.code in ("invalid_input", "unsafe_artifact_key") else 1)
