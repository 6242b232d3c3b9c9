"""Reading a regression dataset into a `RegressionTable`: float targets, one column per `data.target` entry.

The same files and folders as classification (`ml/table_files.py` finds and reads them, with the
same messages for features), but the target columns hold any finite numbers: integers are cast to
float, text must spell numbers, and an empty, non-numeric, NaN or infinite target is refused naming
the file, the column and the row (its line, for CSV) before anything is trained. `regression_table`
is the check every source ends in, `data.loader` included (`ml/loaders.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from domain.errors import InvalidInputError
from ml.data import RegressionTable
from ml.table_files import Columns, Float64Array, array_numbers, finite_features, index_row, read_columns, read_npz

# Accepted npz key names for the targets, in order of preference (a classification archive's names too).
NPZ_TARGET_KEYS = ("targets", "y", "labels")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_regression_table(
    path: Path, fmt: str, targets: Sequence[str], columns: Sequence[str] | None = None
) -> RegressionTable:
    """Reads a CSV or Parquet file, a folder of Parquet files or an npz archive with float targets.

    `targets` (data.target as a list) names the target columns, in the order of the model's outputs;
    every other column is a feature unless `columns` (data.columns) selects them. For npz the
    features are under `features` / `x` / `X` and the targets under `targets` / `y` / `labels`, as
    [N] or [N, len(targets)]: `targets` names their columns. Raises `InvalidInputError` naming the
    file, the column or key, the row and the fix.
    """
    path = Path(path)
    names = list(targets)
    read = read_columns(path, fmt, names, columns, role="target")
    if read is None:
        return _load_npz(path, names)
    return regression_table(read)


def regression_table(read: Columns, subject: str | None = None) -> RegressionTable:
    """The checks every regression source ends in: finite float32 features, finite targets [N, outputs].

    `subject` starts each message (default `data file SOURCE`; a loader names itself and its shapes).
    """
    subject = subject or f"data file {read.source}"
    features = finite_features(subject, read.features, read.feature_names, read.where)
    targets = np.column_stack(read.targets)
    for name, values in zip(read.target_names, read.targets, strict=True):
        # Beyond float32's range a target would become inf in the model's tensors.
        bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > _FLOAT32_MAX))
        if bad.size:
            raise InvalidInputError(
                f"{subject}: target column {name!r} holds {float(values[bad[0]])!r} at {read.where(int(bad[0]))} "
                f"({bad.size} such value(s) in that column); regression targets must be finite numbers "
                "(|y| < 3.4e38): drop or fill those rows"
            )
    return RegressionTable(
        features=features,
        targets=targets,
        feature_names=read.feature_names,
        target_names=read.target_names,
        source=read.source,
    )


def split_targets(matrix: Float64Array) -> list[Float64Array]:
    """A target matrix [N, K] as its K columns, the form `Columns` holds them in."""
    return [matrix[:, column] for column in range(matrix.shape[1])]


def target_matrix(raw: Float64Array, subject: str, names: list[str], *, what: str, fix: str) -> Float64Array:
    """`raw` targets ([N] or [N, K]) as [N, K], refusing another shape or a K other than len(names).

    `what` names the array in the message (an npz key, or a loader's "targets"), `fix` says how to
    return one column per name.
    """
    matrix = raw.reshape(-1, 1) if raw.ndim == 1 else raw
    if matrix.ndim != 2:
        raise InvalidInputError(
            f"{subject}: {what} has shape {list(raw.shape)}; regression targets must be [rows] or "
            f"[rows, outputs]; {fix}"
        )
    if matrix.shape[1] != len(names):
        listed = ", ".join(repr(name) for name in names)
        raise InvalidInputError(
            f"{subject}: {what} has {matrix.shape[1]} column(s) but data.target names {len(names)} ({listed}); "
            f"list one name per target column in data.target (e.g. target: [a, b]), or {fix}"
        )
    return matrix


def _load_npz(path: Path, names: list[str]) -> RegressionTable:
    source = str(path)
    arrays = read_npz(path, NPZ_TARGET_KEYS, "targets")
    key = arrays.target_key
    values = array_numbers(arrays.targets, f"data file {source}", key, index_row, role="target")
    if values is None:
        raise InvalidInputError(
            f"data file {source}: key {key!r} has dtype {arrays.targets.dtype}; regression targets must be numbers "
            "(integer or float)"
        )
    matrix = target_matrix(
        values, f"data file {source}", names, what=f"key {key!r}", fix=f"save {key!r} with one column per target"
    )
    feature_names = [f"f{i}" for i in range(arrays.features.shape[1])]
    return regression_table(Columns(source, arrays.features, feature_names, split_targets(matrix), names, index_row))
