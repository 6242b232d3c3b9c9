"""The model server's `infer` span continues the client's trace (serving/app.py, serving/grpc_server.py):
a W3C `traceparent` header over HTTP, or `traceparent` metadata over gRPC, makes the span a child of
the client's span; without one (or with an invalid one) the span starts a trace of its own. Spans go
to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import tritonclient.grpc as triton  # type: ignore[import-untyped]
from fastapi import FastAPI

from flows import tracing
from serving.grpc_server import running_grpc_server
from serving.registry import ModelRegistry
from tests.serving import test_server
from tests.serving.conftest import tiny_model
from tests.serving.test_grpc import tensor_of
from tests.serving.test_server import INFER, body, rows_of

if TYPE_CHECKING:
    from tests.otlp_receiver import Receiver

pytest_plugins = ("tests.otlp_receiver",)  # the `receiver` fixture
# the server tests' fixtures: a registry for "digits" (no champion yet), its app, httpx on it
app, http, registry = test_server.app, test_server.http, test_server.registry

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HTTP_SPAN, GRPC_SPAN = "00f067aa0ba902b7", "b7ad6b7169203331"


def test_an_http_infer_span_is_a_child_of_the_clients_traceparent(
    registry: ModelRegistry, http: httpx.Client, receiver: Receiver
) -> None:
    registry.set_champion(tiny_model("1"))
    traced = http.post(INFER, json=body(rows_of(2)), headers={"traceparent": f"00-{CLIENT_TRACE}-{HTTP_SPAN}-01"})
    untraced = http.post(INFER, json=body(rows_of(1)))
    invalid = http.post(INFER, json=body(rows_of(1)), headers={"traceparent": "00-not-a-trace-01"})
    assert traced.status_code == untraced.status_code == invalid.status_code == 200, traced.text
    tracing.shutdown_tracing()  # flushes the batch to the receiver

    first, second, third = receiver.named("infer")
    assert (first.trace_id, first.parent_span_id) == (CLIENT_TRACE, HTTP_SPAN)
    served = {"retrainer.pipeline": "digits", "retrainer.variant": "champion", "retrainer.version": "1"}
    assert first.attributes == served
    # no traceparent, or one W3C says to ignore: a root span in a trace of its own
    assert second.parent_span_id == third.parent_span_id == ""
    assert len({CLIENT_TRACE, second.trace_id, third.trace_id}) == 3


def test_a_grpc_infer_span_is_a_child_of_the_traceparent_in_the_calls_metadata(
    registry: ModelRegistry, app: FastAPI, receiver: Receiver
) -> None:
    registry.set_champion(tiny_model("1"))
    with running_grpc_server(app.state.inference) as url:
        client = triton.InferenceServerClient(url=url)
        try:
            traceparent = f"00-{CLIENT_TRACE}-{GRPC_SPAN}-01"
            client.infer("digits", [tensor_of(rows_of(3))], headers={"traceparent": traceparent})
            client.infer("digits", [tensor_of(rows_of(1))])
        finally:
            client.close()
    tracing.shutdown_tracing()

    traced, untraced = receiver.named("infer")
    assert (traced.trace_id, traced.parent_span_id) == (CLIENT_TRACE, GRPC_SPAN)
    assert traced.attributes["retrainer.variant"] == "champion" and traced.attributes["retrainer.version"] == "1"
    assert untraced.parent_span_id == "" and untraced.trace_id != CLIENT_TRACE
