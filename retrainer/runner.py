"""The Prefect runner of `retrainer serve` (a subprocess): serves each pipeline's deployment, with
its cron schedule, and executes the flow runs submitted to them. `python -m retrainer.runner`."""

from __future__ import annotations

from domain.settings import load_settings
from retrainer.logs import setup_logging


def main() -> None:
    from prefect import serve

    from flows.registry import deployments, load_specs

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    serve(*deployments(load_specs(settings.pipelines_dir)), print_starting_message=False)


if __name__ == "__main__":
    main()
