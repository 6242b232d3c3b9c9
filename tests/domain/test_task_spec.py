"""`task` in the spec (domain/task.py): each key that belongs to one task is refused in the other,
with one line naming the key and the fix, and a stored spec reads back as the same spec."""

from __future__ import annotations

from typing import Any

import pytest

from domain.errors import SpecError
from domain.spec import PipelineSpec, parse_spec


def regression(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": "prices",
        "task": "regression",
        "dataset": "sales",
        "data": {"target": ["price", "volume"]},
        "model": {"architecture": "mlp", "input_shape": [8], "outputs": 2},
        "quantization": {"type": "dynamic", "max_metric_drop": {"rmse": 0.5}},
        "gates": {"max": {"rmse": 10.0}, "vs_champion": {"mae": {"min_delta": 0.0}}},
        "canary": {"max_error_increase": 0.2},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            document.setdefault(section, {})[leaf] = value
        else:
            document[section] = value
    return document


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(document, source="spec.yaml")
    return info.value.problems


def test_a_regression_spec_gets_its_own_defaults_and_round_trips() -> None:
    spec = parse_spec(regression(), source="spec.yaml")
    assert spec.task == "regression" and spec.output_width == 2
    assert spec.hyperparameters.loss_function == "mse"  # the regression default, not cross_entropy
    assert spec.quantization.budget("regression") == ("rmse", 0.5)
    assert spec.prediction_categories == 10
    assert parse_spec(spec.to_document(), source="stored") == spec
    single = regression(data={"target": "price"}, model={"architecture": "mlp", "input_shape": [8]})
    assert parse_spec(single, source="s").output_width == 1


def test_a_classifier_spec_is_unchanged() -> None:
    document = {
        "name": "digits",
        "dataset": "digits",
        "model": {"architecture": "mlp", "input_shape": [64], "output_classes": 10},
        "quantization": {"type": "dynamic", "max_metric_drop": {"macro_f1": 0.02}},
    }
    spec = parse_spec(document, source="spec.yaml")
    assert spec.task == "classification" and spec.output_width == 10
    assert spec.hyperparameters.loss_function == "cross_entropy"
    assert spec.quantization.budget("classification") == ("macro_f1", 0.02)
    assert parse_spec(spec.to_document(), source="stored") == spec
    default = PipelineSpec.model_validate({**document, "quantization": {"type": "dynamic"}})
    assert default.quantization.budget("classification") == ("accuracy", 0.01)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model__output_classes": 3}, "model.output_classes: a regression model has model.outputs"),
        ({"model__outputs": 3}, "model.outputs: is 3 but data.target names 2 column(s)"),
        ({"hyperparameters": {"loss_function": "cross_entropy"}}, "'cross_entropy' is a classification loss"),
        ({"hyperparameters": {"label_smoothing": 0.1}}, "label_smoothing: applies to classification only"),
        (
            {"hyperparameters": {"early_stopping": {"monitor": "val_accuracy"}}},
            "monitor: 'val_accuracy' is not a regression validation metric",
        ),
        ({"quantization": {"type": "dynamic"}}, "quantization.max_metric_drop: a regression model's quantization"),
        (
            {"quantization": {"type": "dynamic", "max_metric_drop": {"accuracy": 0.01}}},
            "max_metric_drop.accuracy: not a regression quality metric",
        ),
        (
            {"quantization": {"type": "static", "max_metric_drop": {"rmse": 1, "mae": 1}}},
            "names exactly one metric",
        ),
        (
            {"quantization": {"type": "dynamic", "max_accuracy_drop": 0.05, "max_metric_drop": {"rmse": 1}}},
            "a regression model has no accuracy",
        ),
        ({"gates": {"min": {"accuracy": 0.9}}}, "gates.min.accuracy: accuracy is a classification metric"),
        ({"gates": {"max": {"rmsee": 1.0}}}, "gates.max.rmsee: unknown metric (did you mean rmse?)"),
    ],
)
def test_a_key_of_the_other_task_is_refused_with_the_fix(change: dict[str, Any], expected: str) -> None:
    found = problems(regression(**change))
    assert any(expected in line for line in found), found
    assert all(line.startswith("spec.yaml: ") for line in found)


def test_classification_keys_refuse_regression_ones() -> None:
    document = {
        "name": "digits",
        "dataset": "digits",
        "data": {"target": ["a", "b"]},
        "model": {"architecture": "mlp", "input_shape": [64], "outputs": 2},
        "hyperparameters": {"loss_function": "huber"},
        "gates": {"max": {"rmse": 1.0}},
    }
    found = problems(document)
    for expected in (
        "model.output_classes: required for classification",
        "model.outputs: is the output width of a regression model",
        "data.target: lists 2 columns but a classifier predicts one",
        "'huber' is a regression loss but the task is classification",
        "gates.max.rmse: rmse is a regression metric but the task is classification",
    ):
        assert any(expected in line for line in found), (expected, found)


def test_a_regression_canary_is_not_held_to_the_accuracy_labels_rule() -> None:
    from domain.canary_power import spec_power_problems

    few_labels = {"steps": [50, 100], "interval_seconds": 4, "min_requests": 150, "min_labels": 30}
    spec = parse_spec(regression(canary=few_labels), source="spec.yaml")
    assert not any("max_accuracy_drop" in line for line in spec_power_problems(spec))
    classifier = parse_spec(
        {
            "name": "digits",
            "dataset": "digits",
            "model": {"architecture": "mlp", "input_shape": [64], "output_classes": 10},
            "canary": few_labels,
        },
        source="spec.yaml",
    )
    assert any("canary.min_labels" in line for line in spec_power_problems(classifier))
