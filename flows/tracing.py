"""OpenTelemetry traces: one trace from a data change (or a manual trigger) to the alias move.

    consume (consumers/consumer.py) → debounce (flows/triggers.py) → submit → pipeline (flows/pipeline.py)
    → a span per task → gate → alias move; or → rollout step … → alias move (flows/canary.py)

The trace crosses processes through stored W3C `traceparent`s, never through memory: the inbox row's
payload keeps the CloudEvent's `traceparent` (the distributed-tracing extension; the consumer writes
its own span's there when the producer sent none), and the Run row's `evidence["traceparent"]` says
where the run's next step continues (the debounce or trigger span, then the submission's span). The
model server adds an `infer` span per request with its variant and version (serving/app.py), a
child of the client's span when the request carries a `traceparent` (HTTP header or gRPC metadata).

Off unless a standard variable asks for it (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, or
`OTEL_TRACES_EXPORTER=otlp`); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off.
Off, spans are the API's no-op ones: no exporter, no thread, and a `traceparent` received is still
passed on, so log lines keep the caller's trace id. On, spans go over OTLP/HTTP (protobuf) in batches
to the endpoint; the SDK reads the other `OTEL_*` variables (headers, timeout, sampler and its
argument, resource attributes) itself. The provider is this module's, not the global one, so a
process configures it lazily on its first span and a test can configure it again.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from domain.errors import ConfigurationError
from domain.events import DataChange

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

_ENABLING = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
)
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_OP = trace.NoOpTracer()
SCOPE = "retrainer"

P = ParamSpec("P")
R = TypeVar("R")


class SystemRandomIds(RandomIdGenerator):
    """Trace and span ids from the operating system's generator. The SDK's default draws them from
    Python's global `random`, which training seeds (`ml.training.seed_everything`) in this same process:
    two runs of one spec then drew the same span ids, and a collector merged spans that were not one."""

    _source = random.SystemRandom()

    def generate_span_id(self) -> int:
        return self._nonzero(64)  # 0 is the invalid span id

    def generate_trace_id(self) -> int:
        return self._nonzero(128)

    def _nonzero(self, bits: int) -> int:
        while not (drawn := self._source.getrandbits(bits)):
            pass
        return drawn


class _State:
    lock = threading.Lock()
    configured = False
    provider: TracerProvider | None = None
    tracer: Tracer = _NO_OP


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` variables ask for traces (see the module docstring); ConfigurationError for
    an exporter other than `otlp` or `none`."""
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: Retrainer exports traces over OTLP/HTTP; "
            "set it to 'otlp' (or 'none' for no traces) and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector"
        )
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return exporter == "otlp" or any(env.get(name, "").strip() for name in _ENABLING)


def configure_tracing(environ: Mapping[str, str] | None = None) -> bool:
    """(Re)reads the `OTEL_*` variables: installs an OTLP/HTTP exporter when they ask for traces, else
    the no-op tracer. A provider installed before is flushed and shut down. Returns whether traces are on."""
    from_env = os.environ if environ is None else environ
    requested = tracing_requested(from_env)
    with _State.lock:
        _shutdown_locked()
        if requested:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES over this default name.
            provider = TracerProvider(
                resource=Resource.create({"service.name": from_env.get("OTEL_SERVICE_NAME") or SCOPE}),
                id_generator=SystemRandomIds(),
            )
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            _State.provider, _State.tracer = provider, provider.get_tracer(SCOPE)
        _State.configured = True
    return requested


def shutdown_tracing() -> None:
    """Exports what is buffered and turns tracing off until `configure_tracing` runs again."""
    with _State.lock:
        _shutdown_locked()
        _State.configured = True


def _shutdown_locked() -> None:
    if _State.provider is not None:
        _State.provider.shutdown()  # flushes the batch processor
    _State.provider, _State.tracer = None, _NO_OP


def tracer() -> Tracer:
    """The process's tracer, configured from the environment on first use."""
    if not _State.configured:
        configure_tracing()
    return _State.tracer


def enabled() -> bool:
    """Whether spans are recorded and exported (hot paths skip even the no-op spans when not)."""
    tracer()
    return _State.provider is not None


def parent_context(traceparent: str | None) -> Context | None:
    """The context a W3C `traceparent` continues; None (the current context) for none. An invalid one
    gives a context without a span: the span then starts a new trace, as W3C Trace Context says."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def current_traceparent() -> str | None:
    """The current span's `traceparent`, for the next process to continue; None without a valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex, as log lines carry them; None without one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def run_traceparent(fields: Mapping[str, Any] | None) -> str | None:
    """The `traceparent` in a run's evidence (where its next step continues the trace) or in a stored
    CloudEvent (the inbox payload); None when absent or not a string."""
    value = (fields or {}).get("traceparent")
    return value if isinstance(value, str) else None


@contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    links: Iterable[str | None] = (),
    kind: SpanKind = SpanKind.INTERNAL,
    **attributes: str | int | float | bool | None,
) -> Iterator[Span]:
    """A current span named `name`, child of `parent` (a traceparent; else of the current span), linked
    to the `links` traceparents; attributes that are None are left out. An exception is recorded on
    the span and raised."""
    linked = (trace.get_current_span(parent_context(tp)).get_span_context() for tp in links if tp and tp != parent)
    link_list = [Link(context) for context in linked if context.is_valid]
    with tracer().start_as_current_span(
        name,
        context=parent_context(parent),
        kind=kind,
        attributes={f"retrainer.{k}": v for k, v in attributes.items() if v is not None},
        links=link_list or None,
    ) as current:
        yield current


def traced(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Runs the function in a span named `task <name>` (under Prefect's `@task`, so a retry is a span too)."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with span(f"task {name}"):
                return function(*args, **kwargs)

        return run

    return decorate


def finished_span(
    name: str,
    seconds: float,
    *,
    parent: str | None = None,
    kind: SpanKind = SpanKind.SERVER,
    **attributes: str | int,
) -> None:
    """Records a span that ended now after `seconds` (a hot path adds it after the work, with nothing
    to wrap or unwind), child of `parent` (the caller's W3C traceparent; without one, or an invalid one,
    it starts a trace); nothing at all when tracing is off."""
    if not enabled():
        return
    end = time.time_ns()
    started = _State.tracer.start_span(
        name,
        context=parent_context(parent),
        kind=kind,
        start_time=end - int(seconds * 1e9),
        attributes={f"retrainer.{k}": v for k, v in attributes.items()},
    )
    started.end(end_time=end)


class ConsumeSpans:
    """The `consume` spans of one polled batch: each starts when its record has been read (child of
    the event's `traceparent`) and all end once the batch is committed, or fail with the batch."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def add(self, event: DataChange, **attributes: str | int) -> DataChange:
        """Starts the event's span; the event as it is to be stored: with this span's `traceparent`
        when the producer sent none, so the run made from it continues this trace."""
        received = event.cloudevent.get("traceparent")
        parent = received if isinstance(received, str) else None
        if not enabled() and parent is None:
            return event
        started = _State.tracer.start_span(
            "consume",
            context=parent_context(parent),
            kind=SpanKind.CONSUMER,
            attributes={f"retrainer.{k}": v for k, v in {**attributes, "event_id": event.event_id}.items()},
        )
        self.spans.append(started)
        if parent is not None:
            return event
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(started))
        own = carrier.get("traceparent")
        return replace(event, cloudevent={**event.cloudevent, "traceparent": own}) if own else event

    def __enter__(self) -> ConsumeSpans:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        for started in self.spans:
            if error is not None:
                started.record_exception(error)
                started.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
            started.end()
