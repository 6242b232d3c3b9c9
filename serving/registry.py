"""Which model serves each pipeline: a champion and optionally a canary with a traffic weight.

A request takes a `Lease` on the `LoadedModel` it was routed to and keeps it until its answer is
ready. Replacing a model (new champion, new canary, promotion, rollback) is one reference swap
under the registry's lock, so a request never sees half a change; requests that started on the
old model finish on it, and the old model's batcher is closed when its last lease ends. After
that nothing in the server refers to it and its memory is freed.

A classifier answers probabilities and a class per row; a regression model (`RegressionServing`)
answers floats in its target's units: its outputs mapped back by the target standardizer fitted at
training (`ml.standardizer.TargetStandardizer.inverse`). A text model (a manifest with a tokenizer)
takes strings (OIP v2 BYTES) and tokenises them with its version's own tokenizer (`rows_of`).
For the canary's prediction drift a routed request also carries the bin edges its regression
predictions are counted in: the champion's `prediction_bins` for both variants (`Routed.drift_edges`).

Traffic split: a request goes to the canary with probability `canary_weight` percent. With a
sticky key (the `X-Retrainer-Sticky` header) a hash of pipeline and key decides instead, so one
user always sees the same variant for a given weight, and a user in the canary stays there as the
weight grows.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from domain.entities import ModelVersion
from domain.errors import InvalidInputError, NotFoundError, RetrainerError
from domain.task import Task
from ml.package import load_package, manifest_task, output_width, target_standardizer_of, tokenizer_of
from ml.standardizer import Standardizer, TargetStandardizer
from ml.text import TextTokenizer
from serving.batching import BatchingConfig, DynamicBatcher
from serving.protocol import InferRequest
from storage.artifacts.base import ArtifactStore

Variant = Literal["champion", "canary"]
CHAMPION: Variant = "champion"
CANARY: Variant = "canary"


class ModelNotReadyError(RetrainerError):
    """The pipeline is expected by the server but no champion is loaded yet."""

    code = "model_not_ready"


class RowAnswer(NamedTuple):
    """The model's answer for one input row: a classifier's probabilities and class, or a regression
    model's prediction (its outputs in the target's units; `predicted_class` None)."""

    values: list[float]
    predicted_class: int | None
    finite: bool


@dataclass(frozen=True, slots=True)
class RegressionServing:
    """What makes a loaded model a regression model: its output width, the target standardizer whose
    inverse maps its outputs to the target's units, and the inner edges of its prediction bins (first
    output), which count both variants' predictions while it is the champion."""

    outputs: int
    target_standardizer: TargetStandardizer
    prediction_bins: tuple[float, ...] = ()


class LoadedModel:
    """One model version in memory, ready to answer: model (eval, CPU), standardizer, shapes, batcher.

    `predict(rows)` maps [N, F] float32 rows (F = prod(input_shape)) to [N, classes] probabilities,
    or with `regression` to [N, outputs] predictions in the target's units.
    """

    def __init__(
        self,
        pipeline: str,
        version: str,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        output_classes: int | None = None,
        standardizer: Standardizer | None = None,
        batching: BatchingConfig | None = None,
        version_id: int | None = None,
        regression: RegressionServing | None = None,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        if not input_shape or any(int(d) < 1 for d in input_shape):
            raise InvalidInputError(f"{pipeline} v{version}: input_shape must be positive sizes (got {input_shape})")
        self.width = _output_width(f"{pipeline} v{version}", output_classes, regression)
        self.regression = regression
        self.pipeline = pipeline
        self.version = version
        self.version_id = version_id
        self.model = model.eval()
        self.standardizer = standardizer
        self.tokenizer = tokenizer
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_features = math.prod(self.input_shape)
        self.output_classes = output_classes
        self.task: Task = "classification" if regression is None else "regression"
        self.batching = batching or BatchingConfig()
        self.batcher: DynamicBatcher | None = (
            DynamicBatcher(self.answer_rows, self.batching, name=f"{pipeline}-v{version}", in_flight=self._lease_count)
            if self.batching.enabled
            else None
        )
        self.forward_passes = 0
        self.rows_forwarded = 0
        self._leases = 0
        self._retired = False
        self._lock = threading.Lock()

    def rows_of(self, request: InferRequest) -> torch.Tensor:
        """A request's [N, F] float32 rows: a text model tokenises its strings with its own tokenizer
        (token ids as floats, the data path's convention); InvalidInputError when the input does not fit."""
        if self.tokenizer is None:
            return request.rows_for(self.input_shape)
        ids = self.tokenizer.encode(request.texts_for_text_model())
        return torch.from_numpy(ids.astype("float32"))

    async def infer(self, rows: torch.Tensor) -> list[RowAnswer]:
        """One answer per row of [N, F] `rows`, through the batcher when batching is on."""
        batcher = self.batcher  # once: a retired model drops its batcher (after its last request)
        if batcher is not None:
            answers: list[RowAnswer] = await batcher.run(rows)
            return answers
        return await asyncio.to_thread(self.answer_rows, rows)

    def answer_rows(self, rows: torch.Tensor) -> list[RowAnswer]:
        """`predict`, then each row's values, class (classifiers) and finiteness as Python values: done
        once per forward pass (per batch), so a request only picks its rows out of lists. In numpy, not
        torch: every torch call releases and retakes the GIL, and on a server whose event loops hold
        it that handoff costs ~20-50 µs of CPU each, several times the call itself."""
        values = self.predict(rows).numpy()
        classes = values.argmax(axis=1).tolist() if self.regression is None else [None] * int(values.shape[0])
        return [
            RowAnswer(*row)
            for row in zip(values.tolist(), classes, np.isfinite(values).all(axis=1).tolist(), strict=True)
        ]

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        """One forward pass (the batcher's, or a request's own when batching is off): probabilities, or
        a regression model's outputs in the target's units. No torch call that would change nothing
        (a reshape to the same shape, a cast to the same dtype): each costs a GIL handoff (`answer_rows`)."""
        with self._lock:
            self.forward_passes += 1
            self.rows_forwarded += int(rows.shape[0])
        with torch.inference_mode():
            x = (
                rows
                if rows.dim() == 2 and rows.shape[1] == self.num_features
                else rows.reshape(rows.shape[0], self.num_features)
            )
            if self.standardizer is not None:
                x = self.standardizer.transform_tensor(x)
            x = _float32(x)
            outputs = _float32(self.model(x))
            expected = (int(rows.shape[0]), self.width)
            if tuple(outputs.shape) != expected:
                key = "output_classes" if self.regression is None else "outputs"
                raise RuntimeError(
                    f"the model returned shape {list(outputs.shape)} for {expected[0]} rows; "
                    f"it must return [rows, {self.width}] ({key} in its manifest)"
                )
            if self.regression is None:
                return torch.softmax(outputs, dim=-1)
            return self.regression.target_standardizer.inverse_tensor(outputs)

    # requests a transport expects soon (serving/grpc_server.py: gRPC clients between two calls); the
    # batcher waits for them as for leased ones
    arrivals: Callable[[], int] | None = None

    def _lease_count(self) -> int:
        arrivals = self.arrivals  # plain reads: a stale value only costs or saves one short wait
        return self._leases if arrivals is None else self._leases + arrivals()

    # -- lifetime: leases taken by requests, retirement by the registry --------------------------
    def _acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            finished = self._retired and self._leases == 0
        if finished:
            self._shutdown()

    def _retire(self) -> None:
        with self._lock:
            self._retired = True
            finished = self._leases == 0
        if finished:
            self._shutdown()

    def _shutdown(self) -> None:
        """Closes the batcher and drops it: the batcher holds this model's bound methods, so keeping
        it would make a reference cycle that only the cycle collector frees; without it the model and
        its weights go with the last reference (the worker thread lets go when the queue is drained)."""
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher.close()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._leases

    def __repr__(self) -> str:
        return f"LoadedModel({self.pipeline!r}, version={self.version!r})"


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _output_width(name: str, output_classes: int | None, regression: RegressionServing | None) -> int:
    """The model's output width, or InvalidInputError naming what does not fit."""
    if regression is None:
        if output_classes is None or output_classes < 2:
            raise InvalidInputError(f"{name}: output_classes must be >= 2 (got {output_classes})")
        return output_classes
    if output_classes is not None:
        raise InvalidInputError(f"{name}: a regression model has outputs, not output_classes; drop output_classes")
    if regression.outputs < 1:
        raise InvalidInputError(f"{name}: outputs must be >= 1 (got {regression.outputs})")
    width = regression.target_standardizer.num_features
    if width != regression.outputs:
        raise InvalidInputError(
            f"{name}: target_standardizer has {width} column(s) but the model has {regression.outputs} outputs; "
            "register the version with ml.package.manifest_for(...)"
        )
    edges = regression.prediction_bins
    if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
        raise InvalidInputError(f"{name}: prediction_bins must be finite and rise strictly (got {list(edges)})")
    return regression.outputs


def load_version(
    store: ArtifactStore,
    version: ModelVersion,
    *,
    batching: BatchingConfig | None = None,
    work_dir: Path | None = None,
) -> LoadedModel:
    """Downloads a registered model version (digest verified by the store) into a temporary folder
    and loads it with `load_package` (digest verified again on the bytes it loads).

    ArtifactIntegrityError if the stored bytes do not match the version's sha256; the model is then
    not loaded at all (fail closed).
    """
    manifest = version.manifest
    task = manifest_task(manifest)
    widths = ("outputs", "target_standardizer") if task == "regression" else ("output_classes",)
    missing = [key for key in ("input_shape", *widths, "variant", "standardizer") if key not in manifest]
    if missing:
        raise InvalidInputError(
            f"model {version.pipeline} v{version.version}: manifest lacks {', '.join(missing)}; "
            "register the version with ml.package.manifest_for(...)"
        )
    ref = store.ref(version.artifact_uri, version.sha256, version.size_bytes)
    with tempfile.TemporaryDirectory(prefix="retrainer-serving-", dir=work_dir) as tmp:
        path = store.download(ref, Path(tmp) / "model.pt")
        model, standardizer = load_package(path, manifest, version.sha256)
    target = target_standardizer_of(manifest, source=f"model {version.pipeline} v{version.version}")
    tokenizer = tokenizer_of(manifest, source=f"model {version.pipeline} v{version.version}")
    regression = (
        None
        if target is None
        else RegressionServing(
            output_width(manifest), target, tuple(float(edge) for edge in manifest.get("prediction_bins", ()))
        )
    )
    return LoadedModel(
        version.pipeline,
        str(version.version),
        model,
        input_shape=[int(d) for d in manifest["input_shape"]],
        output_classes=None if regression is not None else output_width(manifest),
        standardizer=standardizer,
        batching=batching,
        version_id=version.id,
        regression=regression,
        tokenizer=tokenizer,
    )


class Routed(NamedTuple):
    """Where one request goes: the variant and the model it holds a lease on, and for a regression
    model the bin edges its predictions are counted in for the canary's drift check (the champion's)."""

    pipeline: str
    variant: Variant
    model: LoadedModel
    drift_edges: tuple[float, ...] = ()


class Lease:
    """A request's lease on the model it was routed to (`ModelRegistry.route`), taken at routing and
    given back when its `with` block ends. A class, not a generator context manager: one is made per
    request, and this costs half as much CPU."""

    __slots__ = ("routed",)

    def __init__(self, routed: Routed) -> None:
        self.routed = routed

    def __enter__(self) -> Routed:
        return self.routed

    def __exit__(self, *_exc: object) -> None:
        self.routed.model._release()


def drift_edges(champion: LoadedModel, model: LoadedModel) -> tuple[float, ...]:
    """The champion's prediction bins, for both variants: drift asks whether the canary predicts
    differently from the champion. A champion without bins (a classifier, before a task change)
    leaves the model's own."""
    source = champion.regression or model.regression
    return source.prediction_bins if source is not None else ()


@dataclass(frozen=True, slots=True)
class PipelineState:
    """A consistent view of one pipeline's models at one moment."""

    pipeline: str
    champion: LoadedModel | None
    canary: LoadedModel | None
    canary_weight: float


@dataclass(slots=True)
class _Slot:
    champion: LoadedModel | None = None
    canary: LoadedModel | None = None
    canary_weight: float = 0.0

    def models(self) -> set[LoadedModel]:
        return {m for m in (self.champion, self.canary) if m is not None}


_SlotChange = Callable[[_Slot], None]


def _check_weight(pipeline: str, weight: float) -> float:
    if not 0.0 <= weight <= 100.0 or math.isnan(weight):
        raise InvalidInputError(f"{pipeline}: canary weight must be a percentage 0..100 (got {weight})")
    return float(weight)


def sticky_fraction(pipeline: str, key: str) -> float:
    """A stable number in [0, 100) for (pipeline, key); below the canary weight means canary."""
    digest = hashlib.sha256(f"{pipeline}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


class ModelRegistry:
    """Per pipeline a champion and an optional canary; thread-safe; swaps are atomic."""

    def __init__(self, pipelines: Iterable[str] = (), *, rng: random.Random | None = None) -> None:
        """`pipelines` are expected: the server is not ready until each has a champion."""
        self._slots: dict[str, _Slot] = {name: _Slot() for name in pipelines}
        self._lock = threading.Lock()
        self._rng = rng or random.Random()  # noqa: S311 - traffic split, not security

    # -- changes -------------------------------------------------------------------------------
    def expect(self, pipeline: str) -> None:
        with self._lock:
            self._slots.setdefault(pipeline, _Slot())

    def set_champion(self, model: LoadedModel) -> None:
        """Makes `model` the champion of its pipeline (registering the pipeline if new)."""
        self._change(model.pipeline, lambda slot: setattr(slot, "champion", model))

    def set_canary(self, model: LoadedModel, weight: float) -> None:
        """Serves `model` to `weight` percent of the pipeline's traffic (replacing any canary)."""
        weight = _check_weight(model.pipeline, weight)

        def change(slot: _Slot) -> None:
            if slot.champion is None:
                raise ModelNotReadyError(f"{model.pipeline}: load a champion before a canary")
            slot.canary, slot.canary_weight = model, weight

        self._change(model.pipeline, change)

    def set_canary_weight(self, pipeline: str, weight: float) -> None:
        weight = _check_weight(pipeline, weight)

        def change(slot: _Slot) -> None:
            if slot.canary is None:
                raise NotFoundError(f"{pipeline}: no canary is loaded; call set_canary first")
            slot.canary_weight = weight

        self._change(pipeline, change)

    def remove_canary(self, pipeline: str) -> None:
        """Rollback: all traffic back to the champion; the canary is freed after its last request."""

        def change(slot: _Slot) -> None:
            slot.canary, slot.canary_weight = None, 0.0

        self._change(pipeline, change)

    def promote_canary(self, pipeline: str) -> None:
        """The canary becomes the champion (all traffic); the old champion is freed after its last request."""

        def change(slot: _Slot) -> None:
            if slot.canary is None:
                raise NotFoundError(f"{pipeline}: no canary to promote")
            slot.champion, slot.canary, slot.canary_weight = slot.canary, None, 0.0

        self._change(pipeline, change)

    def _change(self, pipeline: str, change: _SlotChange) -> None:
        with self._lock:
            slot = self._slots.setdefault(pipeline, _Slot())
            before = slot.models()
            change(slot)
            dropped = before - slot.models()
        for model in dropped:
            model._retire()

    # -- reads ---------------------------------------------------------------------------------
    def pipelines(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def state(self, pipeline: str) -> PipelineState:
        with self._lock:
            slot = self._slots.get(pipeline)
            if slot is None:
                raise NotFoundError(self._unknown(pipeline))
            return PipelineState(pipeline, slot.champion, slot.canary, slot.canary_weight)

    def is_ready(self, pipeline: str | None = None) -> bool:
        """One pipeline has a champion; with no argument: every expected pipeline has one."""
        with self._lock:
            if pipeline is not None:
                slot = self._slots.get(pipeline)
                return slot is not None and slot.champion is not None
            return all(slot.champion is not None for slot in self._slots.values())

    def route(self, pipeline: str, *, sticky_key: str | None = None, version: str | None = None) -> Lease:
        """Picks the variant for one request and holds a lease on its model until the `with` block ends.

        `version` pins the request to the champion or canary with that version (404 otherwise).
        """
        with self._lock:
            slot = self._slots.get(pipeline)
            if slot is None:
                raise NotFoundError(self._unknown(pipeline))
            if slot.champion is None:
                raise ModelNotReadyError(f"model {pipeline!r} has no champion loaded yet; retry once it is ready")
            variant, model = self._pick(pipeline, slot, sticky_key, version)
            model._acquire()  # under the registry lock: a swap cannot retire it in between
            return Lease(Routed(pipeline, variant, model, drift_edges(slot.champion, model)))

    def _pick(
        self, pipeline: str, slot: _Slot, sticky_key: str | None, version: str | None
    ) -> tuple[Variant, LoadedModel]:
        assert slot.champion is not None
        if version is not None:
            for variant, model in ((CHAMPION, slot.champion), (CANARY, slot.canary)):
                if model is not None and model.version == version:
                    return variant, model
            served = [m.version for m in (slot.champion, slot.canary) if m is not None]
            raise NotFoundError(
                f"model {pipeline!r} has no version {version!r} loaded; it serves {', '.join(served)} "
                f"(or omit the version)"
            )
        if slot.canary is not None and slot.canary_weight > 0.0:
            draw = sticky_fraction(pipeline, sticky_key) if sticky_key else self._rng.random() * 100.0
            if draw < slot.canary_weight:
                return CANARY, slot.canary
        return CHAMPION, slot.champion

    def _unknown(self, pipeline: str) -> str:
        known = ", ".join(sorted(self._slots)) or "none"
        return f"model {pipeline!r} is not served here; served models: {known}"

    def close(self) -> None:
        """Server shutdown: closes every batcher (queued requests are still answered)."""
        with self._lock:
            models = [m for slot in self._slots.values() for m in slot.models()]
        for model in models:
            batcher = model.batcher  # once: retirement may drop it meanwhile
            if batcher is not None:
                batcher.close()
