"""Open Inference Protocol v2 (REST, JSON) request parsing and response building for one model.

Inputs: exactly one tensor named `input`, datatype `FP32`, shape `[N, *input_shape]`, `data` flat
or nested in row-major order, every value finite. Outputs (both returned unless the request's
`outputs` names some):

- `probabilities`: FP32 `[N, classes]`, the softmax of the model's logits;
- `predicted_class`: INT64 `[N]`, the argmax.

Every refusal is an `InvalidInputError` whose message names the field and the fix. Binary tensor
data (the `Inference-Header-Content-Length` extension) is not supported; send JSON data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import torch

from domain.errors import InvalidInputError

INPUT_NAME = "input"
INPUT_DATATYPE = "FP32"
PROBABILITIES = "probabilities"
PREDICTED_CLASS = "predicted_class"
OUTPUT_NAMES = (PROBABILITIES, PREDICTED_CLASS)
MAX_ROWS = 8192


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A syntactically valid request: the input checked against itself, not yet against a model."""

    id: str | None
    shape: tuple[int, ...]
    values: npt.NDArray[np.float32]  # flat
    outputs: tuple[str, ...]

    def rows_for(self, input_shape: Sequence[int]) -> torch.Tensor:
        """[N, F] float32 rows for a model with `input_shape`; InvalidInputError if the shape does not fit."""
        expected = [-1, *input_shape]
        if list(self.shape[1:]) != list(input_shape):
            raise InvalidInputError(
                f"inputs[0].shape: {list(self.shape)} does not fit the model, which takes {expected} "
                f"(N rows of {list(input_shape)}); reshape the data"
            )
        return torch.from_numpy(self.values.reshape(self.shape[0], math.prod(input_shape)))


def parse_json(body: bytes) -> Any:
    """orjson first (fast, strict). What only the standard library accepts (NaN/Infinity literals,
    which many clients send and the input check names; integers past 64 bits) is parsed again with
    it, and a lone surrogate in a string is refused (it could not be written back as JSON)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        payload = json.loads(body)
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            "request body has a string with a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode"
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidInputError(f"request body is not valid JSON ({e}); send an OIP v2 inference request") from e
    return payload


def parse_infer_request(payload: Any) -> InferRequest:
    if not isinstance(payload, dict):
        raise InvalidInputError('request body must be a JSON object {"inputs": [...]}')
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError(f"id must be a string (got {type(request_id).__name__}); or omit it")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError(
            f'inputs: missing or empty; send [{{"name": "{INPUT_NAME}", "shape": [N, ...], '
            f'"datatype": "{INPUT_DATATYPE}", "data": [...]}}]'
        )
    names = [item.get("name") if isinstance(item, dict) else None for item in inputs]
    extra = [str(n) for n in names if n != INPUT_NAME]
    if extra:
        raise InvalidInputError(f"inputs: unexpected input(s) {', '.join(extra)}; the model takes one input named "
                                f"{INPUT_NAME!r}")  # fmt: skip
    if len(inputs) > 1:
        raise InvalidInputError(f"inputs: {INPUT_NAME!r} is given {len(inputs)} times; send it once")
    shape, values = _parse_input(inputs[0])
    return InferRequest(request_id, shape, values, _parse_outputs(payload.get("outputs")))


def _parse_input(item: dict[str, Any]) -> tuple[tuple[int, ...], npt.NDArray[np.float32]]:
    datatype = item.get("datatype")
    if datatype != INPUT_DATATYPE:
        raise InvalidInputError(f"inputs[0].datatype: {datatype!r} is not supported; use {INPUT_DATATYPE!r}")
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) < 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise InvalidInputError(
            f"inputs[0].shape: {shape!r} is not [N, ...] with positive integer sizes (N rows first, then the "
            "model's input shape)"
        )
    if shape[0] > MAX_ROWS:
        raise InvalidInputError(f"inputs[0].shape: {shape[0]} rows in one request; send at most {MAX_ROWS}")
    if "data" not in item:
        raise InvalidInputError("inputs[0].data: missing; send the values as a flat or nested JSON array")
    data = item["data"]
    if not isinstance(data, list):
        raise InvalidInputError("inputs[0].data: must be a JSON array of numbers (flat or nested, row-major)")
    values = _flat_floats(data)
    expected = math.prod(shape)
    if values.size != expected:
        raise InvalidInputError(
            f"inputs[0].data: {values.size} values for shape {shape} (which needs {expected}); send one value per "
            "element"
        )
    if not np.isfinite(values).all():
        where = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InvalidInputError(
            f"inputs[0].data: element {where} (row-major) is NaN or infinite (or too large for FP32); "
            "send finite numbers"
        )
    return tuple(shape), values


def _flat_floats(data: list[Any]) -> npt.NDArray[np.float32]:
    try:
        array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(
            f"inputs[0].data: must hold only numbers, nested as a rectangular array or flat ({str(e).splitlines()[0]})"
        ) from e
    if _has_bool(data):
        raise InvalidInputError("inputs[0].data: holds true/false; FP32 data must be numbers")
    with np.errstate(over="ignore"):
        return array.reshape(-1).astype(np.float32)


def _has_bool(data: list[Any]) -> bool:
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            return True
    return False


def _parse_outputs(outputs: Any) -> tuple[str, ...]:
    if outputs is None:
        return OUTPUT_NAMES
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidInputError('outputs: must be a list of {"name": ...} objects; or omit it for all outputs')
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise InvalidInputError(f"outputs: unknown output {unknown[0]!r}; the model has {', '.join(OUTPUT_NAMES)}")
    return names or OUTPUT_NAMES


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str,
    probabilities: Sequence[Sequence[float]],
    classes: Sequence[int],
    outputs: Sequence[str],
) -> dict[str, Any]:
    """The OIP v2 answer for N rows: `probabilities` [N][classes] and the predicted class of each."""
    n, k = len(probabilities), len(probabilities[0]) if probabilities else 0
    tensors = {
        PROBABILITIES: {"name": PROBABILITIES, "shape": [n, k], "datatype": "FP32",
                        "data": [value for row in probabilities for value in row]},
        PREDICTED_CLASS: {"name": PREDICTED_CLASS, "shape": [n], "datatype": "INT64", "data": list(classes)},
    }  # fmt: skip
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": [tensors[name] for name in outputs],
    }


def model_metadata(name: str, versions: Sequence[str], input_shape: Sequence[int], classes: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": list(versions),
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, *input_shape]}],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            {"name": PREDICTED_CLASS, "datatype": "INT64", "shape": [-1]},
        ],
    }
