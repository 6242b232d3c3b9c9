"""Open Inference Protocol v2 (REST, JSON) request parsing and response building for one model.

Inputs: exactly one tensor named `input`, datatype `FP32`, shape `[N, *input_shape]`, `data` flat
or nested in row-major order, every value finite. Outputs (all returned unless the request's
`outputs` names some), a classifier's:

- `probabilities`: FP32 `[N, classes]`, the softmax of the model's logits;
- `predicted_class`: INT64 `[N]`, the argmax;

a regression model's (`task: regression` in its manifest):

- `prediction`: FP32 `[N, outputs]`, the model's outputs in the target's own units (mapped back by
  the target standardizer fitted at training).

A text model (one whose manifest carries a tokenizer, ml/text.py) takes instead one input named
`input`, datatype `BYTES`, shape `[N]` (or `[N, 1]`): one UTF-8 string per row, `data` a JSON array of
strings, or in binary form each string as a 4-byte little-endian length and its bytes (as Triton's
clients send them). The server tokenises it with the model version's own tokenizer. FP32 sent to a
text model, or BYTES to a numeric one, is refused naming the input and the datatype to send.

Binary tensor data (Triton's and KServe's extension): with the header `Inference-Header-Content-Length:
H` the body is H bytes of JSON followed by the raw bytes of each input whose `parameters.binary_data_size`
is set, in input order (little-endian, row-major; FP32 is 4 bytes a value). Outputs asked for with
`parameters.binary_data: true` (or, for outputs without that parameter, the request's
`parameters.binary_data_output: true`) are answered the same way: `binary_data_size` per output, the
JSON header's length in the answer's `Inference-Header-Content-Length`.

Every refusal is an `InvalidInputError` whose message names the field and the fix.
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
from domain.task import Task

INPUT_NAME = "input"
INPUT_DATATYPE = "FP32"
TEXT_DATATYPE = "BYTES"
PROBABILITIES = "probabilities"
PREDICTED_CLASS = "predicted_class"
PREDICTION = "prediction"
OUTPUT_NAMES: dict[Task, tuple[str, ...]] = {
    "classification": (PROBABILITIES, PREDICTED_CLASS),
    "regression": (PREDICTION,),
}
MAX_ROWS = 8192
HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
FP32_BYTES = 4
BINARY_DTYPES = {"FP32": "<f4", "INT64": "<i8"}


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A syntactically valid request: the input checked against itself, not yet against a model."""

    id: str | None
    shape: tuple[int, ...]
    values: npt.NDArray[np.float32]  # flat
    outputs: tuple[str, ...] = ()  # the outputs named, in order (none: all of the model's)
    binary_flags: tuple[bool | None, ...] = ()  # each named output's parameters.binary_data (None: not given)
    binary_default: bool = False  # the request's parameters.binary_data_output
    texts: tuple[str, ...] | None = None  # a BYTES input's strings, one per row (then `values` is empty)

    def outputs_for(self, available: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
        """The outputs to answer for a model with `available` outputs, and those to answer as binary
        data; InvalidInputError if the request names an output the model does not have."""
        if not self.outputs:
            return tuple(available), frozenset(available if self.binary_default else ())
        unknown = [name for name in self.outputs if name not in available]
        if unknown:
            raise InvalidInputError(f"outputs: unknown output {unknown[0]!r}; the model has {', '.join(available)}")
        flags = zip(self.outputs, self.binary_flags, strict=True)
        binary = {name for name, flag in flags if (self.binary_default if flag is None else flag)}
        return self.outputs, frozenset(binary)

    def rows_for(self, input_shape: Sequence[int]) -> torch.Tensor:
        """[N, F] float32 rows for a model with `input_shape`; InvalidInputError if the shape does not fit."""
        if self.texts is not None:
            raise InvalidInputError(
                f"inputs[0].datatype: {TEXT_DATATYPE!r} (strings) is for text models; this model takes numbers: "
                f"send datatype {INPUT_DATATYPE!r} with shape [N, {', '.join(map(str, input_shape))}]"
            )
        expected = [-1, *input_shape]
        if list(self.shape[1:]) != list(input_shape):
            raise InvalidInputError(
                f"inputs[0].shape: {list(self.shape)} does not fit the model, which takes {expected} "
                f"(N rows of {list(input_shape)}); reshape the data"
            )
        return torch.from_numpy(self.values.reshape(self.shape[0], math.prod(input_shape)))

    def texts_for_text_model(self) -> tuple[str, ...]:
        """The strings a text model tokenises; InvalidInputError naming the fix when numbers were sent."""
        if self.texts is None:
            raise InvalidInputError(
                f"inputs[0].datatype: {INPUT_DATATYPE!r} is not accepted by this text model, which tokenises strings "
                f"itself: send datatype {TEXT_DATATYPE!r} with shape [N] and one UTF-8 string per row"
            )
        return self.texts


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


def parse_body(body: bytes, header_length: str | None = None) -> InferRequest:
    """A request body, JSON or (with the `Inference-Header-Content-Length` header's value) binary."""
    if header_length is None:
        return parse_infer_request(parse_json(body))
    size = int(header_length) if header_length.isascii() and header_length.isdigit() else -1
    if not 0 < size <= len(body):
        raise InvalidInputError(
            f"{HEADER_LENGTH_HEADER}: {header_length!r} is not a JSON header length within the body's {len(body)} "
            "bytes; send the byte length of the JSON part that starts the body"
        )
    return parse_infer_request(parse_json(body[:size]), memoryview(body)[size:])


def parse_infer_request(payload: Any, binary: memoryview | None = None) -> InferRequest:
    """`binary`: the bytes after the JSON header of a binary request; None for a JSON-only request."""
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
    texts = None
    shape: tuple[int, ...]
    if isinstance(inputs[0], dict) and inputs[0].get("datatype") == TEXT_DATATYPE:
        texts = _parse_texts(inputs[0], binary)
        shape, values = (len(texts),), np.zeros(0, np.float32)
    else:
        shape, values = _parse_input(inputs[0], binary)
    outputs, flags = _parse_outputs(payload.get("outputs"))
    binary_default = bool(_flag(payload, "binary_data_output", ""))
    return InferRequest(request_id, shape, values, outputs, flags, binary_default, texts)


def _parse_texts(item: dict[str, Any], binary: memoryview | None) -> tuple[str, ...]:
    """A BYTES input's strings: shape [N] or [N, 1]; JSON strings, or Triton's length-prefixed binary form."""
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 2)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[0] < 1
        or shape[1:] not in ([], [1])
    ):
        raise InvalidInputError(
            f"inputs[0].shape: {shape!r} does not fit a {TEXT_DATATYPE} input; send [N] (or [N, 1]), one string per row"
        )
    if shape[0] > MAX_ROWS:
        raise InvalidInputError(f"inputs[0].shape: {shape[0]} rows in one request; send at most {MAX_ROWS}")
    size = _parameters(item, "inputs[0].").get("binary_data_size")
    if size is not None:
        if binary is None or "data" in item or size != len(binary):
            raise InvalidInputError(
                f"inputs[0].parameters.binary_data_size: {size!r}, but {0 if binary is None else len(binary)} bytes "
                "follow the JSON header; send the strings once, length-prefixed, with the "
                f"{HEADER_LENGTH_HEADER} header"
            )
        texts = _length_prefixed(binary)
    else:
        _binary_values(item, binary, 0)  # refuses bytes after the header that no input claims
        data = item.get("data")
        if not isinstance(data, list) or not all(isinstance(text, str) for text in data):
            raise InvalidInputError(
                f"inputs[0].data: a {TEXT_DATATYPE} input's data must be a JSON array of strings, one per row"
            )
        texts = [str(text) for text in data]
    if len(texts) != shape[0]:
        raise InvalidInputError(f"inputs[0].data: {len(texts)} strings for shape {shape}; send one string per row")
    return tuple(texts)


def _length_prefixed(binary: memoryview) -> list[str]:
    """Triton's serialised BYTES tensor: per element a 4-byte little-endian length, then that many bytes."""
    texts: list[str] = []
    at = 0
    while at < len(binary):
        if at + 4 > len(binary):
            raise InvalidInputError("inputs[0]: binary BYTES data ends inside a length prefix; send whole elements")
        length = int.from_bytes(binary[at : at + 4], "little")
        if at + 4 + length > len(binary):
            raise InvalidInputError(
                f"inputs[0]: binary BYTES element {len(texts)} declares {length} bytes past the end; fix the lengths"
            )
        try:
            texts.append(bytes(binary[at + 4 : at + 4 + length]).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"inputs[0]: BYTES element {len(texts)} is not UTF-8 ({e}); send UTF-8 text") from e
        at += 4 + length
    return texts


def _flag(item: dict[str, Any], name: str, where: str) -> bool | None:
    """`parameters.<name>` of a request or tensor object: True, False or None (not given)."""
    value = _parameters(item, where).get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidInputError(f"{where}parameters.{name}: must be true or false (got {value!r})")
    return value


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"{where}parameters: must be a JSON object; or omit it")
    return parameters


def _binary_values(item: dict[str, Any], binary: memoryview | None, expected: int) -> npt.NDArray[np.float32] | None:
    """The input's values from the binary part when `parameters.binary_data_size` is set, else None."""
    size = _parameters(item, "inputs[0].").get("binary_data_size")
    if size is None:
        if binary is not None and len(binary):
            raise InvalidInputError(
                f"request body: {len(binary)} bytes follow the JSON header but no input sets "
                "parameters.binary_data_size; set it on the input, or send the JSON alone"
            )
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInputError(f"inputs[0].parameters.binary_data_size: {size!r} is not a byte count")
    if binary is None:
        raise InvalidInputError(
            f"inputs[0].parameters.binary_data_size is set but the request has no {HEADER_LENGTH_HEADER} header; "
            "send the header with the JSON part's length, or the values as JSON data"
        )
    if "data" in item:
        raise InvalidInputError("inputs[0]: has both data and parameters.binary_data_size; send one of them")
    needed = expected * FP32_BYTES
    if size != needed or len(binary) != size:
        raise InvalidInputError(
            f"inputs[0] ({INPUT_NAME!r}): binary_data_size is {size} and {len(binary)} bytes follow the JSON header, "
            f"but shape x FP32 needs {needed} ({expected} values x {FP32_BYTES} bytes); send exactly {needed} "
            "little-endian bytes and set binary_data_size to match"
        )
    return np.frombuffer(binary, dtype="<f4").astype(np.float32)


def _parse_input(item: dict[str, Any], binary: memoryview | None) -> tuple[tuple[int, ...], npt.NDArray[np.float32]]:
    datatype = item.get("datatype")
    if datatype != INPUT_DATATYPE:
        raise InvalidInputError(
            f"inputs[0].datatype: {datatype!r} is not supported; use {INPUT_DATATYPE!r} ({TEXT_DATATYPE!r} for a "
            "text model)"
        )
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
    expected = math.prod(shape)
    values = _binary_values(item, binary, expected)
    if values is None:
        values = _json_values(item)
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


def _json_values(item: dict[str, Any]) -> npt.NDArray[np.float32]:
    if "data" not in item:
        raise InvalidInputError(
            "inputs[0].data: missing; send the values as a flat or nested JSON array (or binary, with "
            f"parameters.binary_data_size and the {HEADER_LENGTH_HEADER} header)"
        )
    data = item["data"]
    if not isinstance(data, list):
        raise InvalidInputError("inputs[0].data: must be a JSON array of numbers (flat or nested, row-major)")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: an integer past any float, 10**400
        raise InvalidInputError(
            f"inputs[0].data: must hold only numbers, nested as a rectangular array or flat ({str(e).splitlines()[0]})"
        ) from e
    if _has_bool(data):
        raise InvalidInputError("inputs[0].data: holds true/false; FP32 data must be numbers")
    with np.errstate(over="ignore"):
        return array.reshape(-1).astype(np.float32)


def _has_bool(data: list[Any]) -> bool:
    kinds = set(map(type, data))  # in C: a flat list (the usual form) needs no Python loop over its values
    if list not in kinds:
        return bool in kinds
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool):
            return True
    return False


def _parse_outputs(outputs: Any) -> tuple[tuple[str, ...], tuple[bool | None, ...]]:
    """The outputs named (none: all) and each one's `parameters.binary_data`; the names are checked
    against the model's outputs once the request is routed (`InferRequest.outputs_for`)."""
    if outputs is None or outputs == []:
        return (), ()
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidInputError('outputs: must be a list of {"name": ...} objects; or omit it for all outputs')
    names = tuple(o["name"] for o in outputs)
    return names, tuple(_flag(o, "binary_data", f"outputs[{i}].") for i, o in enumerate(outputs))


Tensor = dict[str, Any]


def _fp32_tensor(name: str, rows: Sequence[Sequence[float]]) -> Tensor:
    n, k = len(rows), len(rows[0]) if rows else 0
    return {"name": name, "shape": [n, k], "datatype": "FP32", "data": [value for row in rows for value in row]}


def classifier_tensors(probabilities: Sequence[Sequence[float]], classes: Sequence[int]) -> dict[str, Tensor]:
    """A classifier's output tensors for N rows: `probabilities` [N][classes] and each row's class."""
    predicted = {"name": PREDICTED_CLASS, "shape": [len(classes)], "datatype": "INT64", "data": list(classes)}
    return {PROBABILITIES: _fp32_tensor(PROBABILITIES, probabilities), PREDICTED_CLASS: predicted}


def regression_tensors(predictions: Sequence[Sequence[float]]) -> dict[str, Tensor]:
    """A regression model's output tensor for N rows: `prediction` [N][outputs] in the target's units."""
    return {PREDICTION: _fp32_tensor(PREDICTION, predictions)}


def infer_response(
    model_name: str, model_version: str, request_id: str, tensors: dict[str, Tensor], outputs: Sequence[str]
) -> dict[str, Any]:
    """The OIP v2 answer: the `outputs` asked for among the model's `tensors`, in the order asked."""
    return {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": [tensors[name] for name in outputs],
    }


def encode_answer(answer: dict[str, Any], binary_outputs: frozenset[str]) -> tuple[bytes, int | None]:
    """The answer's body and, when an output goes as binary data, its JSON header's length (for the
    `Inference-Header-Content-Length` response header); without binary outputs, plain JSON and None."""
    if not binary_outputs:
        return orjson.dumps(answer), None
    raw: list[bytes] = []
    for output in answer["outputs"]:
        if output["name"] in binary_outputs:
            data = np.asarray(output.pop("data"), dtype=BINARY_DTYPES[output["datatype"]]).tobytes()
            output["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
    header = orjson.dumps(answer)
    return header + b"".join(raw), len(header)


def model_metadata(
    name: str, versions: Sequence[str], input_shape: Sequence[int], task: Task, width: int, *, text: bool = False
) -> dict[str, Any]:
    """OIP v2 model metadata; `width`: a classifier's classes, a regression model's outputs; `text`: a
    text model's input is BYTES [-1], one string per row."""
    outputs = (
        [{"name": PREDICTION, "datatype": "FP32", "shape": [-1, width]}]
        if task == "regression"
        else [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, width]},
            {"name": PREDICTED_CLASS, "datatype": "INT64", "shape": [-1]},
        ]
    )
    return {
        "name": name,
        "versions": list(versions),
        "platform": "pytorch",
        "inputs": [
            {"name": INPUT_NAME, "datatype": TEXT_DATATYPE, "shape": [-1]}
            if text
            else {"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, *input_shape]}
        ],
        "outputs": outputs,
    }
