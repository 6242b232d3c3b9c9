"""The digits demo versions: sizes, stratification, label noise, and files that load back."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from domain.errors import InvalidInputError
from ml import demo_data
from ml.data import load_table
from ml.demo_data import DigitsVersions, digits_tables, digits_versions, flip_labels

pytest.importorskip("sklearn", reason="the digits demo needs the optional scikit-learn (retrainer[demo])")

ROWS = 1797


@pytest.fixture(scope="module")
def versions() -> DigitsVersions:
    return digits_tables()


def test_v2_is_every_row(versions: DigitsVersions) -> None:
    v2 = versions.tables["v2"]
    assert v2.features.shape == (ROWS, 64) and v2.labels.shape == (ROWS,)
    assert set(np.unique(v2.labels).tolist()) == set(range(10))
    assert v2.features.min() == 0 and v2.features.max() == 16


def test_v1_is_a_stratified_sixty_percent_subset(versions: DigitsVersions) -> None:
    v1, v2 = versions.tables["v1"], versions.tables["v2"]
    assert abs(v1.num_rows - 0.6 * ROWS) <= 1
    np.testing.assert_array_equal(v1.features, v2.features[versions.subset_rows])
    np.testing.assert_array_equal(v1.labels, v2.labels[versions.subset_rows])
    for cls in range(10):
        assert abs(int((v1.labels == cls).sum()) - 0.6 * int((v2.labels == cls).sum())) <= 1


def test_v3_flips_exactly_thirty_percent_to_other_classes(versions: DigitsVersions) -> None:
    v2, v3 = versions.tables["v2"], versions.tables["v3"]
    changed = np.flatnonzero(v3.labels != v2.labels)
    assert changed.size == round(0.3 * ROWS)
    np.testing.assert_array_equal(changed, versions.flipped_rows)
    np.testing.assert_array_equal(versions.original_labels, v2.labels)
    np.testing.assert_array_equal(v3.features, v2.features)
    assert v3.labels.min() >= 0 and v3.labels.max() <= 9


def test_versions_are_deterministic_by_seed(versions: DigitsVersions) -> None:
    again, other = digits_tables(), digits_tables(seed=8)
    np.testing.assert_array_equal(again.subset_rows, versions.subset_rows)
    np.testing.assert_array_equal(again.tables["v3"].labels, versions.tables["v3"].labels)
    assert not np.array_equal(other.flipped_rows, versions.flipped_rows)
    assert not np.array_equal(other.subset_rows, versions.subset_rows)


def test_flip_labels_never_keeps_the_original() -> None:
    labels = np.repeat(np.arange(3, dtype=np.int64), 10)
    noisy, rows = flip_labels(labels, 0.5, 3, seed=0)
    assert rows.size == 15
    assert np.all(noisy[rows] != labels[rows])
    np.testing.assert_array_equal(np.delete(noisy, rows), np.delete(labels, rows))


def test_files_load_back_with_load_table(tmp_path: Path, versions: DigitsVersions) -> None:
    paths = digits_versions(tmp_path / "digits")
    assert sorted(paths) == ["v1", "v2", "v3"]
    for name, path in paths.items():
        header = path.read_text(encoding="utf-8").splitlines()[0]
        assert header == ",".join([*(f"p{i}" for i in range(64)), "label"])
        table = load_table(path, "csv", "label")
        np.testing.assert_array_equal(table.features, versions.tables[name].features)
        np.testing.assert_array_equal(table.labels, versions.tables[name].labels)
    first = {name: path.read_bytes() for name, path in paths.items()}
    digits_versions(tmp_path / "digits")
    assert {name: path.read_bytes() for name, path in paths.items()} == first
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [
        "digits_v1.csv",
        "digits_v2.csv",
        "digits_v3.csv",
    ]


@pytest.fixture
def without_sklearn(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A None entry in sys.modules makes the import raise ImportError, as on an install without the extra.
    demo_data._digits_arrays.cache_clear()
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    yield
    demo_data._digits_arrays.cache_clear()


@pytest.mark.usefixtures("without_sklearn")
def test_missing_scikit_learn_says_how_to_install() -> None:
    with pytest.raises(InvalidInputError) as info:
        digits_tables()
    assert info.value.code == "invalid_input"
    assert "scikit-learn" in str(info.value) and "pip install retrainer[demo]" in str(info.value)
