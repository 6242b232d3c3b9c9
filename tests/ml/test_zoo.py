"""The model zoo: built-ins, user models by import path, and parameter checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from domain.errors import InvalidInputError
from ml.zoo import MLP, build_model, constructor_problems, parameter_count


class Echo(nn.Module):
    """A user's model that takes its sizes itself; referenced as tests.ml.test_zoo:Echo."""

    def __init__(self, features: int, classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("architecture", "params", "input_shape", "batch"),
    [
        ("mlp", {"hidden_sizes": [32, 16], "dropout": 0.0}, [64], torch.randn(5, 64)),
        ("cnn", {"channels": [8, 16], "blocks_per_stage": 2}, [1, 8, 8], torch.randn(5, 64)),
        ("cnn", {}, [3, 16, 16], torch.randn(5, 3, 16, 16)),
        ("transformer", {"vocab_size": 17, "d_model": 32, "nhead": 4}, [64], torch.randint(0, 17, (5, 64)).float()),
    ],
)
def test_builtins_give_logits_per_class(
    architecture: str, params: dict[str, object], input_shape: list[int], batch: torch.Tensor
) -> None:
    model = build_model(architecture, params, input_shape, 10).eval()
    with torch.inference_mode():
        assert model(batch).shape == (5, 10)
    assert parameter_count(model) > 0


def test_user_model_by_import_path() -> None:
    model = build_model("tests.ml.test_zoo:Echo", {"features": 4, "classes": 3, "scale": 2.0}, [4], 3)
    assert isinstance(model, Echo) and model(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("architecture", "params", "fragment"),
    [
        ("mlp", {"hidden": [3]}, "model.params.hidden: unknown parameter for MLP (did you mean hidden_sizes?)"),
        ("mlp", {"input_shape": [3]}, "model.params.input_shape: set by the spec's model.input_shape"),
        ("tests.ml.test_zoo:Echo", {"features": 4}, "model.params.classes: required parameter of Echo is missing"),
        ("tests.ml.test_zoo:Nope", {}, "'Nope' is not an nn.Module class"),
        ("no_such_module_xyz:Model", {}, "cannot import module 'no_such_module_xyz'"),
        ("transfomer", {}, "unknown architecture 'transfomer' (did you mean transformer?)"),
    ],
)
def test_bad_parameters_are_named(architecture: str, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        build_model(architecture, params, [4], 3)
    assert info.value.code == "invalid_input" and fragment in str(info.value)


@pytest.mark.parametrize(
    ("architecture", "input_shape", "fragment"),
    [
        ("mlp", [1, 8, 8], "mlp needs input_shape [features]"),
        ("cnn", [64], "cnn needs input_shape [channels, height, width]"),
        ("transformer", [8, 8], "transformer needs input_shape [sequence_length]"),
    ],
)
def test_input_shape_must_fit_the_architecture(architecture: str, input_shape: list[int], fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment.replace("[", r"\[")):
        build_model(architecture, {}, input_shape, 3)


def test_constructor_problems_is_empty_for_good_params() -> None:
    assert constructor_problems("mlp", {"hidden_sizes": [8], "dropout": 0.2, "layer_norm": False}) == []
    assert constructor_problems("transformer", {"d_model": 32, "nhead": 4}) == []


class WideMLP(MLP):
    """A user's subclass that adds one parameter and forwards the rest to the zoo's MLP."""

    def __init__(self, *, widen: int = 2, **mlp_params: Any) -> None:
        super().__init__(**mlp_params)
        self.widen = widen


class TakesAnything(nn.Module):
    """A user's model that consumes its keywords itself (they never reach nn.Module)."""

    def __init__(self, input_shape: list[int], output_classes: int, **options: Any) -> None:
        super().__init__()
        self.linear = nn.Linear(input_shape[0], output_classes)
        self.options = options


def test_a_subclass_that_forwards_kwargs_is_checked_against_its_base() -> None:
    assert constructor_problems("tests.ml.test_zoo:WideMLP", {"widen": 3, "hidden_sizes": [8]}) == []
    problems = constructor_problems("tests.ml.test_zoo:WideMLP", {"hiden_sizes": [8]})
    assert [key for key, _ in problems] == ["hiden_sizes"]
    assert "unknown parameter for WideMLP (did you mean hidden_sizes?)" in problems[0][1]
    assert "accepted: widen, hidden_sizes, dropout, layer_norm" in problems[0][1]
    with pytest.raises(InvalidInputError) as info:
        build_model("tests.ml.test_zoo:WideMLP", {"input_shape": [4]}, [4], 3)
    assert info.value.code == "invalid_input" and "model.params.input_shape: set by the spec's" in str(info.value)
    # input_shape and output_classes reach MLP through **mlp_params.
    model = build_model("tests.ml.test_zoo:WideMLP", {"widen": 3, "hidden_sizes": [8]}, [4], 3)
    assert isinstance(model, WideMLP) and model.widen == 3 and model(torch.randn(2, 4)).shape == (2, 3)


def test_kwargs_that_reach_no_zoo_class_accept_any_name() -> None:
    assert constructor_problems("tests.ml.test_zoo:TakesAnything", {"anything": 1}) == []
    model = build_model("tests.ml.test_zoo:TakesAnything", {"anything": 1}, [4], 3)
    assert isinstance(model, TakesAnything) and model.options == {"anything": 1}
