"""The spec's `tuning` section: refused before anything runs, one line naming the key and the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from domain.spec import parse_spec
from domain.tuning_spec import ParamRange, TuningSpec, with_value
from ml.zoo import constructor_problems
from tests.domain.test_spec import problems_of

BASE: dict[str, Any] = {
    "name": "digits-classifier",
    "dataset": "digits",
    "data": {"validation_fraction": 0.15},
    "model": {"architecture": "mlp", "params": {"hidden_sizes": [64]}, "input_shape": [64], "output_classes": 10},
}
LR = {"hyperparameters.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-1}}


def document(tuning: dict[str, Any], **sections: Any) -> dict[str, Any]:
    result = copy.deepcopy(BASE)
    result.update(sections)
    result["tuning"] = tuning
    return result


def test_a_search_over_spec_keys_is_accepted_with_its_defaults() -> None:
    space = {
        **LR,
        "model.params.hidden_sizes": {"type": "choice", "choices": [[32], [64, 32]]},
        "model.params.dropout": {"type": "uniform", "low": 0.0, "high": 0.5, "step": 0.1},
        "hyperparameters.batch_size": {"type": "int", "low": 16, "high": 128, "step": 16},
    }
    spec = parse_spec(document({"search_space": space}), source="p.yaml", param_checker=constructor_problems)
    assert spec.tuning is not None
    assert (spec.tuning.metric, spec.tuning.objective_direction) == ("val_loss", "minimize")
    assert (spec.tuning.sampler, spec.tuning.pruner, spec.tuning.trials) == ("tpe", "median", 20)
    accuracy = parse_spec(document({"search_space": LR, "metric": "val_accuracy"}), source="p.yaml")
    assert accuracy.tuning is not None and accuracy.tuning.objective_direction == "maximize"
    assert parse_spec(BASE, source="p.yaml").tuning is None


def test_contracts_short_form_reads_as_the_long_one() -> None:
    contract = {  # CONTRACT section 7's example
        "trials": 20,
        "timeout_seconds": 1800,
        "metric": "val_loss",
        "direction": "minimize",
        "sampler": "tpe",
        "pruner": "median",
        "search_space": {
            "hyperparameters.learning_rate": {"loguniform": [0.0001, 0.01]},
            "model.params.dropout": {"uniform": [0.0, 0.5]},
            "model.params.hidden_sizes": {"choice": [[64], [128, 64]]},
            "hyperparameters.batch_size": {"int": [16, 128, 16]},
        },
    }
    spec = parse_spec(document(contract), source="p.yaml", param_checker=constructor_problems)
    assert spec.tuning is not None
    space = spec.tuning.search_space
    assert space["hyperparameters.learning_rate"] == ParamRange(type="loguniform", low=0.0001, high=0.01)
    assert space["model.params.hidden_sizes"] == ParamRange(type="choice", choices=[[64], [128, 64]])
    assert space["hyperparameters.batch_size"] == ParamRange(type="int", low=16, high=128, step=16)
    [line] = problems_of(document({"search_space": {"hyperparameters.epochs": {"int": [1]}}}))
    assert line.startswith("pipelines/digits.yaml: tuning.search_space.hyperparameters.epochs: int takes [low, high]")


def test_a_key_that_is_not_a_spec_key_is_refused_with_a_suggestion() -> None:
    typo = {"hyperparameters.learnig_rate": {"type": "uniform", "low": 0.001, "high": 0.01}}
    assert problems_of(document({"search_space": typo})) == [
        "pipelines/digits.yaml: tuning.search_space.hyperparameters.learnig_rate: not a spec key: "
        "hyperparameters has no key 'learnig_rate' (did you mean hyperparameters.learning_rate?)"
    ]
    [unset] = problems_of(document({"search_space": {"canary.min_requests": {"type": "int", "low": 1, "high": 9}}}))
    assert unset.startswith(
        "pipelines/digits.yaml: tuning.search_space.canary.min_requests: not a spec key: canary is not a section"
    )
    [param] = problems_of(document({"search_space": {"model.params.widht": {"type": "int", "low": 1, "high": 9}}}))
    assert param.startswith(
        "pipelines/digits.yaml: tuning.search_space.model.params.widht: the spec refuses 1 (model.params.widht:"
    )
    [name] = problems_of(document({"search_space": {"name": {"type": "choice", "choices": ["a", "b"]}}}))
    assert name.startswith("pipelines/digits.yaml: tuning.search_space.name: name cannot be searched")


@pytest.mark.parametrize(
    ("path", "space", "refused"),
    [
        ("hyperparameters.learning_rate", {"type": "uniform", "low": -0.1, "high": 0.1}, "-0.1"),
        ("hyperparameters.momentum", {"type": "uniform", "low": 0.5, "high": 1.0}, "1.0"),
        ("hyperparameters.epochs", {"type": "int", "low": 0, "high": 5}, "0"),
        ("hardware.precision", {"type": "choice", "choices": ["fp32", "fp8"]}, "'fp8'"),
    ],
)
def test_a_range_the_spec_would_refuse_is_refused_naming_the_value(
    path: str, space: dict[str, Any], refused: str
) -> None:
    [line] = problems_of(document({"search_space": {path: space}}))
    assert line.startswith(f"pipelines/digits.yaml: tuning.search_space.{path}: the spec refuses {refused} ({path}:")
    assert line.endswith("narrow the range")


def test_a_test_split_metric_is_refused() -> None:
    [line] = problems_of(document({"search_space": LR, "metric": "accuracy"}))
    assert line.startswith(
        "pipelines/digits.yaml: tuning.metric: accuracy is measured on the test split, which only the gate"
    )
    [line] = problems_of(document({"search_space": LR, "metric": "test_loss"}))
    assert line.startswith("pipelines/digits.yaml: tuning.metric: test_loss is measured on the test split")


def test_the_metric_must_be_the_tasks_and_the_direction_must_fit_it() -> None:
    [line] = problems_of(document({"search_space": LR, "metric": "val_rmse"}))
    assert line == (
        "pipelines/digits.yaml: tuning.metric: val_rmse is not recorded for a classification task; "
        "use val_loss, val_accuracy"
    )
    [line] = problems_of(document({"search_space": LR, "metric": "val_loss", "direction": "maximize"}))
    assert line.startswith(
        "pipelines/digits.yaml: tuning.direction: maximize does not fit metric val_loss (better when lower)"
    )
    no_validation = document({"search_space": LR}, data={"validation_fraction": 0})
    assert problems_of(no_validation) == [
        "pipelines/digits.yaml: tuning.metric: val_loss needs validation rows but data.validation_fraction is 0"
    ]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"type": "uniform", "low": 0.1, "high": 0.1}, "low (0.1) must be below high (0.1)"),
        ({"type": "loguniform", "low": 0.0, "high": 0.1}, "loguniform needs low > 0"),
        ({"type": "int", "low": 1.5, "high": 4}, "type int needs whole numbers"),
        ({"type": "choice", "low": 1, "choices": [1]}, "type choice takes choices: [...] only"),
        ({"type": "uniform", "low": 0.1}, "type uniform takes low and high"),
    ],
)
def test_a_malformed_range_is_refused(space: dict[str, Any], message: str) -> None:
    [line] = problems_of(document({"search_space": {"hyperparameters.learning_rate": space}}))
    assert (
        line.startswith("pipelines/digits.yaml: tuning.search_space.hyperparameters.learning_rate: ")
        and message in line
    )


def test_choices_that_optuna_cannot_store_travel_as_json_and_come_back() -> None:
    space = ParamRange(type="choice", choices=[[32], [64, 32]])
    assert space.labels() == ["[32]", "[64, 32]"]
    assert space.decode("[64, 32]") == [64, 32]
    scalars = ParamRange(type="choice", choices=["adamw", "sgd"])
    assert scalars.labels() == ["adamw", "sgd"] and scalars.decode("sgd") == "sgd"
    assert ParamRange(type="int", low=1, high=4).bounds() == [1, 4]
    tuning = TuningSpec.model_validate({"search_space": {"a.b": {"type": "choice", "choices": [1, 2]}}})
    assert tuning.trials == 20


def test_with_value_changes_a_copy() -> None:
    original = {"hyperparameters": {"learning_rate": 0.1}}
    changed = with_value(original, "hyperparameters.learning_rate", 0.5)
    assert (
        changed == {"hyperparameters": {"learning_rate": 0.5}} and original["hyperparameters"]["learning_rate"] == 0.1
    )
