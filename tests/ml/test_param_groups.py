"""`model.freeze` and `hyperparameters.param_groups` on the tiny MLP (net.0 Linear 8→16,
net.1 LayerNorm, net.4 Linear 16→3): frozen weights stay bit-identical, each group gets its own
lr and weight decay under the schedule, bad prefixes and regexes are refused with their key
paths before any step, and resume stays exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from domain.errors import SpecError
from domain.spec import PipelineSpec, parse_spec
from ml.checkpoint import load_checkpoint
from ml.training import TrainProgress, build_optimizer, lr_multiplier, train
from tests.ml.test_training import assert_same_weights, fresh_model, make_data
from tests.ml.test_training import make_spec as training_spec


def make_spec(
    freeze: list[str] | None = None, groups: list[dict[str, Any]] | None = None, **hyper: Any
) -> PipelineSpec:
    """test_training's tiny spec (lr 0.01, weight decay 0.01) with these freeze prefixes and groups."""
    document = training_spec(param_groups=groups or [], **{"epochs": 2, **hyper}).to_document()
    document["model"]["freeze"] = freeze or []
    return parse_spec(document, source="test")


def names_by_group(spec: PipelineSpec) -> list[tuple[str, float, float, list[str]]]:
    """(group label, lr, weight decay, parameter names) per optimizer group."""
    model = fresh_model(spec)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, spec.hyperparameters)
    return [
        (g["group"], g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
    ]


# ----------------------------------------------------------------------------------- freeze


def test_frozen_weights_stay_bit_identical_while_the_others_move(tmp_path: Path) -> None:
    spec = make_spec(freeze=["net.0"], weight_decay=0.1)
    before = {k: v.clone() for k, v in fresh_model(spec).state_dict().items()}
    result = train(fresh_model(spec), make_data(), spec, tmp_path)
    after = result.model.state_dict()
    for key in ("net.0.weight", "net.0.bias"):
        assert torch.equal(after[key], before[key]), key  # decay would move them too: not in the optimizer
        assert not dict(result.model.named_parameters())[key].requires_grad
    for key in ("net.1.weight", "net.4.weight", "net.4.bias"):
        assert not torch.equal(after[key], before[key]), key
    assert (result.frozen_parameters, result.trainable_parameters) == (8 * 16 + 16, 16 + 16 + 16 * 3 + 3)


def test_a_prefix_freezes_whole_dotted_parts_only() -> None:
    with pytest.raises(SpecError) as caught:
        train(fresh_model(spec := make_spec(freeze=["net.4", "net.0.w"])), make_data(), spec, Path("/nonexistent"))
    assert caught.value.code == "invalid_spec"
    (problem,) = caught.value.problems
    assert problem.startswith("model.freeze[1]: 'net.0.w' matches no parameter")
    assert "net.0.weight" in problem  # the closest names are shown


def test_freezing_everything_is_refused(tmp_path: Path) -> None:
    spec = make_spec(freeze=["net"])
    with pytest.raises(SpecError, match=r"^model\.freeze: freezes every parameter"):
        train(fresh_model(spec), make_data(), spec, tmp_path)
    assert load_checkpoint(tmp_path) is None  # refused before the first step


# ----------------------------------------------------------------------------- param groups


def test_each_group_gets_its_lr_scale_and_weight_decay_first_match_wins() -> None:
    spec = make_spec(
        groups=[
            {"match": r"^net\.4\.", "weight_decay": 0.5},
            {"match": r"^net\.0\.", "lr_scale": 0.1},
            {"match": "bias", "lr_scale": 2.0, "weight_decay": 0.0},  # net.0/net.4 biases went above
        ]
    )
    assert names_by_group(spec) == [
        ("default", 0.01, 0.0, ["net.1.weight"]),  # LayerNorm: no decay by default
        ("param_groups[0]", 0.01, 0.5, ["net.4.bias", "net.4.weight"]),  # its own decay covers biases
        ("param_groups[1]", pytest.approx(0.001), 0.01, ["net.0.weight"]),
        ("param_groups[1]", pytest.approx(0.001), 0.0, ["net.0.bias"]),  # today's no-decay rule kept
        ("param_groups[2]", 0.02, 0.0, ["net.1.bias"]),
    ]


def test_without_groups_the_optimizer_is_as_before() -> None:
    assert names_by_group(make_spec()) == [
        ("default", 0.01, 0.01, ["net.0.weight", "net.4.weight"]),
        ("default", 0.01, 0.0, ["net.0.bias", "net.1.bias", "net.1.weight", "net.4.bias"]),
    ]


def test_the_schedule_scales_every_group_by_the_same_factor() -> None:
    spec = make_spec(
        groups=[{"match": r"^net\.0\.", "lr_scale": 0.1}],
        lr_schedule={"type": "cosine_warm_restarts", "t0": 1, "warmup_steps": 3},
    )
    optimizer = build_optimizer(fresh_model(spec), spec.hyperparameters)
    factor = lr_multiplier(spec.hyperparameters, steps_per_epoch=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    assert scheduler.base_lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])
    for step in range(1, 9):
        optimizer.step()
        scheduler.step()
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([0.01 * factor(step)] * 2 + [0.001 * factor(step)] * 2)


def test_the_record_keeps_the_base_learning_rate_when_the_first_group_is_scaled(tmp_path: Path) -> None:
    spec = make_spec(groups=[{"match": ".", "lr_scale": 0.1}], epochs=1)
    result = train(fresh_model(spec), make_data(), spec, tmp_path)
    assert result.history[0].learning_rate == 0.01


@pytest.mark.parametrize(
    ("freeze", "groups", "expected"),
    [
        ([], [{"match": "embeddings"}], "hyperparameters.param_groups[0].match: 'embeddings' matches no trainable"),
        (["net.0"], [{"match": r"net\.0"}], "hyperparameters.param_groups[0].match: 'net\\\\.0' matches only frozen"),
        ([], [{"match": "net"}, {"match": "bias"}], "hyperparameters.param_groups[1].match: 'bias' matches only "),
    ],
)
def test_a_group_that_takes_no_parameter_is_refused_before_training(
    tmp_path: Path, freeze: list[str], groups: list[dict[str, Any]], expected: str
) -> None:
    spec = make_spec(freeze=freeze, groups=groups)
    with pytest.raises(SpecError) as caught:
        train(fresh_model(spec), make_data(), spec, tmp_path)
    assert caught.value.code == "invalid_spec"
    assert caught.value.problems[0].startswith(expected), caught.value.problems
    assert load_checkpoint(tmp_path) is None


def test_a_regex_that_does_not_compile_is_refused_at_spec_validation() -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(groups=[{"match": "net.(0"}, {"match": "x", "lr_scale": 0}])
    problems = [p.removeprefix("test: ") for p in caught.value.problems]
    assert problems[0].startswith("hyperparameters.param_groups.0.match: is not a valid regular expression")
    assert problems[1] == "hyperparameters.param_groups.1.lr_scale: must be > 0 (got 0)"


# ----------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def test_resume_is_exact_with_groups_and_freezing(tmp_path: Path) -> None:
    spec = make_spec(
        freeze=["net.1"],
        groups=[{"match": r"^net\.0\.", "lr_scale": 0.1}, {"match": "bias", "weight_decay": 0.0, "lr_scale": 3.0}],
        epochs=3,
        checkpoint_every_steps=3,
        lr_schedule={"type": "step", "step_size": 1, "gamma": 0.5},
    )

    def crash(p: TrainProgress) -> None:
        if p.step == 11 and p.epoch_metrics is None:
            raise Killed  # stands in for a killed process: the last checkpoint is at step 9

    with pytest.raises(Killed):
        train(fresh_model(spec), make_data(), spec, tmp_path / "ck", progress=crash)
    saved = load_checkpoint(tmp_path / "ck")
    assert saved is not None and saved["global_step"] == 9
    assert [g["group"] for g in saved["optimizer"]["param_groups"]] == [
        "default",
        "param_groups[0]",
        "param_groups[0]",
        "param_groups[1]",
    ]

    resumed = train(fresh_model(spec), make_data(), spec, tmp_path / "ck")
    clean = train(fresh_model(spec), make_data(), spec, tmp_path / "clean")
    assert resumed.resumed_from_step == 9 and clean.resumed_from_step is None
    assert_same_weights(resumed.model, clean.model)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in clean.history]
