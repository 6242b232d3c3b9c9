"""Retrainer's normalization kernels for ONNX Runtime (ml/quantization/kernels.py, native/ortops.c):
the same results as ONNX Runtime's own kernels, used only where they compute ONNX's operator."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ml.quantization import OnnxModule, kernels, quantize
from ml.quantization.onnx_graph import session_for
from ml.zoo import build_model

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_library_lookup() -> Iterator[None]:
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


def test_the_kernels_are_built_by_make() -> None:
    """Optional for `make demo` (without gcc or Go ONNX Runtime's own kernels run), required here: the
    tests below would otherwise compare ORT with itself. `make test` builds it on a machine with both."""
    assert kernels.library() is not None, (
        f"{kernels.DEFAULT_LIBRARY} is missing: `make venv` builds it (ml/quantization/native/build.sh needs gcc "
        "and Go or ORT_C_API_HEADER_DIR)"
    )


def _norm_graph(
    op: str,
    shape: list[int],
    *,
    bias: bool = True,
    scale_size: int | None = None,
    dtype: int = TensorProto.FLOAT,
    scale_input: bool = False,
    **attributes: object,
) -> onnx.ModelProto:
    """One norm over input x; its scale (and bias) constants, the scale behind a Cast like compact.py's."""
    width = scale_size or shape[-1]
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    initializers = [numpy_helper.from_array((RNG.random(width) + 0.5).astype(np.float16), "scale_half")]
    nodes = [helper.make_node("Cast", ["scale_half"], ["scale"], to=dtype)]
    inputs = ["x", "scale"]
    graph_inputs = [helper.make_tensor_value_info("x", dtype, shape)]
    if scale_input:
        graph_inputs.append(helper.make_tensor_value_info("scale", dtype, [width]))
        nodes = []
    if bias and op == "LayerNormalization":
        initializers.append(numpy_helper.from_array(RNG.standard_normal(width).astype(numpy_type), "bias"))
        inputs.append("bias")
    nodes.append(helper.make_node(op, inputs, ["y"], **attributes))
    graph = helper.make_graph(nodes, "norm", graph_inputs, [helper.make_tensor_value_info("y", dtype, None)])
    graph.initializer.extend(initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _both(graph: onnx.ModelProto, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
    data = graph.SerializeToString()
    inputs = {"x": x, **(feeds or {})}
    ours = session_for(data).run(None, inputs)[0]
    theirs = session_for(data, own_kernels=False).run(None, inputs)[0]
    return np.asarray(ours), np.asarray(theirs)


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
@pytest.mark.parametrize(
    "shape",
    [[32, 64, 64], [3, 5, 7], [4, 1], [2, 384], [8, 40, 384], [0, 16], [5, 3]],
    ids=lambda shape: "x".join(map(str, shape)),
)
def test_the_kernels_compute_what_onnx_runtime_computes(
    op: str, shape: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    graph = _norm_graph(op, shape, epsilon=1e-3)
    assert kernels.with_own_kernels(graph) is not None
    x = (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="ml.quantization.onnx_graph"):
        ours, theirs = _both(graph, x)
    assert "do not take this graph" not in caplog.text  # ours ran, not a fallback
    assert ours.shape == theirs.shape == tuple(shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_one_scale_value_for_every_element_and_a_row_of_nan_stays_in_its_row(op: str) -> None:
    graph = _norm_graph(op, [6, 16], scale_size=1)
    x = RNG.standard_normal((6, 16)).astype(np.float32)
    x[2, 5] = np.nan
    ours, theirs = _both(graph, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # NaN where ORT has NaN
    assert np.isnan(ours[2]).all() and not np.isnan(np.delete(ours, 2, axis=0)).any()


def test_a_layer_norm_without_bias() -> None:
    graph = _norm_graph("LayerNormalization", [4, 8, 32], bias=False)
    ours, theirs = _both(graph, RNG.standard_normal((4, 8, 32)).astype(np.float32))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("why", "graph"),
    [
        ("normalized over more than the last axis", _norm_graph("LayerNormalization", [4, 8, 32], axis=1)),
        ("normalized over the last axis by its positive index", _norm_graph("RMSNormalization", [4, 8], axis=1)),
        ("a computed scale", _norm_graph("LayerNormalization", [4, 8], scale_input=True)),
        ("statistics kept in double", _norm_graph("RMSNormalization", [4, 8], stash_type=11)),
    ],
)
def test_norms_the_kernels_do_not_compute_are_left_to_onnx_runtime(why: str, graph: onnx.ModelProto) -> None:
    assert kernels.with_own_kernels(graph) is None, why


def test_a_norm_with_its_statistics_as_outputs_is_left_to_onnx_runtime() -> None:
    graph = _norm_graph("LayerNormalization", [4, 8])
    graph.graph.node[-1].output.extend(["mean", "inverse_std"])
    assert kernels.with_own_kernels(graph) is None


def test_a_norm_over_half_floats_runs_on_onnx_runtime_kernels(caplog: pytest.LogCaptureFixture) -> None:
    """The kernels declare float only: the session falls back to the graph as it is, and says so."""
    graph = _norm_graph("LayerNormalization", [4, 8], dtype=TensorProto.FLOAT16)
    assert kernels.with_own_kernels(graph) is not None
    x = RNG.standard_normal((4, 8)).astype(np.float16)
    with caplog.at_level(logging.INFO, logger="ml.quantization.onnx_graph"):
        ours, theirs = _both(graph, x)
    assert "do not take this graph" in caplog.text
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(("variant", "tolerance"), [("fp16", 1e-4), ("dynamic", 2e-2)])
def test_the_zoo_transformer_runs_its_norms_and_residual_adds_on_the_kernels(variant: str, tolerance: float) -> None:
    """The same outputs as on ONNX Runtime's kernels: to float rounding where the graph computes in
    float (fp16 stores weights half, computes float); int8 quantizes the norms' outputs per call, so a
    value on a rounding boundary may move one int8 step (hence the looser bound)."""
    torch.manual_seed(0)
    model = build_model("transformer", {"vocab_size": 17, "d_model": 32, "nhead": 4, "num_layers": 2}, [12], 3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # trained-like: no two norms' parameters equal
    model.eval()
    x = torch.randint(0, 17, (16, 12), generator=torch.Generator().manual_seed(1)).float()
    quantized = quantize(model, variant, [x])  # type: ignore[arg-type]
    assert isinstance(quantized, OnnxModule)
    rewritten = kernels.with_own_kernels(onnx.load_from_string(quantized.onnx_bytes))
    assert rewritten is not None
    ours_ops = [node.op_type for node in rewritten.graph.node if node.domain == kernels.DOMAIN]
    # two norms per layer and the final one, each with the residual Add before it (the first one's:
    # the embedding plus the position table, broadcast over the batch), and each layer's GELU
    layer = ["SkipRMSNormalization", "SkipRMSNormalization", "Gelu"]
    assert ours_ops == layer + layer + ["SkipLayerNormalization"], ours_ops
    assert not any(node.op_type == "Add" and node.output[0] in _norm_inputs(rewritten) for node in rewritten.graph.node)
    ours = np.asarray(session_for(quantized.onnx_bytes).run(None, {"input": x.numpy()})[0])
    theirs = np.asarray(session_for(quantized.onnx_bytes, own_kernels=False).run(None, {"input": x.numpy()})[0])
    np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance)


def _norm_inputs(graph: onnx.ModelProto) -> set[str]:
    return {node.input[0] for node in graph.graph.node if node.domain == kernels.DOMAIN and node.op_type != "Gelu"}


def test_a_residual_add_whose_sum_others_read_keeps_its_name_and_order() -> None:
    """Skip<norm> gives the sum under the Add's name, and the nodes stay in an order ONNX accepts."""
    width = 8
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Add", ["a", "table"], ["b"]),  # read by no norm: stays
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Cast", ["scale_half"], ["scale"], to=TensorProto.FLOAT),  # after the Add
        helper.make_node("RMSNormalization", ["sum", "scale"], ["normed"]),
        helper.make_node("Mul", ["sum", "normed"], ["y"]),  # the sum read again
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(RNG.standard_normal((3, width)).astype(np.float32), "table"),
            numpy_helper.from_array(np.ones(width, np.float16), "scale_half"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    rewritten = kernels.with_own_kernels(model)
    assert rewritten is not None
    assert [node.op_type for node in rewritten.graph.node] == ["Relu", "Add", "Cast", "SkipRMSNormalization", "Mul"]
    assert list(rewritten.graph.node[3].input[:2]) == ["a", "b"]
    assert list(rewritten.graph.node[3].output) == ["normed", "sum"]
    x = RNG.standard_normal((5, 3, width)).astype(np.float32)
    ours, theirs = _both(model, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_bias_add_before_a_norm_is_left_to_onnx_runtime() -> None:
    """A 1-D addend is a Linear's bias, which ONNX Runtime adds inside the MatMul before it: taken into
    the norm's kernel, it would cost that fusion."""
    width = 16
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["biased"]),
        helper.make_node("LayerNormalization", ["biased", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear then norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(RNG.standard_normal((width, width)).astype(np.float32), "w"),
            numpy_helper.from_array(RNG.standard_normal(width).astype(np.float32), "bias"),
            numpy_helper.from_array(np.ones(width, np.float32), "scale"),
        ],
    )
    rewritten = kernels.with_own_kernels(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert rewritten is not None
    assert [node.op_type for node in rewritten.graph.node] == ["MatMul", "Add", "LayerNormalization"]


def _add_then_norm(op: str, first: list[int | str], second: list[int | str], *, opset: int = 23) -> onnx.ModelProto:
    width = int(first[-1])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node(op, ["sum", "scale"], ["y"])],
        "add then norm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, first),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, second),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array((RNG.random(width) + 0.5).astype(np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _both_feeds(graph: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    data = graph.SerializeToString()
    ours = np.asarray(session_for(data).run(None, feeds)[0])
    return ours, np.asarray(session_for(data, own_kernels=False).run(None, feeds)[0])


@pytest.mark.parametrize(
    ("first", "second", "feeds"),
    [
        # a table added to every sequence, on the parallel path (64 x 37 x 96 elements), either way round
        (["batch", 37, 96], [1, 37, 96], {"a": (64, 37, 96), "b": (1, 37, 96)}),
        ([1, 37, 96], ["batch", 37, 96], {"a": (1, 37, 96), "b": (64, 37, 96)}),
        (["batch", 37, 96], [37, 96], {"a": (64, 37, 96), "b": (37, 96)}),
        # one symbolic name fed two sizes (ONNX's rule says one size; ORT broadcasts): still ORT's answer
        (["batch", 3, 8], ["batch", 3, 8], {"a": (1, 3, 8), "b": (4, 3, 8)}),
    ],
)
def test_a_residual_add_with_a_broadcast_addend_runs_in_the_norm_with_onnx_runtime_answer(
    first: list[int | str], second: list[int | str], feeds: dict[str, tuple[int, ...]]
) -> None:
    graph = _add_then_norm("LayerNormalization", first, second)
    rewritten = kernels.with_own_kernels(graph)
    assert rewritten is not None
    assert [node.op_type for node in rewritten.graph.node] == ["SkipLayerNormalization"]
    arrays = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in feeds.items()}
    ours, theirs = _both_feeds(graph, arrays)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_layer_norm_of_rows_far_from_zero_keeps_its_precision() -> None:
    """A mean of 1000 and a spread of 0.01: summing x itself in float loses the mean in rounding (ORT
    1.31's error there is 3e-3); the kernel shifts each row by its first value and stays at 1e-6."""
    graph = _norm_graph("LayerNormalization", [16, 64], bias=False, scale_size=1)
    x = (1000 + RNG.standard_normal((16, 64)) * 0.01).astype(np.float32)
    ours = np.asarray(session_for(graph.SerializeToString()).run(None, {"x": x})[0])
    wide = x.astype(np.float64)
    scale = float(numpy_helper.to_array(graph.graph.initializer[0])[0])
    exact = (wide - wide.mean(-1, keepdims=True)) / np.sqrt(wide.var(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(ours, exact, atol=1e-5)


def test_operators_the_graphs_opset_lacks_and_ranks_above_16_are_left_to_onnx_runtime() -> None:
    assert kernels.with_own_kernels(_add_then_norm("RMSNormalization", [2, 8], [2, 8], opset=22)) is None
    assert kernels.with_own_kernels(_gelu_graph([4], opset=19)) is None
    deep = [1] * 16 + [3]
    graph = _gelu_graph(deep)
    assert kernels.with_own_kernels(graph) is None
    x = RNG.standard_normal(deep).astype(np.float32)
    ours, theirs = _both(graph, x)
    np.testing.assert_array_equal(ours, theirs)


def test_a_library_that_will_not_load_leaves_the_graph_to_onnx_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "libretrainer_ortops.so"
    corrupt.write_bytes(b"not a shared library")
    monkeypatch.setenv(kernels.SETTING, str(corrupt))
    graph = _norm_graph("RMSNormalization", [4, 8])
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="ml.quantization.onnx_graph"):
        ours = np.asarray(session_for(graph.SerializeToString()).run(None, {"x": x})[0])
    assert "do not take this graph" in caplog.text
    theirs = np.asarray(session_for(graph.SerializeToString(), own_kernels=False).run(None, {"x": x})[0])
    np.testing.assert_array_equal(ours, theirs)


def _gelu_graph(shape: list[int], *, opset: int = 23, **attributes: object) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], **attributes)],
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("shape", [[32, 64, 128], [3, 7], [1]], ids=lambda shape: "x".join(map(str, shape)))
def test_gelu_computes_what_onnx_runtime_computes(shape: list[int]) -> None:
    """Within 1e-6 of ORT's erf GELU over the range activations take, and at the extremes: a large
    |x| gives x or 0, infinities and NaN what ORT gives."""
    graph = _gelu_graph(shape)
    assert [node.domain for node in kernels.with_own_kernels(graph).graph.node] == [kernels.DOMAIN]  # type: ignore[union-attr]
    x = (RNG.standard_normal(shape) * 4).astype(np.float32)
    flat = x.reshape(-1)
    flat[: min(6, flat.size)] = np.array([0.0, -0.0, 1e-30, 30.0, -30.0, 1e30], np.float32)[: min(6, flat.size)]
    ours, theirs = _both(graph, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    special = np.array([np.inf, -np.inf, np.nan, -1e38, 1e38], np.float32)
    ours, theirs = _both(_gelu_graph([5]), special)
    np.testing.assert_array_equal(ours, theirs)


def test_gelu_is_within_1e_6_of_the_exact_function() -> None:
    """erf by Abramowitz & Stegun 7.1.28 (|error| <= 3e-7): an absolute error of at most 1e-6 against
    float64 (ORT's: 4.5e-7), which is also a larger relative error where GELU is near 0 (x below -3)."""
    x = np.linspace(-10, 10, 200_001, dtype=np.float32)
    ours = np.asarray(session_for(_gelu_graph([x.size]).SerializeToString()).run(None, {"x": x})[0])
    wide = x.astype(np.float64)
    exact = 0.5 * wide * (1 + np.vectorize(math.erf)(wide / math.sqrt(2)))
    assert np.abs(ours - exact).max() <= 1e-6


def test_the_tanh_gelu_is_left_to_onnx_runtime() -> None:
    assert kernels.with_own_kernels(_gelu_graph([4], approximate="tanh")) is None


def test_the_library_setting(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(kernels.SETTING, "")
    assert kernels.library() is None  # empty: off
    kernels.library.cache_clear()
    monkeypatch.setenv(kernels.SETTING, "/nonexistent/libretrainer_ortops.so")
    with caplog.at_level(logging.WARNING, logger="ml.quantization.kernels"):
        assert kernels.library() is None
    assert "/nonexistent/libretrainer_ortops.so: no such file" in caplog.text
    kernels.library.cache_clear()
    monkeypatch.setenv(kernels.SETTING, str(kernels.DEFAULT_LIBRARY))
    assert kernels.library() == kernels.DEFAULT_LIBRARY
