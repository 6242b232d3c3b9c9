"""The model server's HTTP interface: Open Inference Protocol v2 (REST) plus feedback and metrics.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 until every expected pipeline has a champion
    GET  /v2/models/{pipeline}[/versions/{v}]  model metadata (platform pytorch, input FP32 [-1, *shape])
    GET  /v2/models/{pipeline}/ready           200 or 503
    POST /v2/models/{pipeline}[/versions/{v}]/infer
    POST /v2/models/{pipeline}/feedback        {"request_id": "...", "label": 3} (or one label per row; a
                                               regression model: a number per row, or per row a list
                                               with one per output)
    GET  /v2/models/{pipeline}/stats?window_seconds=60
                                               per-variant window for the canary controller (extension;
                                               the body is `domain.evidence.ModelStats`)
    POST /v2/repository/models/{pipeline}/load re-read champion/canary/weight from the metadata now
    GET  /metrics                              Prometheus text

API keys (`X-API-Key`, the API's keys and scopes, checked by `serving/keys.py` when the app is given
a `KeyCheck`, as every server of a deployment is): feedback needs `feedback`, stats and load need
`operate`, and infer needs `infer` when RETRAINER_SERVING_REQUIRE_KEY is set; 401 without a valid
key, 403 naming the scope a key lacks.

`infer` takes JSON or binary tensor data (`Inference-Header-Content-Length`, see `serving.protocol`).
A W3C `traceparent` header makes the request's `infer` span (flows/tracing.py) a child of the
client's span. Without a version, `infer` is routed champion/canary by the canary weight, or by a
hash of the `X-Retrainer-Sticky` header when present; the answer's `model_version` says which
version served it. Refusals use OIP's error body `{"error": "<what is wrong and how to fix it>"}`
with the status from `ERROR_CODE_TO_HTTP_STATUS` (bad input 400, unknown model or version 404, body
over the limit 413, no champion yet 503); malformed input never produces a 500. What answers a parsed request
(routing, batching, counting) is `Inference`, which the gRPC service (`serving/grpc_server.py`) shares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from domain.apikeys import Scope as KeyScope
from domain.errors import ConflictError, InvalidInputError, NotFoundError, PayloadTooLargeError, RetrainerError
from domain.evidence import ModelStats, ServedVersion
from flows.tracing import finished_span
from serving.keys import API_KEY_HEADER, KeyCheck
from serving.metrics import FeedbackStore, Prediction, ServingMetrics, is_label
from serving.protocol import (
    HEADER_LENGTH_HEADER,
    OUTPUT_NAMES,
    InferRequest,
    Tensor,
    classifier_tensors,
    encode_answer,
    infer_response,
    model_metadata,
    parse_body,
    parse_json,
    regression_tensors,
)
from serving.registry import ModelRegistry, Routed, RowAnswer
from serving.reports import ReplicaReporter
from web.errors import MODEL_FAILED, InternalServerError, MethodNotAllowedError, status_for

log = logging.getLogger("retrainer.serving")

STICKY_HEADER = "X-Retrainer-Sticky"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
SERVER_NAME = "retrainer"
SERVER_METADATA: Mapping[str, Any] = {"name": SERVER_NAME, "version": "2", "extensions": ["binary_tensor_data"]}


class ModelFailedError(RetrainerError, code=MODEL_FAILED):
    """The model raised or produced non-finite output for a valid request."""


def as_refusal(error: Exception) -> RetrainerError:
    """Any exception as the RetrainerError a client is answered with (by its code's status in
    `web.errors`, on every transport): anything else (a bug) as an InternalServerError logged with its
    traceback; a server-side failure is logged too."""
    if not isinstance(error, RetrainerError):
        log.error("unexpected error in the model server", exc_info=error)
        error = InternalServerError(f"internal error ({type(error).__name__}); see the server log")
    elif status_for(error) >= 500:
        log.warning("inference request failed: %s: %s", error.code, error.message)
    return error


def _refusal(error: Exception) -> tuple[int, bytes, dict[str, str]]:
    """Status, OIP error body and extra headers for any exception (`as_refusal`)."""
    error = as_refusal(error)
    headers = error.headers if isinstance(error, MethodNotAllowedError) else {}
    # the standard library with ASCII escapes: an error message can quote any input, and must always encode
    return status_for(error), json.dumps({"error": error.message}).encode(), headers


def error_response(error: Exception) -> Response:
    status, body, headers = _refusal(error)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


class _ForwardPassCollector(Collector):
    """Forward passes and rows per loaded model, read from the registry at scrape time."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[CounterMetricFamily]:
        labels = ["pipeline", "variant", "version"]
        passes = CounterMetricFamily(
            "retrainer_serving_forward_passes", "Forward passes run by each loaded model.", labels=labels
        )
        rows = CounterMetricFamily("retrainer_serving_forward_rows", "Rows through each loaded model.", labels=labels)
        for pipeline in self._registry.pipelines():
            state = self._registry.state(pipeline)
            for variant, model in (("champion", state.champion), ("canary", state.canary)):
                if model is not None:
                    passes.add_metric([pipeline, variant, model.version], model.forward_passes)
                    rows.add_metric([pipeline, variant, model.version], model.rows_forwarded)
        yield passes
        yield rows


async def _receive_body(declared_length: str | None, receive: Receive, limit: int) -> bytes:
    """The whole request body from ASGI `receive`, refused past `limit` bytes (declared or sent)."""
    too_large = PayloadTooLargeError(f"request body is over {limit} bytes; send fewer rows per request")
    if (
        declared_length is not None
        and declared_length.isascii()
        and declared_length.isdigit()
        and int(declared_length) > limit
    ):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _read_body(request: Request, limit: int) -> bytes:
    return await _receive_body(request.headers.get("content-length"), request.receive, limit)


# (pipeline, version, body, sticky key, Inference-Header-Content-Length, traceparent) -> (body, its JSON
# header's length when outputs go as binary data, variant)
InferHandler = Callable[
    [str, str | None, bytes, str | None, str | None, str | None], Awaitable[tuple[bytes, int | None, str]]
]
_HEADER_LENGTH = HEADER_LENGTH_HEADER.lower().encode()
_API_KEY = API_KEY_HEADER.lower().encode()
TRACEPARENT_HEADER = "traceparent"  # W3C Trace Context: the client's span, which `infer` continues
_TRACEPARENT = TRACEPARENT_HEADER.encode()
INFER_PATH = re.compile(r"/v2/models/(?P<pipeline>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class ModelServerApp(FastAPI):
    """FastAPI for every endpoint but `infer`, which this answers as plain ASGI before FastAPI's
    middleware, routing and dependency layers: they cost more CPU per request than the rest of an
    inference together (`bench/serving.py` measures the path), and `infer` needs none of them.
    Errors get the same bodies and statuses as the FastAPI handlers give."""

    infer_handler: InferHandler | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    infer_keys: KeyCheck | None = None  # set when inference needs an `infer` key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.infer_handler is not None:
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                if scope["method"] == "POST":
                    await self._infer(scope, receive, send, match["pipeline"], match["version"])
                else:
                    await _send_refusal(send, MethodNotAllowedError("infer takes POST", allow=("POST",)))
                return
        await super().__call__(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, send: Send, pipeline: str, version: str | None) -> None:
        assert self.infer_handler is not None
        headers: dict[bytes, bytes] = dict(scope["headers"])
        extra: list[tuple[bytes, bytes]] = []
        try:
            if self.infer_keys is not None:
                presented = headers.get(_API_KEY)
                await self.infer_keys.authorize(presented.decode("latin-1") if presented else None, KeyScope.INFER)
            length = headers.get(b"content-length")
            body = await _receive_body(length.decode("latin-1") if length else None, receive, self.max_body_bytes)
            sticky = headers.get(STICKY_HEADER.lower().encode())
            header_length = headers.get(_HEADER_LENGTH)
            traceparent = headers.get(_TRACEPARENT)
            payload, json_length, variant = await self.infer_handler(
                pipeline,
                version,
                body,
                sticky.decode("latin-1") if sticky else None,
                header_length.decode("latin-1") if header_length is not None else None,
                traceparent.decode("latin-1") if traceparent else None,
            )
            extra.append((b"x-retrainer-variant", variant.encode()))
        except ClientDisconnect:
            return
        except Exception as e:
            await _send_refusal(send, e)
            return
        if json_length is None:
            await _send_json(send, 200, payload, extra)
        else:
            extra.append((_HEADER_LENGTH, str(json_length).encode()))
            await _send_json(send, 200, payload, extra, b"application/octet-stream")


async def _send_refusal(send: Send, error: Exception) -> None:
    status, payload, headers = _refusal(error)
    extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    await _send_json(send, status, payload, extra)


async def _send_json(
    send: Send, status: int, payload: bytes, extra: list[tuple[bytes, bytes]], media_type: bytes = b"application/json"
) -> None:
    headers = [(b"content-type", media_type), (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass(frozen=True, slots=True)
class Answered:
    """One inference's OIP v2 answer (`serving.protocol.infer_response`), the outputs asked for as
    binary data, and the variant that served it."""

    answer: dict[str, Any]
    binary_outputs: frozenset[str]
    variant: str


class Inference:
    """What every transport (HTTP here, gRPC in `serving/grpc_server.py`) answers with: routing to a
    variant, batching, per-variant counting and the remembered predictions for feedback. Sharing one
    instance is what makes a request count in the canary's window whichever transport carried it."""

    infer_keys: KeyCheck | None = None  # set when inference needs an `infer` key, on every transport

    def __init__(self, registry: ModelRegistry, metrics: ServingMetrics, feedback: FeedbackStore) -> None:
        self.registry, self.metrics, self.feedback = registry, metrics, feedback

    def server_ready(self) -> bool:
        return self.registry.is_ready() and bool(self.registry.pipelines())

    def model_ready(self, pipeline: str, version: str | None = None) -> bool:
        """The pipeline has a champion (or serves `version`); NotFoundError if it is not served here."""
        state = self.registry.state(pipeline)
        if version is None:
            return state.champion is not None
        return any(m is not None and m.version == version for m in (state.champion, state.canary))

    def metadata(self, pipeline: str, version: str | None) -> dict[str, Any]:
        with self.registry.route(pipeline, version=version) as routed:
            state = self.registry.state(pipeline)
            versions = [m.version for m in (state.champion, state.canary) if m is not None]
            model = routed.model
            text = model.tokenizer is not None
            return model_metadata(pipeline, versions, model.input_shape, model.task, model.width, text=text)

    async def infer(
        self,
        pipeline: str,
        version: str | None,
        parsed: InferRequest,
        sticky_key: str | None,
        traceparent: str | None = None,
    ) -> Answered:
        """One parsed request, routed (by `version`, else the canary weight or `sticky_key`), batched,
        counted for its variant and remembered for feedback; its `infer` span continues the client's
        `traceparent` when it sent one."""
        registry, metrics = self.registry, self.metrics
        request_id = parsed.id or os.urandom(16).hex()  # as random as uuid4().hex, a fifth of its CPU
        with registry.route(pipeline, sticky_key=sticky_key, version=version) as routed:
            model = routed.model
            started = time.perf_counter()
            try:
                rows = model.rows_of(parsed)
                outputs, binary_outputs = parsed.outputs_for(OUTPUT_NAMES[model.task])
            except InvalidInputError:
                metrics.rejected(pipeline, routed.variant, model.version)
                raise
            try:
                answers = await model.infer(rows)
                if not all(answer.finite for answer in answers):
                    raise ModelFailedError(
                        f"model {pipeline!r} version {model.version} produced NaN/inf for this input; "
                        "check the model (the input itself was finite)"
                    )
            except Exception as e:
                metrics.failed(pipeline, routed.variant, model.version, time.perf_counter() - started)
                if isinstance(e, RetrainerError):
                    raise
                raise ModelFailedError(
                    f"model {pipeline!r} version {model.version} failed on this input ({type(e).__name__}: {e})"
                ) from e
            categories, tensors, prediction = _answered(routed, answers)
            elapsed = time.perf_counter() - started
            metrics.observe(pipeline, routed.variant, model.version, elapsed, categories)
            finished_span(
                "infer", elapsed, parent=traceparent, pipeline=pipeline, variant=routed.variant, version=model.version
            )
            self.feedback.remember(request_id, prediction)
            answer = infer_response(pipeline, model.version, request_id, tensors, outputs)
            return Answered(answer, binary_outputs, routed.variant)


def create_serving_app(
    registry: ModelRegistry,
    *,
    metrics: ServingMetrics | None = None,
    feedback: FeedbackStore | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    reload: Callable[[], Mapping[str, str]] | None = None,
    reporter: ReplicaReporter | None = None,
    keys: KeyCheck | None = None,
) -> FastAPI:
    """The OIP v2 app over `registry`. `metrics` and `feedback` are created if not given; they are
    also reachable as `app.state.metrics` and `app.state.feedback` for an in-process controller.
    `reload` (e.g. `MetadataFollower.sync`) re-reads the models from the metadata database; the
    canary controller calls it through `POST /v2/repository/models/{pipeline}/load` after each step.
    `reporter` (`MetadataFollower.reporter`) gets the metrics, so the replica's canary windows reach
    the metadata database and the controller judges every replica's traffic together. `keys` guards
    feedback, stats, load and (if it says so) infer with API keys; without it (an app with no metadata
    database, in a unit test) every endpoint is open."""
    metrics = metrics or ServingMetrics()
    feedback = feedback or FeedbackStore()
    metrics.registry.register(_ForwardPassCollector(registry))
    app = ModelServerApp(title="Retrainer model server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics, app.state.feedback = registry, metrics, feedback
    app.state.reporter = reporter
    inference = app.state.inference = Inference(registry, metrics, feedback)  # also for serving/grpc_server.py
    if reporter is not None:
        reporter.attach(metrics)

    def needs(scope: KeyScope) -> list[Any]:
        """The dependency of a route that needs an API key with `scope` (none without `keys`)."""
        if keys is None:
            return []

        async def check(request: Request) -> None:
            await keys.authorize(request.headers.get(API_KEY_HEADER), scope)

        return [Depends(check)]

    async def any_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(
                NotFoundError("no such endpoint; see /v2/models/{model}/infer (Open Inference Protocol v2)")
            )
        if exc.status_code == 405:
            allow = tuple(method for method in (exc.headers or {}).get("Allow", "").split(", ") if method)
            message = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allow)}"
            return error_response(MethodNotAllowedError(message, allow))
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(RetrainerError, any_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, any_error)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return dict(SERVER_METADATA)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        is_ready = inference.server_ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{pipeline}/ready")
    async def model_ready(pipeline: str) -> JSONResponse:
        is_ready = inference.model_ready(pipeline)  # 404 if unknown
        return JSONResponse({"name": pipeline, "ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{pipeline}")
    async def model_metadata_route(pipeline: str) -> dict[str, Any]:
        return inference.metadata(pipeline, None)

    @app.get("/v2/models/{pipeline}/versions/{version}")
    async def version_metadata_route(pipeline: str, version: str) -> dict[str, Any]:
        return inference.metadata(pipeline, version)

    async def infer(
        pipeline: str,
        version: str | None,
        body: bytes,
        sticky_key: str | None,
        header_length: str | None,
        traceparent: str | None,
    ) -> tuple[bytes, int | None, str]:
        """One inference request (JSON, or binary with `header_length`): the encoded OIP v2 answer, its
        JSON header's length when it carries binary outputs, and the variant that served it."""
        answered = await inference.infer(pipeline, version, parse_body(body, header_length), sticky_key, traceparent)
        payload, json_length = encode_answer(answered.answer, answered.binary_outputs)
        return payload, json_length, answered.variant

    # POST /v2/models/{pipeline}[/versions/{version}]/infer: answered by ModelServerApp.__call__
    app.infer_handler, app.max_body_bytes = infer, max_body_bytes
    app.infer_keys = inference.infer_keys = keys if keys is not None and keys.require_for_infer else None

    @app.post("/v2/models/{pipeline}/feedback", dependencies=needs(KeyScope.FEEDBACK))
    async def feedback_route(request: Request, pipeline: str) -> dict[str, Any]:
        payload = parse_json(await _read_body(request, max_body_bytes))
        registry.state(pipeline)  # 404 if unknown
        if not isinstance(payload, dict):
            raise InvalidInputError('feedback body must be a JSON object {"request_id": "...", "label": 0}')
        request_id: Any = payload.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInputError("feedback.request_id: must be the id of an inference answer (a string)")
        label: Any = payload.get("label")
        if not is_label(label):
            raise InvalidInputError(
                "feedback.label: must be the true class id (a classifier) or value (a regression model), or a list "
                "with one per row (a regression model with several outputs: a list of numbers per row)"
            )
        result = feedback.label(pipeline, request_id, label)  # checked against the model's task
        prediction = result.prediction
        version, variant = prediction.version, prediction.variant
        metrics.labelled(pipeline, variant, version, result.labels, result.correct, result.abs_errors)
        answer = {"request_id": request_id, "model_name": pipeline, "model_version": version, "variant": variant}
        if result.abs_errors is None:
            return {**answer, "labels": result.labels, "correct": result.correct}
        return {**answer, "labels": result.labels, "mean_abs_error": result.abs_errors[0] / result.labels}

    def served(pipeline: str, window_seconds: float = 0.0) -> ModelStats:
        """What serves the pipeline now and, for a window > 0, each variant's window."""
        state = registry.state(pipeline)  # 404 if unknown
        weight = state.canary_weight if state.canary is not None else 0.0
        return ModelStats(
            name=pipeline,
            champion=None
            if state.champion is None
            else ServedVersion(version=state.champion.version, weight=100 - weight),
            canary=None if state.canary is None else ServedVersion(version=state.canary.version, weight=weight),
            window_seconds=window_seconds,
            variants=tuple(metrics.snapshot(pipeline, window_seconds)) if window_seconds > 0 else (),
        )

    @app.get("/v2/models/{pipeline}/stats", dependencies=needs(KeyScope.OPERATE))
    async def stats_route(pipeline: str, window_seconds: float = 60.0) -> ModelStats:
        if not math.isfinite(window_seconds) or not 0 < window_seconds <= 86_400:
            raise InvalidInputError("window_seconds: must be a number of seconds in (0, 86400]")
        return served(pipeline, window_seconds)

    @app.post("/v2/repository/models/{pipeline}/load", dependencies=needs(KeyScope.OPERATE))
    async def load_route(pipeline: str) -> dict[str, Any]:
        if reload is None:
            raise ConflictError("this model server does not follow a metadata database; nothing to reload")
        report = await asyncio.to_thread(reload)
        answer = served(pipeline).model_dump(mode="json", include={"name", "champion", "canary"})
        answer["loaded"] = report.get(pipeline, "not registered in the metadata database")
        return answer

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _answered(routed: Routed, answers: list[RowAnswer]) -> tuple[list[int], dict[str, Tensor], Prediction]:
    """What one request's answers become: each row's category for the drift counts (a classifier's
    class; a regression model's bin among the champion's edges, first output, binned like the gate's
    disagreement: `searchsorted(edges, value, side="right")`), the output tensors, and the
    prediction remembered for feedback."""
    model = routed.model
    values = [answer.values for answer in answers]
    if model.regression is None:
        classes = [int(answer.predicted_class or 0) for answer in answers]
        tensors = classifier_tensors(values, classes)
        return classes, tensors, Prediction(routed.pipeline, routed.variant, model.version, tuple(classes), model.width)
    first = np.fromiter((row[0] for row in values), dtype=np.float64, count=len(values))
    bins = np.searchsorted(np.asarray(routed.drift_edges, dtype=np.float64), first, side="right").tolist()
    remembered = tuple(tuple(row) for row in values)
    prediction = Prediction(routed.pipeline, routed.variant, model.version, (), model.width, remembered)
    return bins, regression_tensors(values), prediction
