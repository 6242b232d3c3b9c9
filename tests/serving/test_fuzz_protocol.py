"""Fuzzing the OIP v2 request parsers (issue 16): any body, JSON or binary (with any
`Inference-Header-Content-Length`), is either an `InferRequest` that holds together, or refused
with `InvalidInputError`, which the model server answers with 400; never another exception (a 500)
and never a hang. Seeded (derandomize) and bounded, so CI sees the same inputs every run."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import InvalidInputError
from serving.protocol import MAX_ROWS, InferRequest, parse_body
from web.errors import status_for

FUZZ = settings(
    max_examples=200, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)

numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.just(10**400)
json_scalars = st.none() | st.booleans() | numbers | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
dims = st.integers(min_value=-1, max_value=4) | st.sampled_from([MAX_ROWS + 1, 2**40, True]) | json_scalars
shapes = st.lists(dims, max_size=4) | json_values
parameters = (
    st.fixed_dictionaries(
        {},
        optional={
            "binary_data_size": st.integers(min_value=-4, max_value=64) | json_scalars,
            "binary_data": json_scalars,
            "binary_data_output": json_scalars,
        },
    )
    | json_values
)
data = (
    st.lists(numbers, max_size=8)
    | st.lists(st.lists(numbers, min_size=1, max_size=3), max_size=3)
    | st.lists(st.text(max_size=6), max_size=4)
    | json_values
)


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    """A valid FP32 or BYTES input tensor with a few of its fields replaced by odd values or removed:
    near-valid input reaches the checks deep inside, where a parser breaks."""
    rows, width = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    tensor: dict[str, Any] = draw(
        st.sampled_from(
            [
                {"name": "input", "datatype": "FP32", "shape": [rows, width], "data": [0.5] * (rows * width)},
                {"name": "input", "datatype": "BYTES", "shape": [rows], "data": ["text"] * rows},
            ]
        )
    )
    if tensor["datatype"] == "FP32" and draw(st.booleans()):
        tensor["data"] = draw(st.lists(numbers, min_size=rows * width, max_size=rows * width))
    fields = {
        "name": st.sampled_from(["input", "other"]) | json_scalars,
        "datatype": st.sampled_from(["FP32", "BYTES", "INT64"]) | json_scalars,
        "shape": shapes,
        "data": data,
        "parameters": parameters,
    }
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)):
        if draw(st.booleans()):
            tensor.pop(name, None)
        else:
            tensor[name] = draw(fields[name])
    return tensor


requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensors(), min_size=1, max_size=2) | json_values},
    optional={
        "id": st.text(max_size=6) | json_scalars,
        "outputs": st.lists(st.fixed_dictionaries({"name": json_scalars}, optional={"parameters": parameters}))
        | json_values,
        "parameters": parameters,
    },
)


def assert_parsed_or_400(body: bytes, header_length: str | None = None) -> None:
    try:
        request = parse_body(body, header_length)
    except InvalidInputError as refused:
        assert status_for(refused) == 400 and refused.code == "invalid_input" and refused.message
        return
    assert isinstance(request, InferRequest) and 1 <= request.shape[0] <= MAX_ROWS
    if request.texts is not None:
        assert len(request.texts) == request.shape[0]
    else:
        assert request.values.dtype == np.float32 and request.values.size == math.prod(request.shape)
        assert np.isfinite(request.values).all()
    assert len(request.outputs) == len(request.binary_flags)


@FUZZ
@given(request=requests)
def test_any_json_request_is_parsed_or_refused_with_400(request: dict[str, Any]) -> None:
    assert_parsed_or_400(json.dumps(request).encode())


@FUZZ
@given(body=st.binary(max_size=256))
def test_any_bytes_as_a_json_body_are_refused_with_400(body: bytes) -> None:
    assert_parsed_or_400(body)


@FUZZ
@given(
    request=requests,
    tail=st.binary(max_size=64)
    | st.lists(st.floats(width=32), max_size=12).map(lambda v: struct.pack(f"<{len(v)}f", *v)),
    length_shift=st.integers(min_value=-3, max_value=3) | st.none(),
    odd_length=st.sampled_from(["", "0", "-5", "1e3", " 12", "١٢", "99999999999999999999"]),
)
def test_any_binary_request_is_parsed_or_refused_with_400(
    request: dict[str, Any], tail: bytes, length_shift: int | None, odd_length: str
) -> None:
    header = json.dumps(request).encode()
    length = odd_length if length_shift is None else str(len(header) + length_shift)
    assert_parsed_or_400(header + tail, length)


def test_the_fuzzed_shapes_reach_the_accepting_path() -> None:
    """Guards the fuzz above against refusing everything: one JSON and one binary request parse."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 2]}
    plain = parse_body(json.dumps({"inputs": [{**tensor, "data": [1.0, 2.0]}]}).encode())
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 8}}]}).encode()
    binary = parse_body(header + struct.pack("<2f", 1.0, 2.0), str(len(header)))
    assert plain.values.tolist() == binary.values.tolist() == [1.0, 2.0]


def test_an_integer_too_large_for_any_float_is_refused_with_400() -> None:
    """Found by the fuzz above: 10**400 as data raised OverflowError (a 500) instead of a 400."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [10**400]}
    with pytest.raises(InvalidInputError) as refused:
        parse_body(json.dumps({"inputs": [tensor]}).encode())
    assert status_for(refused.value) == 400 and "inputs[0].data" in refused.value.message
