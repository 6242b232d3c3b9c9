"""`data.loader` for regression: float targets [rows] or [rows, outputs], checked like a regression table read from a
file, every refusal naming the loader, the shapes it returned and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from domain.data_spec import DataSpec
from domain.errors import InvalidInputError
from ml.data import RegressionTable, prepare
from ml.loaders import load_data, load_regression_with_loader
from tests.ml.test_data import invalid

LOADERS = "tests.ml.user_loaders"


def test_a_regression_loader_gives_float_targets_named_by_data_target(tmp_path: Path) -> None:
    one = load_data(tmp_path, DataSpec(loader=f"{LOADERS}:prices", target="price"), "regression")
    assert isinstance(one, RegressionTable) and one.source == str(tmp_path)
    assert one.features.shape == (30, 4) and one.features.dtype == np.float32
    assert one.targets.shape == (30, 1) and one.target_names == ["price"] and one.feature_names[0] == "f0"
    assert float(one.targets.mean()) > 1000  # in the target's own units: nothing rescaled at load

    spec = DataSpec(loader=f"{LOADERS}:prices", params={"outputs": 2}, target=["price", "margin"])
    both = load_data(tmp_path, spec, "regression")
    assert both.targets.shape == (30, 2) and both.target_names == ["price", "margin"]
    prepared = prepare(
        both, input_shape=[4], validation_fraction=0.2, test_fraction=0.2, seed=0, task="regression", outputs=2
    )
    assert prepared.outputs == 2 and prepared.target_standardizer is not None


@pytest.mark.parametrize(
    ("loader", "params", "targets", "fragments"),
    [
        (
            "nan_prices",
            {},
            ("a", "b"),
            ("(features [5, 2], targets [5, 2])", "target column 'b' holds inf at row 3 (0-based)", "drop or fill"),
        ),
        ("cube_prices", {}, ("a",), ("targets [4, 2, 2]", "[rows] or [rows, outputs]", "data.target")),
        ("prices", {"outputs": 3}, ("a", "b"), ("has 3 column(s) but data.target names 2 ('a', 'b')", "[rows, 2]")),
        ("worded_prices", {}, ("a",), ("holds the non-numeric value 'cheap' at row 2 (0-based)", "must be numbers")),
        ("nan_features", {}, ("a",), ("column 'f1' holds inf at row 2 (0-based)", "impute or drop")),
        ("fewer_targets", {}, ("a",), ("4 rows of features but 3 targets",)),
        ("images", {"size": 4}, ("a",), ("features [6, 4, 4]", "2-D", "reshape")),
    ],
)
def test_a_bad_regression_loader_output_is_refused_naming_the_loader(
    tmp_path: Path, loader: str, params: dict[str, Any], targets: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    path = f"{LOADERS}:{loader}"
    with pytest.raises(InvalidInputError) as info:
        load_regression_with_loader(path, tmp_path, params, targets=targets)
    assert f"data.loader {path!r}" in invalid(info, *fragments)


def test_nan_targets_from_a_loader_never_reach_prepare(tmp_path: Path) -> None:
    spec = DataSpec(loader=f"{LOADERS}:nan_targets")  # [0, 1, nan, 1]: a classifier refuses it too
    with pytest.raises(InvalidInputError) as info:
        load_data(tmp_path, spec, "regression")
    invalid(info, "data.loader 'tests.ml.user_loaders:nan_targets'", "target column 'label' holds nan at row 2")
