"""`retrainer serve`: every part of the service in one process, started in dependency order and
stopped in reverse.

    Prefect server    `prefect server start` subprocess (SQLite under RETRAINER_HOME_DIR/prefect),
                      unless PREFECT_API_URL points at one that answers
    Prefect runner    subprocess serving each pipeline's deployment with its cron schedule
                      (`python -m retrainer.runner`); it executes the flow runs
    model server      OIP v2 on RETRAINER_SERVING_ADDRESS, following champions and rollouts in SQL,
                      checking API keys' scopes (`serving/keys.py`)
    HTTP API          on RETRAINER_API_ADDRESS; /healthz probes every part listed here
    Kafka consumer    data-change events → inbox (invalid ones → dead-letter topic)
    trigger service   debounced inbox events → one run per pipeline per window → Prefect, and
                      re-submission of runs whose submission failed (`flows/trigger_service.py`)
    canary supervisor runs the canary controller flow for each active rollout (resumes after restart)
    decision relay    outbox decision events → Kafka `retrainer.decisions`, and the pipelines'
                      signed webhooks (`flows/relay.py`, `flows/webhooks.py`)

The consumer, the trigger service and the supervisor are loop services run by `flows.loop.run_loop`,
the same runner `retrainer consume`, `triggers` and `rollout supervise` use: an error is logged and
retried after a back-off, never the end of the thread. Prefect telemetry is off (`wiring.quiet_prefect`).

SIGTERM or SIGINT stops everything cleanly: threads finish their current pass, the consumer leaves
its group without committing anything new, subprocesses get SIGTERM (then SIGKILL after 10 s).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from domain.errors import ConfigurationError, InfrastructureError, RetrainerError, TransientInfraError
from domain.settings import Settings
from flows.retry import poll_until

if TYPE_CHECKING:
    from flows.loop import LoopService

log = logging.getLogger("retrainer.service")

PREFECT_START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Subprocess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def probe(self) -> None:
        if not self.alive():
            raise TransientInfraError(f"{self.name} exited with code {self.process.returncode}; see {self.log_path}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def spawn(name: str, command: list[str], log_dir: Path, env: dict[str, str]) -> Subprocess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
    return Subprocess(name, process, log_path)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL (no orphaned servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Worker:
    """A named loop in a daemon thread; its exception (if any), or its own probe, makes it unhealthy."""

    name: str
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)
    check: Callable[[], None] | None = None

    def probe(self) -> None:
        if self.error:
            raise TransientInfraError(f"{self.name} stopped: {type(self.error[0]).__name__}: {self.error[0]}")
        if not self.thread.is_alive():
            raise TransientInfraError(f"{self.name} is not running")
        if self.check is not None:
            self.check()


def start_worker(name: str, target: Callable[[], None], check: Callable[[], None] | None = None) -> Worker:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as err:  # reported by the health probe and the log, never silently lost
            log.exception("%s stopped", name)
            errors.append(err)

    thread = threading.Thread(target=run, name=f"retrainer-{name}", daemon=True)
    worker = Worker(name, thread, errors, check)
    thread.start()
    return worker


@dataclass
class Running:
    """What `running_service` yields: where each part answers and how to look at its health."""

    api_url: str
    serving_url: str
    prefect_api_url: str
    probes: dict[str, Callable[[], None]]
    stop: threading.Event
    prefect_ui_url: str | None = None  # None: the Prefect UI is off (RETRAINER_PREFECT_UI=false) or unknown

    def health(self) -> dict[str, str]:
        report: dict[str, str] = {}
        for name, probe in self.probes.items():
            try:
                probe()
                report[name] = "ok"
            except RetrainerError as err:
                report[name] = err.message
        return report


def _prefect(settings: Settings, env: dict[str, str], stack: ExitStack) -> tuple[str, str | None]:
    """The Prefect API URL and its UI's (None: no UI known): PREFECT_API_URL if it answers (its UI
    at RETRAINER_PREFECT_UI_URL or PREFECT_UI_URL), else a local server started here, with Prefect's
    UI at its root unless RETRAINER_PREFECT_UI=false."""
    from retrainer.wiring import prefect_healthy

    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not prefect_healthy(configured):
            raise InfrastructureError(f"PREFECT_API_URL={configured} does not answer; unset it to start a local one")
        return configured, settings.prefect_ui_url or None
    home = (settings.home_dir / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": str(settings.prefect_ui).lower()}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = spawn("prefect-server", command, settings.home_dir / "logs", server_env)
    stack.callback(server.stop)

    def answers() -> bool:
        server.probe()  # a crashed server ends the wait at once, naming its log
        return prefect_healthy(url)

    poll_until(answers, timeout_s=PREFECT_START_TIMEOUT_S, what="the Prefect server answering")
    ui_url = (settings.prefect_ui_url or f"http://127.0.0.1:{port}") if settings.prefect_ui else None
    return url, ui_url


def _wait_for_deployments(prefect_url: str, pipelines: list[str], runner: Subprocess) -> None:
    """Until the runner has registered every pipeline's deployment (runs submitted before would fail)."""
    missing = set(pipelines)

    def registered() -> bool:
        runner.probe()
        for name in sorted(missing):
            try:
                found = httpx.get(f"{prefect_url}/deployments/name/retrainer-pipeline/{name}", timeout=2.0)
            except httpx.HTTPError:
                continue
            if found.status_code == 200:
                missing.discard(name)
        return not missing

    def timed_out() -> InfrastructureError:
        return InfrastructureError(f"the Prefect runner did not register {sorted(missing)}; see {runner.log_path}")

    poll_until(registered, timeout_s=PREFECT_START_TIMEOUT_S, on_timeout=timed_out)


def _drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Sends what Prefect's log and event workers still hold while the Prefect server is up.
    Left to the interpreter's exit, they would retry against a server already stopped, and the
    process would hang in its exit (Prefect's own test harness drains them before stopping its
    server for the same reason)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # never let a flush stop the rest of the shutdown
            log.warning("could not flush Prefect's %s before stopping", worker.__name__, exc_info=True)


def _check_prefect_sees(api_url: str) -> None:
    """Fails loudly if prefect was imported before PREFECT_API_URL was set (see running_service)."""
    from prefect.settings import get_current_settings

    seen = get_current_settings().api.url
    if seen != api_url:
        raise ConfigurationError(
            f"Prefect in this process uses {seen or 'a temporary server'}, not {api_url}: prefect was "
            "imported before PREFECT_API_URL was set; import it later (retrainer/service.py)"
        )


@contextmanager
def running_service(settings: Settings, *, serving_refresh_s: float = 5.0) -> Iterator[Running]:
    """Starts every part (see the module docstring); yields once all answer; stops them on exit."""
    from api.app import create_app
    from api.server import running_api
    from consumers.consumer import DataChangeConsumer
    from consumers.dead_letters import dead_letter_reader
    from flows.loop import LoopHealth, run_loop
    from flows.reconcile import prefect_reconciler
    from flows.registry import load_specs, sync_pipelines
    from flows.trigger_service import TriggerService
    from flows.triggers import prefect_submitter
    from retrainer import wiring
    from retrainer.processes import RELAY_INTERVAL_S, SUPERVISE_INTERVAL_S, WEBHOOK_STALE_AFTER_S, decision_relay
    from serving.app import create_serving_app
    from serving.grpc_server import grpc_beside
    from serving.keys import KeyCheck
    from serving.loader import MetadataFollower
    from serving.registry import ModelRegistry
    from serving.server import running_server, tune_process
    from storage.db import database_probe, transaction

    stop = threading.Event()
    wiring.quiet_prefect()
    sessions = wiring.sessions(settings)
    wiring.upgrade_database(settings)
    specs = load_specs(settings.pipelines_dir)
    with transaction(sessions) as session:
        sync_pipelines(session, specs)

    with ExitStack() as stack:
        env = {**os.environ}
        prefect_url, prefect_ui_url = _prefect(settings, env, stack)
        stack.callback(_drain_prefect_workers)  # runs after every in-process flow ended, before the server stops
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"] = prefect_url
        # Prefect reads its settings once, when it is first imported: every module that imports
        # prefect (the canary controller's flow) is imported only now, or the in-process
        # submitter and controller would talk to a temporary server of their own.
        from flows.canary import RolloutSupervisor

        _check_prefect_sees(prefect_url)

        tune_process(settings.serving_torch_threads)  # before the first model loads
        follower = MetadataFollower(ModelRegistry(), sessions, wiring.artifact_store(settings))
        follower.sync()
        follower.start(serving_refresh_s)
        stack.callback(follower.registry.close)
        stack.callback(follower.stop)
        # the model server checks API keys; its controller provisions a key of its own (flows/canary.py)
        keys = KeyCheck(sessions, require_for_infer=settings.serving_require_key).start()
        stack.callback(keys.stop)
        serving_app = create_serving_app(follower.registry, reload=follower.sync, reporter=follower.reporter, keys=keys)
        serving_url = stack.enter_context(running_server(serving_app, settings.serving_address))
        grpc_url = stack.enter_context(grpc_beside(serving_app, settings.serving_grpc_address))

        # its flows beat as often as the run reconciler expects (flows/reconcile.py)
        runner_env = {
            **env,
            "RETRAINER_SERVING_URL": serving_url,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.run_heartbeat_s),
        }
        runner = spawn(
            "prefect-runner", [sys.executable, "-m", "retrainer.runner"], settings.home_dir / "logs", runner_env
        )
        stack.callback(runner.stop)
        _wait_for_deployments(prefect_url, [spec.name for spec in specs], runner)

        submitter = prefect_submitter()
        consumer = DataChangeConsumer(settings, sessions)
        trigger_health = LoopHealth(TriggerService.name)

        def consume() -> None:
            consumer.stop_requested.clear()
            consumer.run_forever()

        def triggers() -> None:
            reconciler = prefect_reconciler(sessions, submitter, settings)
            TriggerService(sessions, submitter, reconciler).run_forever(stop, interval_s=1.0, health=trigger_health)

        supervisor = RolloutSupervisor(sessions, serving_url)
        supervisor_health = LoopHealth.for_interval(supervisor.name, SUPERVISE_INTERVAL_S)

        def supervise() -> None:
            run_loop(supervisor, stop, interval_s=SUPERVISE_INTERVAL_S, health=supervisor_health)

        workers = [
            start_worker(consumer.name, consume, consumer.probe),
            start_worker(TriggerService.name, triggers, trigger_health.probe),
            start_worker(supervisor.name, supervise, supervisor_health.probe),
            *_decision_workers(*decision_relay(settings, sessions), stop, RELAY_INTERVAL_S, WEBHOOK_STALE_AFTER_S),
        ]
        for worker in workers:
            stack.callback(worker.thread.join, 15)
        stack.callback(consumer.stop_requested.set)
        stack.callback(stop.set)

        probes: dict[str, Callable[[], None]] = {
            "database": database_probe(sessions),
            "prefect-server": wiring.prefect_probe(prefect_url),
            "prefect-runner": runner.probe,
            "model-server": wiring.model_server_probe(serving_url),
            follower.name: follower.probe,
            **{w.name: w.probe for w in workers},
        }
        linked = settings.model_copy(update={"prefect_ui_url": prefect_ui_url or ""})  # run pages link the UI
        api_app = create_app(
            sessions=sessions, settings=linked, submit=submitter, health_probes=probes,
            dead_letters=dead_letter_reader(settings),
        )  # fmt: skip
        api_url = stack.enter_context(running_api(api_app, settings.api_address))
        log.info(
            "retrainer serving: api %s (dashboard %s/ui/), models %s (gRPC %s), prefect %s (UI %s)",
            api_url, api_url, serving_url, grpc_url, prefect_url, prefect_ui_url or "off",
        )  # fmt: skip
        yield Running(api_url, serving_url, prefect_url, probes, stop, prefect_ui_url)


def _decision_workers(
    relay: LoopService, webhooks: LoopService, stop: threading.Event, interval_s: float, webhook_stale_s: float
) -> list[Worker]:
    """The decision relay and the webhook sender, each a loop in its own thread (a slow webhook never
    holds back the relay, nor the relay a decision)."""
    from flows.loop import LoopHealth, run_loop

    relay_health = LoopHealth.for_interval(relay.name, interval_s)
    webhook_health = LoopHealth(webhooks.name, stale_after_s=webhook_stale_s)
    return [
        start_worker(
            relay.name, lambda: run_loop(relay, stop, interval_s=interval_s, health=relay_health), relay_health.probe
        ),
        start_worker(
            webhooks.name,
            lambda: run_loop(webhooks, stop, interval_s=interval_s, health=webhook_health),
            webhook_health.probe,
        ),
    ]


def _raise_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so `with` blocks stop what they started."""
    signal.signal(signal.SIGTERM, _raise_on_signal)


def serve_forever(settings: Settings, on_ready: Callable[[Running], None] | None = None) -> None:
    """`retrainer serve`: runs until SIGTERM/SIGINT, then stops every part (also if signalled while starting)."""
    exit_cleanly_on_sigterm()
    # `kill -USR1 PID` writes every thread's stack to stderr: what a stop that hangs is waiting for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stopping = threading.Event()
    try:
        with running_service(settings) as running:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stopping.set())
            if on_ready is not None:
                on_ready(running)
            while not stopping.wait(1.0):
                pass
            log.info("stopping: finishing current work")
    except KeyboardInterrupt:
        log.info("stopped while starting")
