"""Reading a classification dataset into a `Table`: CSV and Parquet through pyarrow, NPZ through numpy.

It is strict on purpose. A non-numeric cell, an empty cell, a NaN or a label that is not an integer
class id is refused with an `InvalidInputError` that names the file, the column (or npz key), the
row and the fix. Coercing them silently would train a model on data nobody looked at.

Finding and reading the file (or folder) and its columns is shared with regression and lives in
`ml/table_files.py`; regression's float targets are read by `ml/regression_readers.py`. Labels must
already be class ids 0..K-1 (integral floats and strings such as "3.0" are accepted as the integers
they spell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError
from ml.table_files import (
    FORMATS,
    LABEL_FIX,
    NPZ_FEATURE_KEYS,
    Float64Array,
    FloatArray,
    IndexArray,
    RowLocator,
    array_numbers,
    did_you_mean,
    finite_features,
    index_row,
    read_columns,
    read_npz,
)

__all__ = [
    "FORMATS",
    "NPZ_FEATURE_KEYS",
    "NPZ_LABEL_KEYS",
    "FloatArray",
    "IndexArray",
    "Table",
    "did_you_mean",
    "finish",
    "index_row",
    "load_table",
]

# Accepted npz key names for the labels, in order of preference.
NPZ_LABEL_KEYS = ("labels", "y")


@dataclass(frozen=True, eq=False)
class Table:
    """A loaded dataset: `features` float32 (NxF), `labels` int64 class ids (N), one name per feature.

    `source` is the file the rows came from (used in every later error message); `target` is the
    label column, or the npz key the labels were read from.
    """

    features: FloatArray
    labels: IndexArray
    feature_names: list[str]
    source: str
    target: str = "label"

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        """The number of classes the labels need: the largest class id + 1."""
        return int(self.labels.max()) + 1 if self.labels.size else 0


def load_table(path: Path, fmt: str, target: str, columns: Sequence[str] | None = None) -> Table:
    """Reads a dataset file (or a folder of Parquet files) into a `Table`, refusing anything that would
    train on unchecked data.

    - `csv`: a header row is required; `target` names the label column; every other column is a
      feature and must hold numbers in every row (comma-separated, UTF-8).
    - `parquet`: the same rules; feature columns must have an integer, floating-point, boolean or
      decimal type and no nulls.
    - `npz`: arrays `features` (or `x` / `X`) and `labels` (or `y`). `target` is ignored for npz:
      the label array is found by those key names. Features may have any shape N x ... (e.g. images
      N x 1 x 8 x 8) and are flattened to NxF; they are named `f0`, `f1`, ...
    - a folder (`parquet` only): every file below it except names starting with `.` or `_`, read with
      `pyarrow.dataset` as one table in sorted path order; the files must have the same schema.

    `columns` (data.columns) names the feature columns, in the order the model sees them; by default
    every column but the target is a feature. Columns left out may hold anything (ids, text).

    Raises `InvalidInputError` (naming the file, the column or key, and the fix) for a missing file,
    an unknown format, no rows, a missing target column, an unknown column in `columns`, non-numeric
    or empty cells, NaN/inf features, labels that are not non-negative integer class ids, data with
    a single class, and a folder that is empty or whose files differ in schema.
    """
    path = Path(path)
    read = read_columns(path, fmt, [target], columns, role="label")
    if read is None:
        return _load_npz(path)
    return finish(read.source, read.features, read.targets[0], read.feature_names, read.target_names[0], read.where)


def finish(
    source: str,
    features64: Float64Array,
    raw_labels: Float64Array,
    feature_names: list[str],
    target: str,
    where: RowLocator,
    subject: str | None = None,
) -> Table:
    """The checks every format shares: finite features (after the float32 cast) and integer class ids.

    `subject` starts each message (default `data file SOURCE`; a loader names itself and its shapes).
    """
    subject = subject or f"data file {source}"
    features = finite_features(subject, features64, feature_names, where)
    labels = _class_ids(subject, raw_labels, target, where)
    present = np.unique(labels)
    if present.size < 2:
        raise InvalidInputError(
            f"{subject}: target {target!r} has a single class ({int(present[0])}) in all {labels.size} rows; "
            "training a classifier needs at least 2 classes"
        )
    return Table(features=features, labels=labels, feature_names=feature_names, source=source, target=target)


def _class_ids(subject: str, values: Float64Array, target: str, where: RowLocator) -> IndexArray:
    fix = f"{LABEL_FIX}; map them before training"
    checks: tuple[tuple[npt.NDArray[np.bool_], str], ...] = (
        (~np.isfinite(values), "is not a number"),
        (values != np.round(values), "is not an integer"),
        (values < 0, "is negative"),
        (values > np.iinfo(np.int32).max, "is too large to be a class id"),
    )
    for bad, problem in checks:
        if bad.any():
            row = int(np.argmax(bad))
            raise InvalidInputError(
                f"{subject}: label {float(values[row])!r} in {target!r} at {where(row)} {problem}; {fix}"
            )
    return values.astype(np.int64)


def _load_npz(path: Path) -> Table:
    source = str(path)
    arrays = read_npz(path, NPZ_LABEL_KEYS, "labels")
    labels_raw = arrays.targets
    if labels_raw.ndim == 2 and labels_raw.shape[1] == 1:
        labels_raw = labels_raw[:, 0]
    if labels_raw.ndim != 1:
        raise InvalidInputError(
            f"data file {source}: key {arrays.target_key!r} has shape {list(labels_raw.shape)}; labels must be one "
            "class id per row (shape [N])"
        )
    raw_labels = array_numbers(labels_raw, f"data file {source}", arrays.target_key, index_row, role="label")
    if raw_labels is None:
        raise InvalidInputError(
            f"data file {source}: key {arrays.target_key!r} has dtype {labels_raw.dtype}; labels must be integer "
            "class ids 0..K-1"
        )
    feature_names = [f"f{i}" for i in range(arrays.features.shape[1])]
    return finish(source, arrays.features, raw_labels, feature_names, arrays.target_key, index_row)
