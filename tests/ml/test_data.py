"""Loading, splitting, standardising and preparing data: round trips and every refused input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from domain.errors import InvalidInputError
from ml.data import (
    PreparedData,
    RegressionTable,
    Standardizer,
    Table,
    TargetStandardizer,
    fit_standardizer,
    fit_target_standardizer,
    load_table,
    prepare,
    split,
)


def make_table(counts: dict[int, int], features: int = 3, seed: int = 0) -> Table:
    """Rows grouped by class with per-class offsets, so that standardisation has something to do."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, cls, dtype=np.int64) for cls, n in counts.items()])
    x = rng.normal(loc=5.0, scale=3.0, size=(labels.size, features)) + labels[:, None]
    return Table(
        features=x.astype(np.float32),
        labels=labels,
        feature_names=[f"f{i}" for i in range(features)],
        source="memory.csv",
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def invalid(info: pytest.ExceptionInfo[InvalidInputError], *fragments: str) -> str:
    assert info.value.code == "invalid_input"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------- round trips


def test_csv_round_trip_drops_target_and_keeps_column_order(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,label,b\n1,0,2.5\n3,1,-4\n5, 1 ,6e1\n\n")
    table = load_table(path, "csv", "label")
    assert table.features.dtype == np.float32 and table.labels.dtype == np.int64
    np.testing.assert_array_equal(table.features, [[1, 2.5], [3, -4], [5, 60]])
    np.testing.assert_array_equal(table.labels, [0, 1, 1])
    assert table.feature_names == ["a", "b"]
    assert table.source == str(path) and table.target == "label"
    assert (table.num_rows, table.num_features, table.num_classes) == (3, 2, 2)


def test_csv_with_bom_and_integral_float_labels(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffy,x\n1.0,7\n0,8\n2.00,9\n".encode())
    table = load_table(path, "CSV", "y")
    np.testing.assert_array_equal(table.labels, [1, 0, 2])
    assert table.feature_names == ["x"]


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table(
            {
                "i": pa.array([1, 2, 3], pa.int32()),
                "f": pa.array([0.5, 1.5, 2.5], pa.float64()),
                "flag": pa.array([True, False, True]),
                "target": pa.array(["0", "1", "1.0"]),
            }
        ),
        path,
    )
    table = load_table(path, "parquet", "target")
    np.testing.assert_array_equal(table.features, [[1, 0.5, 1], [2, 1.5, 0], [3, 2.5, 1]])
    np.testing.assert_array_equal(table.labels, [0, 1, 1])
    assert table.feature_names == ["i", "f", "flag"]


def test_npz_round_trip_flattens_and_ignores_target(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    images = np.arange(4 * 1 * 2 * 2, dtype=np.uint8).reshape(4, 1, 2, 2)
    np.savez(path, x=images, y=np.array([0, 1, 2, 1]))
    table = load_table(path, "npz", "whatever")
    assert table.features.shape == (4, 4) and table.features.dtype == np.float32
    np.testing.assert_array_equal(table.features, images.reshape(4, 4))
    np.testing.assert_array_equal(table.labels, [0, 1, 2, 1])
    assert table.feature_names == ["f0", "f1", "f2", "f3"] and table.target == "y"


def test_npz_with_full_key_names(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=np.eye(3, dtype=np.float32), labels=np.array([[0], [1], [0]]))
    table = load_table(path, "npz", "label")
    np.testing.assert_array_equal(table.labels, [0, 1, 0])


# ---------------------------------------------------------------------------------------- refused inputs


CSV_CASES = {
    "no header": ("", ["empty", "header"]),
    "no rows": ("a,label\n", ["no data rows"]),
    "missing target": ("a,b,lable\n1,2,0\n", ["'label'", "a, b, lable", "did you mean 'lable'"]),
    "non numeric": ("a,b,label\n1,2,0\n3,x7,1\n", ["column 'b'", "'x7'", "line 3"]),
    "empty cell": ("a,b,label\n1,2,0\n3,,1\n", ["column 'b'", "empty", "line 3"]),
    "nan": ("a,b,label\n1,nan,0\n3,4,1\n", ["column 'b'", "nan", "line 2", "finite"]),
    "inf": ("a,b,label\n1,2,0\n-inf,4,1\n", ["column 'a'", "inf", "line 3"]),
    "beyond float32": ("a,b,label\n1,1e39,0\n3,4,1\n", ["column 'b'", "line 2", "finite"]),
    "fractional label": ("a,label\n1,0\n2,1.5\n", ["'label'", "1.5", "line 3", "not an integer", "class ids"]),
    "string label": ("a,label\n1,cat\n2,dog\n", ["'label'", "'cat'", "line 2", "class ids"]),
    "negative label": ("a,label\n1,0\n2,-1\n", ["'label'", "negative", "line 3"]),
    "empty label": ("a,label\n1,\n2,1\n", ["'label'", "empty", "line 2"]),
    "single class": ("a,label\n1,3\n2,3\n", ["'label'", "single class", "at least 2 classes"]),
    "ragged row": ("a,b,label\n1,2,0\n3,1\n", ["line 3", "2 values", "3 columns"]),
    "only target": ("label\n0\n1\n", ["no feature columns", "'label'"]),
    "duplicate column": ("a,a,label\n1,2,0\n", ["column 'a'", "twice"]),
    "ragged after blank lines": ("a,b,label\n\n1,2,0\n\n3,1\n", ["line 5", "2 values", "3 columns"]),
    "non numeric after blank lines": ("a,b,label\n\n1,2,0\n\r\n3,x7,1\n", ["column 'b'", "'x7'", "line 5"]),
    "boolean feature": ("a,label\n1,0\ntrue,1\n", ["column 'a'", "'true'", "line 3", "numeric"]),
    "header without newline": ("a,label", ["no data rows"]),
    "blank lines only": ("\n\n", ["empty", "header"]),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_csv_is_refused_naming_file_and_column(tmp_path: Path, case: str) -> None:
    text, fragments = CSV_CASES[case]
    path = write(tmp_path / "bad_input.csv", text)
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "csv", "label")
    invalid(info, "bad_input.csv", *fragments)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_table(tmp_path / "nowhere.csv", "csv", "label")
    invalid(info, "nowhere.csv", "does not exist")


def test_unknown_format_names_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,label\n1,0\n")
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquett", "label")
    invalid(info, "d.csv", "data.format", "'parquett'", "did you mean 'parquet'")


def test_non_utf8_csv(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("a,label\n\xe9,0\n".encode("latin-1"))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "csv", "label")
    invalid(info, "latin.csv", "UTF-8", "column 'a'", "line 2")


def test_a_bad_cell_deep_in_a_large_csv_is_found_by_its_line(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i % 2}\n" for i in range(20_000))
    path = write(tmp_path / "large.csv", f"a,label\n{rows}1e3x,0\n")
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "csv", "label")
    invalid(info, "large.csv", "column 'a'", "'1e3x'", "line 20002")


def _parquet(tmp_path: Path, columns: dict[str, object]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad_input.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_non_numeric_column_names_column_and_type(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"colour": ["red", "blue"], "label": [0, 1]})
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquet", "label")
    invalid(info, "bad_input.parquet", "column 'colour'", "non-numeric type string")


def test_parquet_null_names_column_and_row(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"a": [1.0, 2.0, None], "label": [0, 1, 1]})
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquet", "label")
    invalid(info, "bad_input.parquet", "column 'a'", "null", "row 2")


def test_parquet_string_labels_name_the_row_that_is_not_a_class_id(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"a": [1.0, 2.0, 3.0], "label": ["0", " 1 ", "dog"]})
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquet", "label")
    invalid(info, "bad_input.parquet", "label column 'label'", "'dog'", "row 2", "class ids")


def test_parquet_missing_target_lists_columns(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"a": [1.0, 2.0], "labels": [0, 1]})
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquet", "label")
    invalid(info, "bad_input.parquet", "'label'", "a, labels", "did you mean 'labels'")


def test_parquet_empty_and_corrupt(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    path = _parquet(tmp_path, {"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())})
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "parquet", "label")
    invalid(info, "bad_input.parquet", "no rows")
    corrupt = write(tmp_path / "corrupt.parquet", "not parquet at all")
    with pytest.raises(InvalidInputError) as info:
        load_table(corrupt, "parquet", "label")
    invalid(info, "corrupt.parquet", "Parquet")


def test_npz_missing_labels_key_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad_input.npz"
    np.savez(path, features=np.ones((2, 2)), label=np.array([0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label")
    invalid(info, "bad_input.npz", "'labels'", "'y'", "keys present", "did you mean 'label'")


def test_npz_length_mismatch_and_ambiguous_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad_input.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.array([0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label")
    invalid(info, "bad_input.npz", "'x' has 3 rows", "'y' has 2")
    np.savez(path, x=np.ones((2, 2)), X=np.ones((2, 2)), y=np.array([0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label")
    invalid(info, "bad_input.npz", "'x'", "'X'", "keep only one")


def test_npz_object_arrays_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "bad_input.npz"
    np.savez(path, features=np.array([{"a": 1}, {"b": 2}], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label")
    invalid(info, "bad_input.npz", "'features'", "pickle")


def test_npz_nan_and_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "bad_input.npz"
    np.savez(path, x=np.array([[1.0, np.nan], [2.0, 3.0]]), y=np.array([0, 1]))
    with pytest.raises(InvalidInputError) as info:
        load_table(path, "npz", "label")
    invalid(info, "bad_input.npz", "column 'f1'", "nan", "row 0")
    text = write(tmp_path / "text.npz", "hello")
    with pytest.raises(InvalidInputError) as info:
        load_table(text, "npz", "label")
    invalid(info, "text.npz", ".npz")


# ---------------------------------------------------------------------------------------- split


COUNTS = {0: 50, 1: 31, 2: 13, 3: 7, 4: 2, 5: 1}


def test_split_is_stratified_within_one_row() -> None:
    table = make_table(COUNTS)
    splits = split(table, 0.2, 0.15, seed=3)
    for name, fraction in (("validation", 0.2), ("test", 0.15)):
        labels = table.labels[getattr(splits, name)]
        for cls, count in COUNTS.items():
            assert abs(int((labels == cls).sum()) - count * fraction) <= 1, (name, cls)
    total = sum(COUNTS.values())
    assert splits.sizes() == {"test": round(total * 0.15), "validation": round(total * 0.2), "train": 67}
    # The single row of class 5 cannot be shared: it stays in train.
    assert 5 in table.labels[splits.train]


def test_split_partitions_all_rows() -> None:
    table = make_table(COUNTS)
    splits = split(table, 0.15, 0.15, seed=7)
    parts = [splits.train, splits.validation, splits.test]
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    union = np.concatenate(parts)
    assert union.size == table.num_rows
    np.testing.assert_array_equal(np.sort(union), np.arange(table.num_rows))
    assert all(len(np.intersect1d(a, b)) == 0 for i, a in enumerate(parts) for b in parts[i + 1 :])


def test_split_is_deterministic_by_seed() -> None:
    table = make_table(COUNTS)
    first, again, other = split(table, 0.15, 0.15, 7), split(table, 0.15, 0.15, 7), split(table, 0.15, 0.15, 8)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.test, other.test)
    assert (first.seed, first.validation_fraction, first.test_fraction) == (7, 0.15, 0.15)


def test_zero_fractions_give_empty_splits_and_small_fractions_at_least_one_row() -> None:
    table = make_table({0: 10, 1: 10})
    splits = split(table, 0.0, 0.0, seed=1)
    assert splits.sizes() == {"train": 20, "validation": 0, "test": 0}
    tiny = split(table, 0.01, 0.01, seed=1)
    assert tiny.sizes() == {"train": 18, "validation": 1, "test": 1}


@pytest.mark.parametrize(
    ("validation", "test", "fragment"),
    [
        (-0.1, 0.1, "data.validation_fraction"),
        (0.1, 1.0, "data.test_fraction"),
        (0.5, 0.5, "must be < 1"),
        (float("nan"), 0.1, "data.validation_fraction"),
    ],
)
def test_bad_fractions_are_refused(validation: float, test: float, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        split(make_table({0: 10, 1: 10}), validation, test, seed=1)
    invalid(info, "memory.csv", fragment)


def test_too_few_rows_for_a_test_split_says_how_many_are_needed() -> None:
    table = make_table({0: 2, 1: 1})
    with pytest.raises(InvalidInputError) as info:
        split(table, 0.15, 0.15, seed=1)
    message = invalid(info, "memory.csv", "3 rows", "2 classes", "needs at least 4 rows")
    assert "data.test_fraction" in message
    # The stated minimum is enough.
    split(make_table({0: 3, 1: 1}), 0.15, 0.15, seed=1)


# ---------------------------------------------------------------------------------------- standardizer


def test_standardizer_uses_train_statistics_only() -> None:
    table = make_table({0: 40, 1: 40, 2: 40}, features=4)
    prepared = prepare(table, input_shape=[4], output_classes=3, validation_fraction=0.2, test_fraction=0.2, seed=5)
    train_rows = table.features[prepared.splits.train].astype(np.float64)
    np.testing.assert_allclose(prepared.standardizer.mean, train_rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(prepared.standardizer.std, train_rows.std(axis=0), rtol=1e-6)
    train = prepared.train.features.double()
    torch.testing.assert_close(train.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(dim=0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # Test rows use the train statistics, not their own.
    expected = (table.features[prepared.splits.test] - prepared.standardizer.mean) / prepared.standardizer.std
    np.testing.assert_allclose(prepared.test.features.numpy(), expected, rtol=1e-5, atol=1e-6)
    all_rows = table.features.astype(np.float64)
    assert not np.allclose(prepared.standardizer.mean, all_rows.mean(axis=0), rtol=1e-6, atol=0)


def test_constant_feature_gets_unit_std() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    standardizer = fit_standardizer(x, enabled=True)
    np.testing.assert_array_equal(standardizer.std, [1.0, 1.0])
    np.testing.assert_array_equal(standardizer.transform(x), [[-1.0, 0.0], [1.0, 0.0]])


def test_standardizer_json_round_trip_and_tensor_transform() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    standardizer = fit_standardizer(x, enabled=True)
    restored = Standardizer.from_dict(json.loads(json.dumps(standardizer.to_dict())))
    np.testing.assert_array_equal(restored.mean, standardizer.mean)
    np.testing.assert_array_equal(restored.std, standardizer.std)
    assert restored.enabled
    np.testing.assert_array_equal(restored.transform(x), standardizer.transform(x))
    np.testing.assert_allclose(restored.transform_tensor(torch.from_numpy(x)).numpy(), standardizer.transform(x))


def test_disabled_standardizer_is_identity() -> None:
    tokens = np.array([[3, 9, 0], [1, 2, 4]], dtype=np.float32)
    standardizer = fit_standardizer(tokens, enabled=False)
    assert not standardizer.enabled
    np.testing.assert_array_equal(standardizer.mean, [0, 0, 0])
    np.testing.assert_array_equal(standardizer.std, [1, 1, 1])
    np.testing.assert_array_equal(standardizer.transform(tokens), tokens)
    assert Standardizer.from_dict(standardizer.to_dict()).enabled is False


def test_standardizer_refuses_wrong_width_and_bad_dicts() -> None:
    standardizer = fit_standardizer(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(InvalidInputError) as info:
        standardizer.transform(np.ones((2, 5), dtype=np.float32))
    invalid(info, "5 features", "fitted on 3")
    bad = {"enabled": True, "mean": [0.0, 1.0], "std": [1.0]}
    with pytest.raises(InvalidInputError) as info:
        Standardizer.from_dict(bad, source="runs/r1/standardizer.json")
    invalid(info, "runs/r1/standardizer.json", "'mean'", "'std'")
    with pytest.raises(InvalidInputError) as info:
        Standardizer.from_dict({"enabled": True, "mean": [0.0]}, source="s.json")
    invalid(info, "s.json", "std")
    with pytest.raises(InvalidInputError) as info:
        Standardizer.from_dict({"enabled": True, "mean": [0.0], "std": [0.0]}, source="s.json")
    invalid(info, "s.json", "'std'", "<= 0")


# ---------------------------------------------------------------------------------------- prepare


def test_prepare_returns_tensors_and_reproducible_indices() -> None:
    table = make_table({0: 30, 1: 30, 2: 30}, features=4)
    prepared = prepare(
        table, input_shape=[1, 2, 2], output_classes=5, validation_fraction=0.15, test_fraction=0.15, seed=7
    )
    assert prepared.input_shape == (1, 2, 2) and prepared.num_classes == 5
    assert prepared.feature_names == table.feature_names and prepared.source == "memory.csv"
    assert (len(prepared.train), len(prepared.validation), len(prepared.test)) == (62, 14, 14)
    for part in (prepared.train, prepared.validation, prepared.test):
        assert part.features.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert part.features.shape == (len(part), 4)
        np.testing.assert_array_equal(part.labels.numpy(), table.labels[part.indices])
    np.testing.assert_array_equal(prepared.test.indices, split(table, 0.15, 0.15, 7).test)


def test_prepare_without_standardisation_keeps_token_ids() -> None:
    tokens = np.random.default_rng(1).integers(0, 50, size=(40, 6)).astype(np.float32)
    table = Table(tokens, np.arange(40, dtype=np.int64) % 2, [f"t{i}" for i in range(6)], "tokens.npz", "labels")
    prepared = prepare(
        table,
        input_shape=[6],
        output_classes=2,
        validation_fraction=0.1,
        test_fraction=0.1,
        seed=0,
        standardize=False,
    )
    np.testing.assert_array_equal(prepared.train.features.numpy(), tokens[prepared.train.indices])
    assert not prepared.standardizer.enabled


def test_prepare_shape_mismatch_names_both() -> None:
    table = make_table({0: 10, 1: 10}, features=63)
    with pytest.raises(InvalidInputError) as info:
        prepare(table, input_shape=[64], output_classes=10, validation_fraction=0.1, test_fraction=0.1, seed=0)
    invalid(info, "memory.csv", "data file memory.csv has 63 features per row but model.input_shape [64] needs 64")


def test_prepare_label_beyond_output_classes_names_both() -> None:
    table = make_table({0: 10, 7: 10})
    with pytest.raises(InvalidInputError) as info:
        prepare(table, input_shape=[3], output_classes=5, validation_fraction=0.1, test_fraction=0.1, seed=0)
    invalid(info, "memory.csv", "'label'", "class id 7", "model.output_classes is 5", "at least 8")


# ---------------------------------------------------------------------------------------- regression


def regression_table(rows: int = 50, columns: int = 2, seed: int = 0) -> RegressionTable:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)).astype(np.float32)
    targets = np.stack([1000 + 300 * x[:, 0], -2 * x[:, 1]][:columns], axis=1)
    return RegressionTable(x, targets, ["a", "b", "c"], ["price", "demand"][:columns], "sales.parquet")


def prepare_regression(table: Table | RegressionTable, **overrides: Any) -> PreparedData:
    arguments: dict[str, Any] = {
        "input_shape": [3],
        "task": "regression",
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
        "seed": 4,
        **overrides,
    }
    return prepare(table, **arguments)


def test_prepare_regression_gives_standardised_float_targets_from_train_statistics() -> None:
    table = regression_table()
    prepared = prepare_regression(table, outputs=2)
    assert (prepared.task, prepared.outputs, prepared.num_classes) == ("regression", 2, 0)
    assert prepared.target_names == ["price", "demand"]
    scaler = prepared.target_standardizer
    assert isinstance(scaler, TargetStandardizer) and scaler.enabled
    train_targets = table.targets[prepared.splits.train]
    np.testing.assert_allclose(scaler.mean, train_targets.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scaler.std, train_targets.std(axis=0), rtol=1e-6)
    for part in (prepared.train, prepared.validation, prepared.test):
        assert part.labels.dtype == torch.float32 and tuple(part.labels.shape) == (len(part), 2)
        np.testing.assert_allclose(scaler.inverse(part.labels.numpy()), table.targets[part.indices], rtol=1e-5)
        torch.testing.assert_close(
            scaler.inverse_tensor(part.labels), torch.from_numpy(table.targets[part.indices]).float()
        )
    assert prepared.splits.sizes() == {"train": 30, "validation": 10, "test": 10}
    data = prepared.training_data()
    assert data.target_standardizer is scaler and torch.equal(data.val_labels, prepared.validation.labels)


def test_prepare_regression_one_target_column_and_raw_targets() -> None:
    table = regression_table(columns=1)
    table = RegressionTable(table.features, table.targets[:, 0], table.feature_names, ["price"], table.source)
    prepared = prepare_regression(table, standardize_targets=False)  # outputs from the table: 1
    assert prepared.outputs == 1 and tuple(prepared.train.labels.shape) == (30, 1)
    np.testing.assert_array_equal(
        prepared.train.labels.numpy()[:, 0], table.targets[prepared.splits.train].astype(np.float32)
    )
    assert prepared.target_standardizer is not None and not prepared.target_standardizer.enabled


def test_regression_split_is_deterministic_and_partitions_all_rows() -> None:
    table = regression_table(rows=41)
    first, again = split(table, 0.15, 0.15, seed=9), split(table, 0.15, 0.15, seed=9)
    everything = np.concatenate([first.train, first.validation, first.test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(41))
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.sizes() == {"train": 29, "validation": 6, "test": 6}
    with pytest.raises(InvalidInputError) as info:
        split(regression_table(rows=2), 0.3, 0.3, seed=1)
    message = invalid(info, "sales.parquet", "2 rows:", "train keeps at least one row", "needs at least 3 rows")
    assert "classes" not in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prepare_refuses_a_non_finite_target_naming_the_column_and_row(bad: float) -> None:
    table = regression_table()
    table.targets[17, 1] = bad
    table.targets[30, 1] = bad
    with pytest.raises(InvalidInputError) as info:
        prepare_regression(table)
    invalid(info, "sales.parquet", "target column 'demand'", f"holds {bad}", "row 17", "2 non-finite", "drop or fill")


def test_prepare_regression_refuses_mismatched_outputs_shapes_and_tasks() -> None:
    with pytest.raises(InvalidInputError) as info:
        prepare_regression(regression_table(), outputs=1)
    invalid(info, "model.outputs is 1", "2 column(s) ['price', 'demand']", "set model.outputs to 2")
    table = regression_table()
    short = RegressionTable(table.features, table.targets[:10], table.feature_names, table.target_names, "s.csv")
    with pytest.raises(InvalidInputError) as info:
        prepare_regression(short)
    invalid(info, "s.csv", "shape [10, 2]", "need [50, 2]")
    with pytest.raises(InvalidInputError) as info:
        prepare_regression(make_table({0: 10, 1: 10}))
    invalid(info, "memory.csv", "read as class ids", "task is regression")
    with pytest.raises(InvalidInputError) as info:
        prepare(table, input_shape=[3], output_classes=2, validation_fraction=0.2, test_fraction=0.2, seed=0)
    invalid(info, "sales.parquet", "float targets ['price', 'demand']", "set the task to regression")


def test_target_standardizer_handles_a_constant_column_and_round_trips_as_a_dict() -> None:
    targets = np.stack([np.full(6, 1234.567), np.arange(6.0)], axis=1)
    scaler = fit_target_standardizer(targets)
    np.testing.assert_array_equal(scaler.std[0], 1.0)
    standardised = scaler.transform(targets)
    np.testing.assert_array_equal(standardised[:, 0], np.zeros(6, np.float32))
    np.testing.assert_allclose(scaler.inverse(standardised), targets, rtol=1e-6)
    restored = TargetStandardizer.from_dict(json.loads(json.dumps(scaler.to_dict())), source="manifest.json")
    assert isinstance(restored, TargetStandardizer) and restored.to_dict() == scaler.to_dict()
    with pytest.raises(InvalidInputError) as info:
        restored.inverse(np.zeros((2, 3), np.float32))
    invalid(info, "3 target columns per row", "fitted on 2", "model.outputs")
