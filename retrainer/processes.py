"""The long-running `retrainer` commands of a split deployment (compose, Kubernetes): `consume`,
`triggers`, `api`, `serve-models`, `relay`, `rollout supervise` (`retrainer serve` runs them all in one
process, `retrainer/service.py`). Each serves /healthz and /metrics: the API and the model server
on their own address, the others on RETRAINER_HEALTH_ADDRESS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from domain.errors import ConfigurationError
from domain.settings import Settings
from retrainer.console import err
from retrainer.console import settings as load
from web.health import HealthProbe

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from flows.relay import DecisionRelay
    from flows.webhooks import WebhookDispatcher

HEALTH_SETTING = "RETRAINER_HEALTH_ADDRESS"
ServingUrl = Annotated[
    str | None, typer.Option(help="Model server base URL; default RETRAINER_SERVING_URL or its address.")
]


@contextmanager
def health_endpoint(settings: Settings, probes: Mapping[str, HealthProbe]) -> Iterator[str]:
    """/healthz (the probes) and /metrics (this process's registry) on RETRAINER_HEALTH_ADDRESS."""
    from web.health import health_app
    from web.server import running

    app = health_app(probes)
    with running(app, settings.health_address, HEALTH_SETTING, name="the health endpoint") as url:
        err.print(f"/healthz and /metrics on {url}", highlight=False)
        yield url


SUPERVISE_INTERVAL_S = 1.0


def require_prefect_api() -> str:
    """The Prefect API URL runs are submitted to. Without one, Prefect would start an ephemeral
    server with no deployments, where every submission fails for ever: ConfigurationError instead."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigurationError(
            "PREFECT_API_URL is not set, so no run could be submitted (an ephemeral Prefect has no "
            "deployments); set it to the Prefect server that has the pipelines' deployments "
            "(`retrainer pipelines deploy`), or pass --no-submit to only create runs"
        )
    return url


def consume(max_records: Annotated[int, typer.Option(help="Records per poll batch.")] = 500) -> None:
    """Run the Kafka consumer: data-change events into the inbox, invalid ones to the DLQ."""
    from consumers.consumer import DataChangeConsumer
    from retrainer import wiring

    settings = load()
    consumer = DataChangeConsumer(settings, wiring.sessions(settings), max_records=max_records)
    consumer.install_signal_handlers()
    with health_endpoint(settings, {"database": wiring.database_probe(settings), consumer.name: consumer.probe}):
        err.print(f"consuming {settings.kafka_topic} as group {settings.kafka_consumer_group}")
        consumer.run_forever()


def triggers(
    interval: Annotated[float, typer.Option(help="Seconds between passes.")] = 1.0,
    once: Annotated[bool, typer.Option(help="One pass, then exit (its error fails the command).")] = False,
    submit: Annotated[bool, typer.Option(help="Submit flow runs to the pipelines' Prefect deployments.")] = True,
) -> None:
    """Run the trigger service: pending events become one run per pipeline per window, and runs
    whose submission to Prefect failed are submitted again; errors are logged and retried."""
    from flows.loop import LoopHealth, run_loop, stop_on_signals
    from flows.reconcile import prefect_reconciler
    from flows.trigger_service import TriggerService
    from flows.triggers import prefect_submitter
    from retrainer import wiring

    settings = load()
    try:
        prefect_url = require_prefect_api() if submit else None
    except ConfigurationError as refusal:  # a usage error: one line and exit 2, before anything starts
        err.print(f"error: {refusal}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from refusal
    sessions, submitter = wiring.sessions(settings), prefect_submitter() if submit else None
    reconciler = None if submitter is None else prefect_reconciler(sessions, submitter, settings)
    service = TriggerService(sessions, submitter, reconciler)
    stop = threading.Event()
    if once:
        run_loop(service, stop, once=True)
        return
    stop_on_signals(stop)
    health = LoopHealth.for_interval(service.name, interval)
    probes = {"database": wiring.database_probe(settings), service.name: health.probe}
    if prefect_url:
        probes["prefect"] = wiring.prefect_probe(prefect_url)
    with health_endpoint(settings, probes):
        service.run_forever(stop, interval_s=interval, health=health)


def api() -> None:
    """Run the HTTP API on RETRAINER_API_ADDRESS (submits runs to the pipelines' Prefect deployments)."""
    from api.app import create_app
    from api.server import serve_api
    from flows.triggers import prefect_submitter
    from retrainer import wiring

    settings = load()
    app_ = create_app(sessions=wiring.sessions(settings), settings=settings, submit=prefect_submitter())
    serve_api(app_, settings.api_address)


def serve_models(
    refresh: Annotated[float, typer.Option(help="Seconds between reloads of champions from the database.")] = 10.0,
) -> None:
    """Run the model server (Open Inference Protocol v2) on RETRAINER_SERVING_ADDRESS with each
    pipeline's champion from the metadata database, reloading when the champion moves; /healthz
    and /metrics on the same address; OIP v2 over gRPC too when RETRAINER_SERVING_GRPC_ADDRESS is set."""
    from retrainer import wiring
    from serving.app import create_serving_app
    from serving.grpc_server import grpc_beside
    from serving.keys import KeyCheck
    from serving.loader import MetadataFollower
    from serving.registry import ModelRegistry
    from serving.server import serve_models as serve
    from serving.server import tune_process
    from web.health import add_health_route

    settings = load()
    tune_process(settings.serving_torch_threads)
    sessions = wiring.sessions(settings)
    follower = MetadataFollower(ModelRegistry(), sessions, wiring.artifact_store(settings))
    for pipeline, what in follower.sync().items():
        err.print(f"{pipeline}: {what}", highlight=False)
    follower.start(refresh)
    keys = KeyCheck(sessions, require_for_infer=settings.serving_require_key).start()
    app = create_serving_app(follower.registry, reload=follower.sync, reporter=follower.reporter, keys=keys)
    add_health_route(app, {"database": wiring.database_probe(settings), follower.name: follower.probe})
    try:
        with grpc_beside(app, settings.serving_grpc_address):
            serve(app, settings.serving_address)
    finally:
        keys.stop()
        follower.stop()


def rollout_supervise(serving_url: ServingUrl = None) -> None:
    """Run a canary controller for every active rollout, now and as they start, until SIGTERM or
    Ctrl-C (what `retrainer serve` does in-process; one per deployment)."""
    from flows.canary import RolloutSupervisor
    from flows.loop import LoopHealth, run_loop, stop_on_signals
    from retrainer import wiring

    settings = load()
    stop = threading.Event()
    stop_on_signals(stop)
    url = serving_url or settings.model_server_url
    supervisor = RolloutSupervisor(wiring.sessions(settings), serving_url)
    health = LoopHealth.for_interval(supervisor.name, SUPERVISE_INTERVAL_S)
    probes = {
        "database": wiring.database_probe(settings),
        "model-server": wiring.model_server_probe(url),
        supervisor.name: health.probe,
    }
    with health_endpoint(settings, probes):
        err.print("supervising canary rollouts (Ctrl-C to stop)", highlight=False)
        run_loop(supervisor, stop, interval_s=SUPERVISE_INTERVAL_S, health=health)
    err.print("stopped", highlight=False)


def rollout_run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")], serving_url: ServingUrl = None
) -> None:
    """Run the canary controller for the pipeline's active rollout until it is promoted or rolled
    back (resumes at the stored step after a restart)."""
    from flows.canary import canary_rollout
    from retrainer.console import out

    load()
    result = canary_rollout(pipeline, serving_url=serving_url)
    out.print(f"{pipeline}: rollout {result.get('status') or 'none'}: {result.get('reason')}", highlight=False)


RELAY_INTERVAL_S = 1.0
# A webhook pass may wait out a dead endpoint's retries (minutes), which is not a stuck loop.
WEBHOOK_STALE_AFTER_S = 900.0


def decision_relay(settings: Settings, sessions: sessionmaker[Session]) -> tuple[DecisionRelay, WebhookDispatcher]:
    """The decision relay (to Kafka, when RETRAINER_KAFKA_BOOTSTRAP_SERVERS is set) and the webhook sender."""
    from consumers.decisions import KafkaDecisionSink
    from flows.relay import DecisionRelay
    from flows.webhooks import DeliveryPolicy, WebhookDispatcher

    servers = settings.kafka_bootstrap_servers.strip()
    timeout = settings.connect_timeout_seconds
    sink = KafkaDecisionSink(servers, settings.decisions_topic, timeout_s=timeout) if servers else None
    policy = DeliveryPolicy(attempts=settings.webhook_attempts, timeout_s=settings.webhook_timeout_seconds)
    return DecisionRelay(sessions, sink, webhooks=settings.webhooks), WebhookDispatcher(sessions, policy)


def relay(
    interval: Annotated[float, typer.Option(help="Seconds between passes.")] = RELAY_INTERVAL_S,
    once: Annotated[bool, typer.Option(help="One pass of each loop, then exit (an error fails the command).")] = False,
) -> None:
    """Run the decision relay: outbox events to Kafka (RETRAINER_DECISIONS_TOPIC) and to the
    pipelines' webhooks, at least once, each with its stable id; errors are logged and retried."""
    from flows.loop import LoopHealth, run_loop, stop_on_signals
    from retrainer import wiring

    settings = load()
    relay_service, webhooks = decision_relay(settings, wiring.sessions(settings))
    stop = threading.Event()
    if once:
        run_loop(relay_service, stop, once=True)
        run_loop(webhooks, stop, once=True)
        return
    stop_on_signals(stop)
    relay_health = LoopHealth.for_interval(relay_service.name, interval)
    webhook_health = LoopHealth(webhooks.name, stale_after_s=WEBHOOK_STALE_AFTER_S)
    probes = {
        "database": wiring.database_probe(settings),
        relay_service.name: relay_health.probe,
        webhooks.name: webhook_health.probe,
    }
    sender = threading.Thread(
        target=run_loop,
        args=(webhooks, stop),
        kwargs={"interval_s": interval, "health": webhook_health},
        name="webhook-deliveries",
        daemon=True,
    )
    with health_endpoint(settings, probes):
        sender.start()
        run_loop(relay_service, stop, interval_s=interval, health=relay_health)
        sender.join(timeout=30)


def register(app: typer.Typer, rollout_app: typer.Typer) -> None:
    """Adds these commands to the `retrainer` CLI."""
    app.command("consume")(consume)
    app.command("triggers")(triggers)
    app.command("api")(api)
    app.command("serve-models")(serve_models)
    app.command("relay")(relay)
    rollout_app.command("run")(rollout_run)
    rollout_app.command("supervise")(rollout_supervise)
