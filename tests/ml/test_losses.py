"""hyperparameters.loss_function: cross-entropy by default, a team's own loss by import path, and
clear errors for a path that does not resolve or a loss that returns the wrong thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from domain.errors import InvalidInputError, SpecError
from ml.losses import build_loss, loss_problems
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
