"""hyperparameters.loss_function: cross-entropy by default, a team's own loss by import path, and
clear errors for a path that does not resolve or a loss that returns the wrong thing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

from domain.errors import InvalidInputError, SpecError
from domain.task import DEFAULT_LOSS
from ml.losses import KEY, Objective, build_loss, loss_problems
from ml.training import train
from tests.ml.test_training import fresh_model as model_for
from tests.ml.test_training import make_data, make_spec


def test_the_default_is_cross_entropy_with_the_specs_label_smoothing() -> None:
    loss = build_loss(make_spec(label_smoothing=0.1).hyperparameters)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1


def test_a_loss_by_import_path_trains_and_resumes_exactly(tmp_path: Path) -> None:
    spec = make_spec(loss_function="tests.ml.user_losses:focal", epochs=3, checkpoint_every_steps=3)
    first = train(model_for(spec), make_data(), spec, tmp_path / "a")
    assert first.history[-1].train_loss < first.history[0].train_loss  # it learns
    # validation loss is the spec's loss too (focal is smaller than cross-entropy on the same logits)
    assert first.history[-1].val_loss is not None and first.history[-1].val_loss > 0
    again = train(model_for(spec), make_data(), spec, tmp_path / "b")
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    differs = train(model_for(make_spec(epochs=3)), make_data(), make_spec(epochs=3), tmp_path / "c")
    assert differs.history[-1].train_loss != first.history[-1].train_loss  # the path was really used


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("tests.ml.no_such_module:focal", "cannot import module 'tests.ml.no_such_module'"),
        ("tests.ml.user_losses:nope", "has no attribute 'nope'"),
        ("tests.ml.user_losses:NOT_A_FUNCTION", "is not callable"),
    ],
)
def test_a_path_that_does_not_resolve_is_a_validator_line(path: str, problem: str) -> None:
    (line,) = loss_problems(make_spec(loss_function=path).hyperparameters)
    assert line.startswith(f"hyperparameters.loss_function: {path!r}: ") and problem in line


@pytest.mark.parametrize(
    ("path", "problem"),
    [("tests.ml.user_losses:per_row", "must return a scalar tensor"), ("tests.ml.user_losses:detached", "detached")],
)
def test_a_loss_that_returns_the_wrong_thing_stops_training_naming_it(tmp_path: Path, path: str, problem: str) -> None:
    spec = make_spec(loss_function=path)
    with pytest.raises(InvalidInputError, match=problem) as caught:
        train(model_for(spec), make_data(), spec, tmp_path)
    assert path in caught.value.message


def test_the_spec_names_what_a_loss_may_be() -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(loss_function="focal")
    (line,) = caught.value.problems
    assert "hyperparameters.loss_function" in line and "'package.module:function'" in line


# ------------------------------------------------------------------------------ regression losses


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mse", lambda o, t: functional.mse_loss(o, t)),
        ("mae", lambda o, t: functional.l1_loss(o, t)),
        ("huber", lambda o, t: functional.huber_loss(o, t, delta=0.3)),
    ],
)
def test_regression_losses_are_the_torch_ones_over_every_element(
    name: str, expected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> None:
    outputs, targets = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
    loss = Objective("regression", name, huber_delta=0.3).build_loss()(outputs, targets)
    assert loss.shape == () and loss.requires_grad
    assert torch.equal(loss, expected(outputs, targets))


def test_huber_delta_changes_where_huber_turns_linear() -> None:
    outputs, targets = torch.tensor([[3.0]]), torch.tensor([[0.0]])
    small = Objective("regression", "huber", huber_delta=0.5).build_loss()(outputs, targets)
    large = Objective("regression", "huber", huber_delta=5.0).build_loss()(outputs, targets)
    assert (float(small), float(large)) == pytest.approx((0.5 * (3 - 0.25), 4.5))


def test_a_regression_loss_refuses_outputs_of_another_shape_instead_of_broadcasting() -> None:
    loss = Objective("regression", "mse").build_loss()
    with pytest.raises(InvalidInputError) as caught:
        loss(torch.randn(4, 1), torch.randn(4))
    assert caught.value.code == "invalid_input"
    assert (
        "[4, 1]" in caught.value.message and "[4]" in caught.value.message and "model.outputs" in caught.value.message
    )


@pytest.mark.parametrize(
    ("fields", "key", "fragment"),
    [
        ({"task": "regression", "loss": "cross_entropy"}, KEY, "'cross_entropy' is a classification loss"),
        ({"task": "classification", "loss": "huber"}, KEY, "'huber' is a regression loss"),
        ({"task": "regression", "loss": "rmse"}, KEY, "must be mse / mae / huber for regression"),
        ({"task": "regression", "loss": "mse", "monitor": "val_accuracy"}, "monitor", "use val_loss / val_rmse"),
        ({"task": "classification", "monitor": "val_rmse"}, "monitor", "use val_loss / val_accuracy"),
        ({"task": "regression", "loss": "huber", "huber_delta": 0.0}, "huber_delta", "must be > 0"),
        ({"task": "regression", "loss": "mse", "label_smoothing": 0.1}, "label_smoothing", "classification only"),
        ({"task": "ranking"}, "task", "classification, regression"),
    ],
)
def test_an_inconsistent_objective_is_refused_naming_the_key(fields: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        Objective(**fields)
    assert caught.value.code == "invalid_input"
    assert key in caught.value.message and fragment in caught.value.message


def test_loss_problems_judges_the_loss_for_the_task() -> None:
    hp = make_spec().hyperparameters  # cross_entropy
    assert loss_problems(hp) == []
    (line,) = loss_problems(hp, task="regression")
    assert line.startswith(f"{KEY}: 'cross_entropy' is a classification loss but the task is regression")
    assert loss_problems(make_spec(loss_function="torch.nn.functional:l1_loss").hyperparameters, "regression") == []


def test_the_default_objective_is_todays_classification() -> None:
    spec = make_spec(label_smoothing=0.1, early_stopping={"monitor": "val_accuracy", "patience": 2})
    objective = Objective.from_hyperparameters(spec.hyperparameters)
    assert objective == Objective("classification", "cross_entropy", 0.1, 1.0, "val_accuracy")
    assert objective.higher_is_better and not Objective("regression", "mse", monitor="val_rmse").higher_is_better
    assert DEFAULT_LOSS == {"classification": "cross_entropy", "regression": "mse"}
