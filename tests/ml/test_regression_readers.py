"""Regression tables from every layout: float targets [N, outputs] named by data.target, and each refused input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domain.data_spec import DataSpec
from domain.errors import InvalidInputError
from ml.data import RegressionTable, prepare
from ml.loaders import load_data
from ml.regression_readers import load_regression_table
from tests.ml.test_data import invalid, write
from tests.ml.test_readers_folders import shard


def test_a_csv_reads_one_or_several_float_targets_in_the_listed_order(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,price,b,units\n1,10.5,2,3\n4,-20,5,6\n7,3e3,8,9\n")
    one = load_regression_table(path, "csv", ["price"])
    assert isinstance(one, RegressionTable) and one.source == str(path)
    assert one.feature_names == ["a", "b", "units"] and one.target_names == ["price"]
    assert one.targets.shape == (3, 1) and one.targets[:, 0].tolist() == [10.5, -20.0, 3000.0]
    assert one.features.dtype == np.float32 and one.targets.dtype == np.float64

    both = load_regression_table(path, "csv", ["units", "price"])
    assert both.feature_names == ["a", "b"] and both.target_names == ["units", "price"]
    assert both.targets.tolist() == [[3, 10.5], [6, -20], [9, 3000]]  # integer column cast to float


def test_data_columns_with_a_list_target_leave_other_columns_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "id,a,y1,b,y2\nx,1,0.5,2,7\nz,3,1.5,4,8\n")
    table = load_regression_table(path, "csv", ["y1", "y2"], columns=["b", "a"])
    assert table.feature_names == ["b", "a"] and table.features.tolist() == [[2, 1], [4, 3]]
    assert table.targets.tolist() == [[0.5, 7], [1.5, 8]]
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "csv", ["y1", "y2"], columns=["a", "y2"])
    invalid(info, "data.columns lists 'y2', the target column (data.target)")


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_parquet_files_and_folders_read_float_targets(tmp_path: Path, layout: str) -> None:
    if layout == "file":
        path = tmp_path / "d.parquet"
        shard(path, a=[1.0, 2.0, 3.0], y=[1, 2, 3], z=["0.5", "1e2", " -3 "])
    else:
        path = tmp_path / "dt=2026-11-30"
        shard(path / "part-1.parquet", a=[3.0], y=[3], z=[" -3 "])
        shard(path / "part-0.parquet", a=[1.0, 2.0], y=[1, 2], z=["0.5", "1e2"])
    table = load_regression_table(path, "parquet", ["y", "z"])  # text that spells numbers is read as numbers
    assert table.feature_names == ["a"] and table.features[:, 0].tolist() == [1, 2, 3]
    assert table.targets.tolist() == [[1, 0.5], [2, 100], [3, -3]] and table.target_names == ["y", "z"]


def test_npz_targets_of_one_or_several_columns_take_the_names_of_data_target(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(24, dtype=np.float32).reshape(4, 2, 3), targets=np.arange(4) * 1.5)
    table = load_regression_table(path, "npz", ["price"])
    assert table.features.shape == (4, 6) and table.feature_names[-1] == "f5"
    assert table.targets[:, 0].tolist() == [0, 1.5, 3, 4.5] and table.target_names == ["price"]

    np.savez(path, features=np.ones((4, 2)), y=np.arange(8).reshape(4, 2))
    table = load_regression_table(path, "npz", ["low", "high"])
    assert table.targets.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]] and table.target_names == ["low", "high"]
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "npz", ["price"])
    invalid(info, "key 'y' has 2 column(s) but data.target names 1 ('price')", "one name per target column")
    np.savez(path, features=np.ones((4, 2)), y=np.ones((4, 2, 2)))
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "npz", ["price"])
    invalid(info, "key 'y' has shape [4, 2, 2]", "[rows] or [rows, outputs]")
    np.savez(path, features=np.ones((4, 2)), values=np.ones(4))
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "npz", ["price"])
    invalid(info, "no targets array", "'targets' / 'y' / 'labels'", "keys present")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "a,y\n1,2.5\n2,cheap\n",
            ("target column 'y' holds the non-numeric value 'cheap' at line 3", "must be numbers"),
        ),
        ("a,y\n1,2.5\n\n2,nan\n", ("target column 'y' holds nan at line 4", "finite numbers", "drop or fill")),
        ("a,y\n1,2.5\n2,\n", ("column 'y' has 1 empty (null) value(s), the first at line 3",)),
        ("a,y\n1,1e39\n2,3\n", ("target column 'y' holds 1e+39 at line 2",)),
        ("a,y\nx,1\n2,3\n", ("column 'a' holds the non-numeric value 'x' at line 2", "encode it as numbers")),
    ],
)
def test_a_bad_target_cell_is_refused_naming_the_file_column_and_line(
    tmp_path: Path, text: str, fragments: tuple[str, ...]
) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "csv", ["y"])
    assert str(path) in invalid(info, *fragments)


def test_a_bad_parquet_target_is_named_by_its_shard_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", a=[1.0, 2.0], y=[1.0, 2.0])
    shard(folder / "part-1.parquet", a=[1.0, 2.0], y=[float("nan"), 2.0])
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(folder, "parquet", ["y"])
    invalid(info, "target column 'y' holds nan at row 0 (0-based) of part-1.parquet")
    pq.write_table(pa.table({"a": [1.0], "y": pa.array([b"\x01"], pa.binary())}), folder / "part-1.parquet")
    shard(folder / "part-0.parquet", a=[1.0], y=pa.array([b"\x00"], pa.binary()))
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(folder, "parquet", ["y"])
    invalid(info, "column 'y' has the non-numeric type binary", "regression targets (data.target) must be numbers")


def test_a_missing_target_column_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,price,units\n1,2,3\n")
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(path, "csv", ["units", "prise"])
    invalid(info, "no target column 'prise' (data.target)", "columns present: a, price, units", "did you mean 'price'?")


def test_a_folder_with_mixed_schemas_or_no_files_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", a=[1.0], y=[1.0])
    shard(folder / "part-1.parquet", a=[1.0], y=[1])
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(folder, "parquet", ["y"])
    invalid(info, "part-1.parquet and part-0.parquet have different schemas", "column 'y' is type int64")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError) as info:
        load_regression_table(empty, "parquet", ["y"])
    invalid(info, f"data folder {empty} holds no data files")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "folder", "npz"])
def test_load_data_reads_every_layout_for_regression_and_prepare_takes_it(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = np.column_stack([x.sum(axis=1) * 1000, x[:, 0] - 7])
    columns = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "cost": y[:, 0], "delay": y[:, 1]}
    if fmt == "csv":
        path = tmp_path / "d.csv"
        rows = "\n".join(",".join(repr(float(v)) for v in row) for row in zip(*columns.values(), strict=True))
        write(path, ",".join(columns) + "\n" + rows + "\n")
    elif fmt == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, features=x, targets=y)
    else:
        path = tmp_path / ("d.parquet" if fmt == "parquet" else "folder/part-0.parquet")
        shard(path, **{name: list(values) for name, values in columns.items()})
        path = path if fmt == "parquet" else path.parent
    data = DataSpec(format="npz" if fmt == "npz" else "parquet" if fmt == "folder" else fmt, target=["cost", "delay"])
    table = load_data(path, data, "regression")
    np.testing.assert_allclose(table.targets, y)
    np.testing.assert_allclose(table.features, x, rtol=1e-6)
    prepared = prepare(
        table, input_shape=[3], validation_fraction=0.2, test_fraction=0.2, seed=0, task="regression", outputs=2
    )
    assert prepared.target_names == ["cost", "delay"] and prepared.train.labels.shape[1] == 2
    assert len(prepared.train) + len(prepared.validation) + len(prepared.test) == 40


def test_classification_reads_one_target_only(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,label,other\n1,0,5\n2,1,6\n")
    table = load_data(path, DataSpec(target=["label"]))
    assert table.labels.tolist() == [0, 1] and table.target == "label"
    with pytest.raises(InvalidInputError) as info:
        load_data(path, DataSpec(target=["label", "other"]), "classification")
    invalid(info, "data.target lists 2 columns (label, other)", "set task: regression")
