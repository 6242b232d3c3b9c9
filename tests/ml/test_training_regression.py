"""The trainer on float targets: an MLP on scikit-learn's diabetes data with mse / mae / huber, a
target in the thousands trained as well as the unit one (target standardisation), exact resume
after SIGKILL, early stopping on val_rmse, and the refusals of a loss of the other task."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes  # type: ignore[import-untyped]
from torch import nn

from domain.errors import InvalidInputError
from domain.spec import PipelineSpec
from ml.data import PreparedData, RegressionTable, prepare
from ml.losses import Objective
from ml.training import TrainingData, TrainProgress, seed_everything, train
from ml.zoo import build_model
from tests.ml.test_training import assert_same_weights
from tests.ml.test_training import make_spec as classification_spec

SEED = 3


def make_spec(**hyper: Any) -> PipelineSpec:
    """The trainer reads the spec's hyperparameters, hardware and data seed, never its model section."""
    return classification_spec(**{"learning_rate": 0.005, "batch_size": 32, "epochs": 25, **hyper})


def diabetes(scale: float = 1.0, columns: int = 1) -> PreparedData:
    x, y = load_diabetes(return_X_y=True)
    targets = np.stack([y * scale, -0.5 * y * scale + 7.0][:columns], axis=1)
    table = RegressionTable(
        features=x.astype(np.float32),
        targets=targets,
        feature_names=[f"f{i}" for i in range(x.shape[1])],
        target_names=["progression", "mirror"][:columns],
        source="sklearn:diabetes",
    )
    return prepare(
        table,
        input_shape=[10],
        task="regression",
        outputs=columns,
        validation_fraction=0.2,
        test_fraction=0.0,
        seed=SEED,
    )


def fresh_model(outputs: int = 1) -> nn.Module:
    seed_everything(SEED)
    return build_model("mlp", {"hidden_sizes": [32], "dropout": 0.0}, [10], outputs)


def validation_rmse(model: nn.Module, data: PreparedData) -> float:
    """RMSE in the target's units, computed here independently of the trainer."""
    assert data.target_standardizer is not None
    model.eval()
    with torch.inference_mode():
        predicted = data.target_standardizer.inverse(model(data.validation.features).numpy())
    truth = data.target_standardizer.inverse(data.validation.labels.numpy())
    return float(np.sqrt(np.mean((predicted.astype(np.float64) - truth) ** 2)))


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "torch.nn.functional:smooth_l1_loss"])
def test_each_regression_loss_learns_the_diabetes_target(tmp_path: Path, loss: str) -> None:
    data = diabetes()
    result = train(
        fresh_model(),
        data.training_data(),
        make_spec(),
        tmp_path,
        objective=Objective("regression", loss, huber_delta=0.5, monitor="val_rmse"),
    )
    first, last = result.history[0], result.history[-1]
    assert last.val_rmse is not None and first.val_rmse is not None and last.val_mae is not None
    assert last.val_accuracy is None
    # Predicting the train mean scores the validation targets' spread (about 77); a linear fit about 54.
    assert data.target_standardizer is not None
    truth = data.target_standardizer.inverse(data.validation.labels.numpy())
    baseline = float(np.sqrt(np.mean((truth - data.target_standardizer.mean) ** 2)))
    assert last.val_rmse < 0.8 * baseline and min(h.val_rmse or np.inf for h in result.history) < first.val_rmse
    assert last.val_mae < last.val_rmse
    assert last.val_rmse == pytest.approx(validation_rmse(result.model, data), rel=1e-4)


def test_a_target_in_the_thousands_trains_as_well_as_the_unit_one(tmp_path: Path) -> None:
    objective = Objective("regression", "mse", monitor="val_rmse")
    unit = train(fresh_model(), diabetes().training_data(), make_spec(), tmp_path / "unit", objective=objective)
    thousands_data = diabetes(scale=1000.0)
    assert thousands_data.target_standardizer is not None
    assert thousands_data.target_standardizer.std[0] == pytest.approx(1000 * 77, rel=0.05)
    thousands = train(fresh_model(), thousands_data.training_data(), make_spec(), tmp_path / "k", objective=objective)
    unit_rmse, thousands_rmse = unit.history[-1].val_rmse, thousands.history[-1].val_rmse
    assert unit_rmse is not None and thousands_rmse is not None
    assert thousands_rmse / 1000 == pytest.approx(unit_rmse, rel=0.02)

    # The same run on the raw targets: the network cannot reach outputs near 150,000 in 25 epochs.
    x, y = load_diabetes(return_X_y=True)
    raw = prepare(
        RegressionTable(x.astype(np.float32), y * 1000, [f"f{i}" for i in range(10)], ["progression"], "raw"),
        input_shape=[10],
        task="regression",
        validation_fraction=0.2,
        test_fraction=0.0,
        seed=SEED,
        standardize_targets=False,
    )
    unscaled = train(fresh_model(), raw.training_data(), make_spec(), tmp_path / "raw", objective=objective)
    unscaled_rmse = unscaled.history[-1].val_rmse
    assert unscaled_rmse is not None and unscaled_rmse / 1000 > 1.5 * unit_rmse


def test_several_target_columns_train_together(tmp_path: Path) -> None:
    data = diabetes(columns=2)
    assert data.outputs == 2 and tuple(data.train.labels.shape) == (len(data.train), 2)
    assert data.target_standardizer is not None and data.target_standardizer.num_features == 2
    result = train(
        fresh_model(outputs=2), data.training_data(), make_spec(), tmp_path, objective=Objective("regression", "mse")
    )
    last = result.history[-1]
    assert last.val_rmse is not None and last.val_rmse == pytest.approx(validation_rmse(result.model, data), rel=1e-4)


# ------------------------------------------------------------------ exact resume after SIGKILL

RESUME_HYPER: dict[str, Any] = {"epochs": 3, "checkpoint_every_steps": 4, "batch_size": 32}
RESUME_OBJECTIVE = Objective("regression", "huber", huber_delta=0.5, monitor="val_rmse")


def _killed_run(checkpoint_dir: str, kill_at_step: int) -> None:
    """Runs in a child process: trains and SIGKILLs itself mid-epoch (no cleanup, no flush)."""

    def progress(p: TrainProgress) -> None:
        if p.step == kill_at_step and p.epoch_metrics is None:
            os.kill(os.getpid(), signal.SIGKILL)

    data = diabetes().training_data()
    train(
        fresh_model(),
        data,
        make_spec(**RESUME_HYPER),
        Path(checkpoint_dir),
        progress=progress,
        objective=RESUME_OBJECTIVE,
    )


def test_a_regression_run_killed_mid_epoch_resumes_to_exactly_the_same_weights(tmp_path: Path) -> None:
    spec = make_spec(**RESUME_HYPER)  # 354 train rows / 32 = 12 steps per epoch; kill at step 19 (epoch 2)
    child = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(str(tmp_path / "ck"), 19))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    data = diabetes().training_data()
    resumed = train(fresh_model(), data, spec, tmp_path / "ck", objective=RESUME_OBJECTIVE)
    assert resumed.resumed_from_step == 16  # the last checkpoint before the kill, mid-epoch 2

    uninterrupted = train(fresh_model(), data, spec, tmp_path / "clean", objective=RESUME_OBJECTIVE)
    assert uninterrupted.resumed_from_step is None
    assert resumed.global_steps == uninterrupted.global_steps == 36
    assert_same_weights(resumed.model, uninterrupted.model)
    for name in ("train_loss", "val_loss", "val_rmse", "val_mae"):
        assert [getattr(h, name) for h in resumed.history] == [getattr(h, name) for h in uninterrupted.history]


# ------------------------------------------------------------------------- early stopping


def test_early_stopping_on_val_rmse_restores_the_best_weights(tmp_path: Path) -> None:
    data = diabetes()
    # Validation targets unrelated to the features: the best epoch comes early and later ones get worse.
    noise = torch.randn(data.validation.labels.shape, generator=torch.Generator().manual_seed(1))
    noisy = TrainingData(
        data.train.features,
        data.train.labels,
        data.validation.features,
        noise,
        target_standardizer=data.target_standardizer,
    )
    spec = make_spec(epochs=40, learning_rate=0.02, early_stopping={"monitor": "val_loss", "patience": 2})
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model = fresh_model()

    def keep(p: TrainProgress) -> None:
        if p.epoch_metrics is not None:
            snapshots[p.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    objective = Objective("regression", "mse", monitor="val_rmse")
    result = train(model, noisy, spec, tmp_path, progress=keep, objective=objective)
    rmses = [h.val_rmse for h in result.history]
    assert all(r is not None for r in rmses)
    assert result.best_epoch == 1 + int(np.argmin(np.array(rmses, dtype=float)))
    assert result.stopped_early and len(result.history) == result.best_epoch + 2
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key]), key


# ------------------------------------------------------------------------------ refusals


def test_a_regression_loss_on_class_ids_is_refused_before_training(tmp_path: Path) -> None:
    labels = torch.tensor([0, 1, 2, 1] * 10)
    data = TrainingData(torch.randn(40, 10), labels, torch.randn(8, 10), labels[:8])
    with pytest.raises(InvalidInputError) as caught:
        train(fresh_model(), data, make_spec(), tmp_path, objective=Objective("regression", "mse"))
    assert caught.value.code == "invalid_input"
    assert "training targets are int64 [40]" in caught.value.message and "classification" in caught.value.message
    assert not (tmp_path / "last.pt").exists()


def test_float_targets_with_the_classification_objective_are_refused(tmp_path: Path) -> None:
    data = diabetes().training_data()
    with pytest.raises(InvalidInputError) as caught:
        train(fresh_model(), data, make_spec(), tmp_path)  # no objective: the spec's cross_entropy
    assert "training targets are float32 [354, 1]" in caught.value.message
    assert "set the task to regression" in caught.value.message


def test_a_model_with_the_wrong_output_width_is_refused_naming_model_outputs(tmp_path: Path) -> None:
    data = diabetes().training_data()
    with pytest.raises(InvalidInputError) as caught:
        train(fresh_model(outputs=3), data, make_spec(), tmp_path, objective=Objective("regression", "mae"))
    assert "[32, 3]" in caught.value.message and "model.outputs" in caught.value.message
