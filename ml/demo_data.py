"""Three versions of scikit-learn's bundled digits dataset, to show retraining without a download.

The digits (1,797 rows of 8x8 pixels valued 0..16, classes 0..9) ship inside scikit-learn, so the
demo works offline. The versions tell a small story a pipeline can react to:

- `v1`: a stratified 60 % subset (the first, smaller data drop);
- `v2`: all rows (more data arrives: a retrain should match or beat v1);
- `v3`: all rows with 30 % of labels flipped to a different class (a bad data drop: the promotion
  gate should refuse the model trained on it).

Everything is seeded, so the same seed always writes byte-identical files. `digits_tables` returns
the versions as `Table`s (for tests, no files); `digits_versions` writes them as CSV (header
`p0..p63,label`, pixel values as integers) for `load_table(path, "csv", "label")`.

scikit-learn is an optional dependency (`retrainer[demo]`): it is imported inside the functions, and
a missing install is reported as an `InvalidInputError` that says how to get it.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv

from domain.errors import InvalidInputError
from ml.data import Table, split

DEFAULT_SEED = 7
SUBSET_FRACTION = 0.6
FLIP_FRACTION = 0.3
VERSIONS = ("v1", "v2", "v3")
FEATURE_NAMES = [f"p{i}" for i in range(64)]
TARGET = "label"


@dataclass(frozen=True, eq=False)
class DigitsVersions:
    """The three versions as tables, and which rows each derived version changed.

    `subset_rows`: the rows of the full dataset that v1 keeps (sorted, in v1's order);
    `flipped_rows`: the rows of v3 whose label differs from v2's (sorted); `original_labels`: v2's labels.
    """

    tables: dict[str, Table]
    subset_rows: npt.NDArray[np.int64]
    flipped_rows: npt.NDArray[np.int64]
    original_labels: npt.NDArray[np.int64]


@functools.cache
def _digits_arrays() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    try:
        # Untyped optional dependency, imported by name so that core installs never need it.
        datasets = importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise InvalidInputError(
            "the digits demo data needs scikit-learn, which is not installed (module 'sklearn'); "
            "run `pip install retrainer[demo]`"
        ) from exc
    bunch = datasets.load_digits()
    features = np.asarray(bunch.data, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    # Read-only: the cached arrays are shared by every caller.
    features.flags.writeable = False
    labels.flags.writeable = False
    return features, labels


def flip_labels(
    labels: npt.NDArray[np.int64], fraction: float, num_classes: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Returns (noisy labels, sorted flipped row indices): round(fraction x N) rows get a different class.

    The new class is drawn uniformly from the other `num_classes - 1`, so a flipped label never equals
    the original.
    """
    if not 0 <= fraction <= 1:
        raise InvalidInputError(f"flip fraction must be in [0, 1] (got {fraction})")
    if num_classes < 2:
        raise InvalidInputError(f"flipping labels needs at least 2 classes (got {num_classes})")
    rng = np.random.default_rng(seed)
    count = round(fraction * labels.size)
    rows = np.sort(rng.choice(labels.size, size=count, replace=False)).astype(np.int64)
    noisy = labels.astype(np.int64, copy=True)
    # An offset in 1..K-1 modulo K moves every flipped label to one of the other classes.
    offsets = rng.integers(1, num_classes, size=count)
    noisy[rows] = (noisy[rows] + offsets) % num_classes
    return noisy, rows


def digits_tables(seed: int = DEFAULT_SEED) -> DigitsVersions:
    """The three digits versions as `Table`s (source `sklearn:digits/<version>`), without writing files."""
    features, labels = _digits_arrays()
    full = Table(
        features=features.copy(),
        labels=labels.copy(),
        feature_names=list(FEATURE_NAMES),
        source="sklearn:digits/v2",
        target=TARGET,
    )
    # The stratified 60 % subset is the train part of a 60/40 split, so it reuses split's guarantees.
    subset = split(full, validation_fraction=0.0, test_fraction=1 - SUBSET_FRACTION, seed=seed).train
    v1 = Table(
        features=features[subset].copy(),
        labels=labels[subset].copy(),
        feature_names=list(FEATURE_NAMES),
        source="sklearn:digits/v1",
        target=TARGET,
    )
    noisy, flipped = flip_labels(labels, FLIP_FRACTION, int(labels.max()) + 1, seed)
    v3 = Table(
        features=features.copy(),
        labels=noisy,
        feature_names=list(FEATURE_NAMES),
        source="sklearn:digits/v3",
        target=TARGET,
    )
    return DigitsVersions(
        tables={"v1": v1, "v2": full, "v3": v3}, subset_rows=subset, flipped_rows=flipped, original_labels=labels.copy()
    )


def digits_versions(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Writes `digits_v1.csv`, `digits_v2.csv` and `digits_v3.csv` into `out_dir`; returns {version: path}.

    Existing files are replaced atomically, so a reader never sees a half-written CSV.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = digits_tables(seed)
    paths: dict[str, Path] = {}
    for name in VERSIONS:
        path = out_dir / f"digits_{name}.csv"
        _write_csv(versions.tables[name], path)
        paths[name] = path
    return paths


def _write_csv(table: Table, path: Path) -> None:
    # Pixels are integral 0..16: written as integers the files stay small and exact.
    columns = {name: table.features[:, i].astype(np.int64) for i, name in enumerate(table.feature_names)}
    columns[table.target] = table.labels.astype(np.int64)
    write_csv_atomically(pa.table(columns), path)


def write_csv_atomically(table: pa.Table, path: Path) -> None:
    """Writes `table` as CSV beside `path`, then renames: a reader never sees a half-written file."""
    options = pacsv.WriteOptions(quoting_style="needed", quoting_header="none")
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pacsv.write_csv(table, partial, write_options=options)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
