"""Folders of Parquet files (`pyarrow.dataset`, all files one table) and `data.columns` selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domain.errors import InvalidInputError
from ml.readers import load_table
from tests.ml.test_data import invalid


def shard(path: Path, **columns: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_a_folder_reads_as_one_table_in_file_order(tmp_path: Path) -> None:
    folder = tmp_path / "dt=2026-11-30"
    shard(folder / "part-1.parquet", a=[3.0, 4.0], b=[30, 40], label=[1, 0])
    shard(folder / "part-0.parquet", a=[1.0, 2.0], b=[10, 20], label=[0, 1])
    shard(folder / "late" / "part-2.parquet", a=[5.0], b=[50], label=[1])
    (folder / "_SUCCESS").write_bytes(b"")  # bookkeeping, skipped like pyarrow.dataset does
    table = load_table(folder, "parquet", "label")
    # Sorted paths: late/part-2, part-0, part-1; the same folder always gives the same rows in the same order.
    assert table.features.tolist() == [[5, 50], [1, 10], [2, 20], [3, 30], [4, 40]]
    assert table.labels.tolist() == [1, 0, 1, 1, 0] and table.feature_names == ["a", "b"]
    assert table.source == str(folder)


def test_files_with_different_schemas_are_refused_naming_both_and_the_column(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", a=[1.0, 2.0], label=[0, 1])
    shard(folder / "part-1.parquet", a=["x", "y"], label=[0, 1])
    with pytest.raises(InvalidInputError) as info:
        load_table(folder, "parquet", "label")
    invalid(info, "part-1.parquet and part-0.parquet", "column 'a'", "type string", "type double", "re-export")

    shard(folder / "part-1.parquet", a=[1.0, 2.0], label=[0, 1], extra=[1, 2])
    with pytest.raises(InvalidInputError) as info:
        load_table(folder, "parquet", "label")
    invalid(info, "column 'extra' is type int64 in part-1.parquet but missing in part-0.parquet")


def test_an_empty_folder_and_a_foreign_file_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "_temporary").mkdir(parents=True)
    with pytest.raises(InvalidInputError) as info:
        load_table(empty, "parquet", "label")
    invalid(info, f"data folder {empty} holds no data files")

    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", a=[1.0, 2.0], label=[0, 1])
    (folder / "notes.txt").write_text("not parquet")
    with pytest.raises(InvalidInputError) as info:
        load_table(folder, "parquet", "label")
    invalid(info, "notes.txt is not a readable Parquet file")


def test_a_folder_needs_data_format_parquet(tmp_path: Path) -> None:
    shard(tmp_path / "ds" / "part-0.parquet", a=[1.0, 2.0], label=[0, 1])
    with pytest.raises(InvalidInputError) as info:
        load_table(tmp_path / "ds", "csv", "label")
    invalid(info, "set data.format: parquet")


def test_a_bad_cell_is_named_by_its_shard_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", a=[1.0, 2.0], label=[0, 1])
    shard(folder / "part-1.parquet", a=[1.0, None, 3.0], label=[0, 1, 0])
    with pytest.raises(InvalidInputError) as info:
        load_table(folder, "parquet", "label")
    invalid(info, "column 'a'", "row 1 (0-based) of part-1.parquet")


def test_columns_select_features_in_their_order_and_leave_the_rest_alone(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("id,b,a,label\nabc,1,2,0\ndef,3,4,1\n")
    table = load_table(csv, "csv", "label", columns=["a", "b"])  # 'id' holds text: fine when not selected
    assert table.feature_names == ["a", "b"] and table.features.tolist() == [[2, 1], [4, 3]]
    assert table.labels.tolist() == [0, 1]

    folder = tmp_path / "ds"
    shard(folder / "part-0.parquet", id=["x", "y"], a=[1.0, 2.0], b=[5, 6], label=[0, 1])
    table = load_table(folder, "parquet", "label", columns=["b"])
    assert table.feature_names == ["b"] and table.features[:, 0].tolist() == [5, 6]
    # Without data.columns every column but the target is a feature, so the text column is refused.
    with pytest.raises(InvalidInputError):
        load_table(csv, "csv", "label")


def test_a_selected_text_column_is_still_refused(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("id,a,label\nabc,1,0\ndef,2,1\n")
    with pytest.raises(InvalidInputError) as info:
        load_table(csv, "csv", "label", columns=["id", "a"])
    invalid(info, "column 'id' holds the non-numeric value 'abc' at line 2")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_unknown_column_is_refused_with_the_available_ones(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("price,quantity,label\n1,2,0\n3,4,1\n")
    else:
        shard(path, price=[1.0, 3.0], quantity=[2, 4], label=[0, 1])
    with pytest.raises(InvalidInputError) as info:
        load_table(path, fmt, "label", columns=["price", "quantty"])
    invalid(info, "no column 'quantty' (data.columns)", "available: price, quantity", "did you mean 'quantity'?")
    with pytest.raises(InvalidInputError) as info:
        load_table(path, fmt, "label", columns=["price", "label"])
    invalid(info, "lists 'label', the target column")


def test_columns_on_npz_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=np.zeros((4, 2)), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label", columns=["f0"])
    invalid(info, "npz arrays have none")
