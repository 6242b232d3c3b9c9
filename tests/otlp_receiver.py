"""A real OTLP/HTTP trace receiver on loopback for tests (the `receiver` fixture): it decodes each
`POST /v1/traces` (an ExportTraceServiceRequest, protobuf) into `ReceivedSpan`s, and points the
standard `OTEL_*` variables of the test at itself so `flows.tracing` exports there. A test module
uses it by importing the fixture (`from tests.otlp_receiver import Receiver, receiver`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from flows import tracing


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    service: str
    links: list[tuple[str, str]]


@dataclass
class Receiver:
    """An OTLP/HTTP collector: POST /v1/traces with an ExportTraceServiceRequest (protobuf)."""

    url: str
    spans: list[ReceivedSpan] = field(default_factory=list)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]


def _decoded(body: bytes) -> Iterator[ReceivedSpan]:
    request = ExportTraceServiceRequest.FromString(body)
    for resource in request.resource_spans:
        service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
        for scope in resource.scope_spans:
            for s in scope.spans:
                yield ReceivedSpan(
                    s.name,
                    s.trace_id.hex(),
                    s.span_id.hex(),
                    s.parent_span_id.hex(),
                    {a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value") for a in s.attributes},
                    service,
                    [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                )


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """The receiver, listening; tracing configured to export to it (service name `retrainer-test`),
    and shut down (flushed) when the test ends."""
    received: list[ReceivedSpan] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            received.extend(_decoded(body))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "retrainer-test")
    assert tracing.configure_tracing()
    try:
        yield Receiver(url, received)
    finally:
        tracing.shutdown_tracing()
        server.shutdown()
        server.server_close()
