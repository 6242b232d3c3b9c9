"""`data.loader`: the team's function, called with the fetched path and data.params, its output checked
like a table read from a file; and the spec's checks of loader, params, format and columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from domain.data_spec import DataSpec
from domain.errors import InvalidInputError, SpecError
from domain.spec import parse_spec
from ml.loaders import load_data, load_with_loader, loader_problems
from tests.ml.test_data import invalid

LOADERS = "tests.ml.user_loaders"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(20, 3)))
    np.save(tmp_path / "y.npy", np.arange(20) % 2)
    return tmp_path


def test_a_good_loader_gives_a_checked_table(folder: Path) -> None:
    data = DataSpec(loader=f"{LOADERS}:npy_pair", params={"scale": 2.0}, target="kind")
    assert data.format == "loader"
    table = load_data(folder, data)
    assert table.features.shape == (20, 3) and table.features.dtype == np.float32
    np.testing.assert_allclose(table.features, np.load(folder / "x.npy") * 2.0, rtol=1e-6)
    assert table.labels.tolist() == (np.arange(20) % 2).tolist() and table.labels.dtype == np.int64
    assert table.feature_names == ["f0", "f1", "f2"] and table.target == "kind" and table.source == str(folder)


@pytest.mark.parametrize(
    ("loader", "params", "fragments"),
    [
        ("images", {"size": 4}, ("'tests.ml.user_loaders:images' (features [6, 4, 4], targets [6])", "2-D", "reshape")),
        (
            "nan_targets",
            {},
            ("features [4, 3], targets [4]", "label nan in 'label' at row 2 (0-based) is not a number"),
        ),
        ("nan_features", {}, ("column 'f1' holds inf at row 2 (0-based)", "impute or drop")),
        ("fewer_targets", {}, ("4 rows of features but 3 targets",)),
        ("just_features", {}, ("returned ndarray", "return (features [rows, features], targets [rows])")),
        ("broken", {}, ("failed on", "FileNotFoundError", "fix the loader or data.params")),
        ("images", {"sise": 4}, ("data.params.sise", "did you mean 'size'?", "data.params.size: required")),
    ],
)
def test_a_bad_loader_output_is_refused_naming_the_loader_shape_and_fix(
    folder: Path, loader: str, params: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    path = f"{LOADERS}:{loader}"
    with pytest.raises(InvalidInputError) as info:
        load_with_loader(path, folder, params)
    assert path in invalid(info, *fragments)


def test_the_loader_path_is_checked_at_validation() -> None:
    assert loader_problems(DataSpec(loader=f"{LOADERS}:npy_pair")) == []
    assert loader_problems(DataSpec()) == []
    assert "has no attribute 'nope'" in loader_problems(DataSpec(loader=f"{LOADERS}:nope"))[0]
    assert "is not callable" in loader_problems(DataSpec(loader=f"{LOADERS}:NOT_A_FUNCTION"))[0]
    assert "cannot import module" in loader_problems(DataSpec(loader="no_such_package.io:read"))[0]
    lines = loader_problems(DataSpec(loader=f"{LOADERS}:images", params={"colour": True}))
    assert lines[0].startswith("data.params.colour: ") and lines[1].startswith("data.params.size: required")


def spec_with(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "p",
        "dataset": "d",
        "data": data,
        "model": {"architecture": "mlp", "input_shape": [3], "output_classes": 2},
    }


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"loader": f"{LOADERS}:npy_pair", "format": "parquet"}, "data.format 'parquet' contradicts data.loader"),
        ({"loader": "just_a_name"}, "data.loader must be an import path"),
        ({"format": "loader"}, "data.format 'loader' needs data.loader"),
        ({"params": {"size": 3}}, "data.params are data.loader's arguments"),
        ({"loader": f"{LOADERS}:npy_pair", "columns": ["a"]}, "remove data.columns"),
        ({"columns": ["a", "label"]}, "data.columns lists 'label', the target"),
        ({"columns": ["a", "b", "a"]}, "'a' more than once"),
        ({"columns": []}, "data.columns"),
        ({"format": "npz", "columns": ["f0"]}, "npz arrays have none"),
    ],
)
def test_contradictory_data_sections_are_refused(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(data), source="spec.yaml")
    assert info.value.code == "invalid_spec"
    assert any(line.startswith("spec.yaml: data") and fragment in line for line in info.value.problems), (
        info.value.problems
    )


def test_a_loader_spec_round_trips_through_its_stored_document() -> None:
    spec = parse_spec(spec_with({"loader": f"{LOADERS}:npy_pair", "params": {"scale": 0.5}}), source="s")
    again = parse_spec(spec.to_document(), source="stored")
    assert again.data.format == "loader" and again.data.params == {"scale": 0.5}
    columns = parse_spec(spec_with({"format": "parquet", "columns": ["b", "a"]}), source="s")
    assert parse_spec(columns.to_document(), source="stored").data.columns == ["b", "a"]
