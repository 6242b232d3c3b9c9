"""The model server's Open Inference Protocol v2 over gRPC (KServe's `grpc_predict_v2.proto`, service
`inference.GRPCInferenceService`): ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata and
ModelInfer, on `RETRAINER_SERVING_GRPC_ADDRESS`, beside the HTTP app in the same process.

Requests go through the HTTP app's own `serving.app.Inference` (`app.state.inference`): the same
parser (`serving.protocol`, fed the request as its JSON form plus `raw_input_contents` as binary
tensor data), routing between champion and canary (sticky per `x-retrainer-sticky` metadata), the
`infer` span continuing a `traceparent` in the call's metadata (W3C Trace Context), dynamic
batching (gRPC and HTTP requests share forward passes), per-variant counting, and predictions
remembered for `feedback` by the answer's `id`. So gRPC requests are canary evidence like HTTP ones.
Outputs are answered in `raw_output_contents` (little-endian, row-major), as Triton answers them;
the serving variant is sent as the trailing metadata `x-retrainer-variant` (with the answer and its status
in one batch: initial metadata would cost the call a batch, a completion and a wake-up of its own).

Refusals carry the same messages as over HTTP, with the status code of the HTTP status (`_CODES`):
bad input INVALID_ARGUMENT, unknown model or version NOT_FOUND, no champion yet UNAVAILABLE, a
message over the size limit RESOURCE_EXHAUSTED, a model failure INTERNAL. The other methods of the
service (repository, shared memory, statistics, streaming) answer UNIMPLEMENTED.

The messages are the generated classes that ship with Triton's client (`tritonclient.grpc.service_pb2`,
the same `inference` package and service as KServe's proto), and the server is `grpcio`'s asyncio
server, on an event loop of its own (uvloop's) in a background thread. Its clients that are between
two calls count as requests on their way for the dynamic batcher (`Arrivals`), so that gRPC requests,
which reach Python one at a time, still share forward passes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
from fastapi import FastAPI

from domain.apikeys import Scope as KeyScope
from domain.errors import ConfigurationError, InfrastructureError, InvalidInputError
from serving.app import (
    DEFAULT_MAX_BODY_BYTES,
    SERVER_METADATA,
    STICKY_HEADER,
    TRACEPARENT_HEADER,
    Inference,
    ModelServerApp,
    as_refusal,
)
from serving.keys import GRPC_METADATA_KEY
from serving.protocol import BINARY_DTYPES, INPUT_DATATYPE, TEXT_DATATYPE, parse_infer_request
from web.errors import status_for
from web.server import parse_address

SETTING = "RETRAINER_SERVING_GRPC_ADDRESS"
SERVICE = "inference.GRPCInferenceService"
VARIANT_METADATA = "x-retrainer-variant"
STOP_GRACE_S = 5.0
_STICKY = STICKY_HEADER.lower()
# HTTP status of a refusal (web.errors) -> gRPC status code name; other 4xx: INVALID_ARGUMENT, 5xx: INTERNAL
_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}

Handler = Callable[[Any, Any], Awaitable[Any]]


def _modules() -> tuple[Any, Any, Any]:
    """grpc, the service's message classes and protobuf's json_format; imported only when gRPC is on, so
    a model server without it needs neither package."""
    try:
        import grpc  # type: ignore[import-untyped]
        from google.protobuf import json_format  # type: ignore[import-untyped]
        from tritonclient.grpc import service_pb2  # type: ignore[import-untyped]
    except ImportError as e:
        raise ConfigurationError(
            f"{SETTING} is set but the gRPC packages are missing ({e}); install grpcio==1.85.1 and "
            "tritonclient==2.73.0, or leave the setting empty"
        ) from e
    except RuntimeError as e:  # tritonclient.grpc says so when grpcio is missing
        raise ConfigurationError(f"{SETTING} is set but {e}; install grpcio==1.85.1, or leave it empty") from e
    return grpc, service_pb2, json_format


def status_code(grpc: Any, http_status: int) -> Any:
    """The gRPC status code of a refusal with `http_status`."""
    name = _CODES.get(http_status, "INTERNAL" if http_status >= 500 else "INVALID_ARGUMENT")
    return getattr(grpc.StatusCode, name)


def request_payload(request: Any) -> tuple[dict[str, Any], memoryview | None]:
    """A ModelInferRequest as the OIP v2 JSON request and binary part `serving.protocol` parses: each
    input's `raw_input_contents` as binary tensor data (`parameters.binary_data_size`), or its typed
    `contents` as `data`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; send one per input "
            "(or every input's values in its contents)"
        )
    inputs: list[dict[str, Any]] = []
    for i, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            item["parameters"] = {"binary_data_size": len(raw[i])}
        elif tensor.HasField("contents"):
            item["data"] = _contents(tensor.datatype, tensor.contents)
        inputs.append(item)
    payload: dict[str, Any] = {"inputs": inputs}
    if request.id:
        payload["id"] = request.id
    if request.outputs:
        payload["outputs"] = [{"name": output.name} for output in request.outputs]
    return payload, memoryview(raw[0]) if raw else None


def _contents(datatype: str, contents: Any) -> list[Any]:
    """The values of an input's typed contents; for a datatype the server does not take, none (the
    parser refuses the datatype itself, naming the one to send)."""
    if datatype == INPUT_DATATYPE:
        return list(contents.fp32_contents)
    if datatype != TEXT_DATATYPE:
        return []
    try:
        return [value.decode("utf-8") for value in contents.bytes_contents]
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"inputs[0].contents.bytes_contents: not UTF-8 ({e}); send UTF-8 text") from e


def infer_response(service_pb2: Any, answer: dict[str, Any]) -> Any:
    """The ModelInferResponse of an OIP v2 answer, every output's values in `raw_output_contents`."""
    response = service_pb2.ModelInferResponse(
        model_name=answer["model_name"], model_version=answer["model_version"], id=answer["id"]
    )
    for output in answer["outputs"]:
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        response.raw_output_contents.append(
            np.asarray(output["data"], dtype=BINARY_DTYPES[output["datatype"]]).tobytes()
        )
    return response


class Arrivals:
    """The gRPC clients expected to send a request soon: those (by peer address, one per channel) that
    finished a call within `window_s` and have none in progress. A closed-loop client sends its next
    request right after its answer, but gRPC hands requests to Python one poller event at a time, so
    without this the batcher sees one or two requests in flight and runs a forward pass per one or
    two rows (bench/serving_oip.py at 64 clients: ~1.5 rows per pass and ~550 µs of server CPU per
    call; with it ~11 rows and ~350 µs). A lone client is never waited for: its one call is in
    progress. Calls are counted on the server's loop; `expected` is read from the batcher's thread."""

    def __init__(self, window_s: float = 0.05, max_peers: int = 4096) -> None:
        self.window_s, self.max_peers = window_s, max_peers
        self._last: dict[str, float] = {}
        self._calls = 0

    def started(self, peer: str) -> None:
        self._calls += 1
        self._seen(peer)

    def finished(self, peer: str) -> None:
        self._calls -= 1
        now = self._seen(peer)
        if len(self._last) > self.max_peers:  # clients come and go: keep only the recent ones
            self._last = {p: t for p, t in self._last.items() if t > now - self.window_s}

    def _seen(self, peer: str) -> float:
        """Records a call of `peer` now, keeping `_last` ordered oldest first (a dict keeps insertion order)."""
        last = self._last
        last.pop(peer, None)
        now = last[peer] = time.monotonic()
        return now

    def expected(self) -> int:
        cutoff = time.monotonic() - self.window_s
        last = self._last
        # peers are kept in the order of their last call (`_seen`), so when the oldest is recent all are:
        # the common case under load, answered without a pass over every peer
        try:
            oldest = next(iter(last.values()), None)
        except RuntimeError:  # the loop changed the dict meanwhile: count the slow way
            oldest = None
        if oldest is not None and oldest > cutoff:
            recent = len(last)
        else:
            recent = sum(1 for t in list(last.values()) if t > cutoff)
        return max(0, recent - self._calls)


class _Service:
    """The service's methods over one `Inference`: each takes (request, context) and returns its response."""

    def __init__(self, inference: Inference, service_pb2: Any, json_format: Any) -> None:
        self.inference, self.pb, self.json_format = inference, service_pb2, json_format
        self.arrivals = Arrivals()

    async def server_live(self, _request: Any, _context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def server_ready(self, _request: Any, _context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.inference.server_ready())

    async def server_metadata(self, _request: Any, _context: Any) -> Any:
        return self.json_format.ParseDict(dict(SERVER_METADATA), self.pb.ServerMetadataResponse())

    async def model_ready(self, request: Any, _context: Any) -> Any:
        return self.pb.ModelReadyResponse(ready=self.inference.model_ready(request.name, request.version or None))

    async def model_metadata(self, request: Any, _context: Any) -> Any:
        metadata = self.inference.metadata(request.name, request.version or None)
        return self.json_format.ParseDict(metadata, self.pb.ModelMetadataResponse())

    async def model_infer(self, request: Any, context: Any) -> Any:
        peer = context.peer()
        self.arrivals.started(peer)
        try:
            return await self._model_infer(request, context)
        finally:
            self.arrivals.finished(peer)

    async def _model_infer(self, request: Any, context: Any) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        if self.inference.infer_keys is not None:  # the HTTP transport's rule, from `x-api-key` metadata
            await self.inference.infer_keys.authorize(metadata.get(GRPC_METADATA_KEY), KeyScope.INFER)
        payload, binary = request_payload(request)
        sticky = metadata.get(_STICKY)
        answered = await self.inference.infer(
            request.model_name,
            request.model_version or None,
            parse_infer_request(payload, binary),
            sticky,
            metadata.get(TRACEPARENT_HEADER),
        )
        self._expect_arrivals(request.model_name)
        # trailing metadata goes out with the answer (module docstring): 10-60 µs less server CPU a call
        context.set_trailing_metadata(((VARIANT_METADATA, answered.variant),))
        return infer_response(self.pb, answered.answer)

    def _expect_arrivals(self, pipeline: str) -> None:
        """Lets the batchers of the pipeline's models wait for this service's clients (`Arrivals`);
        a model loaded later (a new canary) gets it after its first gRPC answer."""
        state = self.inference.registry.state(pipeline)
        for model in (state.champion, state.canary):
            if model is not None and model.arrivals is None:
                model.arrivals = self.arrivals.expected


def _handlers(grpc: Any, service_pb2: Any, service: _Service) -> Any:
    """The generic handler of the service's implemented methods; a refusal aborts with its status code
    and the message the HTTP transport would give."""

    def unary(method: Handler, request_type: str, response_type: str) -> Any:
        async def handle(request: Any, context: Any) -> Any:
            try:
                return await method(request, context)
            except Exception as e:
                error = as_refusal(e)
                await context.abort(status_code(grpc, status_for(error)), error.message)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=getattr(service_pb2, request_type).FromString,
            response_serializer=getattr(service_pb2, response_type).SerializeToString,
        )

    methods = {
        "ServerLive": service.server_live,
        "ServerReady": service.server_ready,
        "ServerMetadata": service.server_metadata,
        "ModelReady": service.model_ready,
        "ModelMetadata": service.model_metadata,
        "ModelInfer": service.model_infer,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: unary(method, f"{name}Request", f"{name}Response") for name, method in methods.items()}
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (what uvicorn serves HTTP on), else asyncio's. grpc.aio wakes its loop from its
    poller thread for every completion (a call's arrival, its message, its metadata, its answer): on
    uvloop each wake-up costs less: 50-80 µs less server CPU per call (bench/serving_oip.py)."""
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but has no Windows build
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class _ServerThread:
    """grpc.aio's server on an event loop of its own, in a daemon thread."""

    def __init__(self, inference: Inference, target: str, max_message_bytes: int) -> None:
        self.inference, self.target, self.max_message_bytes = inference, target, max_message_bytes
        self.port: Future[int] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="retrainer-grpc", daemon=True)

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        try:
            grpc, service_pb2, json_format = _modules()
            options = [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # without this grpc binds with SO_REUSEPORT, and a second server on a taken port starts silently
                ("grpc.so_reuseport", 0),
            ]
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers(
                (_handlers(grpc, service_pb2, _Service(self.inference, service_pb2, json_format)),)
            )
            port = server.add_insecure_port(self.target)
            await server.start()
        except BaseException as e:
            self.port.set_exception(e)
            return
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.port.set_result(port)
        await self._stop.wait()
        await server.stop(STOP_GRACE_S)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=STOP_GRACE_S + 5.0)


@contextmanager
def running_grpc_server(
    inference: Inference,
    address: str = "127.0.0.1:0",
    *,
    max_message_bytes: int = DEFAULT_MAX_BODY_BYTES,
    start_timeout: float = 10.0,
) -> Iterator[str]:
    """Serves the gRPC service over `inference` in a background thread; yields "HOST:PORT" (what
    `tritonclient.grpc` takes as its url) once it listens, and stops it on exit. Port 0 takes a free port."""
    host, port = parse_address(address, SETTING)
    host = f"[{host}]" if ":" in host else host
    server = _ServerThread(inference, f"{host}:{port}", max_message_bytes)
    server.thread.start()
    try:
        bound = server.port.result(timeout=start_timeout)
    except ConfigurationError:
        server.stop()
        raise
    except TimeoutError as e:
        server.stop()
        raise InfrastructureError(
            f"{SETTING}: the gRPC service did not start on {address} within {start_timeout} s"
        ) from e
    except Exception as e:  # grpc: RuntimeError("Failed to bind ...")
        server.stop()
        raise InfrastructureError(f"{SETTING}: cannot listen on {address} ({e}); pick a free port") from e
    try:
        yield f"{host}:{bound}"
    finally:
        server.stop()


def grpc_beside(app: FastAPI, address: str) -> AbstractContextManager[str | None]:
    """The gRPC service beside the HTTP `app` (`create_serving_app`), sharing its routing, batching and
    counts, on `address`; nothing when the address is empty (the setting's default)."""
    if not address:
        return nullcontext(None)
    limit = app.max_body_bytes if isinstance(app, ModelServerApp) else DEFAULT_MAX_BODY_BYTES
    return running_grpc_server(app.state.inference, address, max_message_bytes=limit)
