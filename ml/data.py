"""What a pipeline trains and evaluates on: load a table, split it, standardise it, hand over tensors.

The flow is `load_table` → `split` → `fit_standardizer` → tensors, and `prepare` runs it for a spec:

- `load_table` (in `ml/readers.py`, re-exported here) reads CSV and Parquet (a file or a folder of
  files) through pyarrow, or NPZ, into a `Table`: float32 features NxF (all columns but the target,
  or `data.columns`) and int64 class ids, refusing a non-numeric or empty cell, a NaN or a label that
  is not a class id with a message naming the file, the column, the row and the fix. A spec's
  `data.loader` goes through `ml/loaders.py`'s `load_data` instead, which checks its output the same way.
- `split` is stratified and deterministic: the same table, fractions and seed always give the same
  index sets, and the indices are kept so that a test split can be reproduced and two models can be
  compared on exactly the same rows. Split sizes are allocated by largest remainder, so every class
  is within one row of its proportional share and the split totals are exact.
- `Standardizer` statistics come from the train split only (fitting on all rows would leak the
  evaluation rows into training). It serialises to JSON-safe lists, to be stored next to the model
  and re-applied at serving time. It can be disabled (identity) for inputs such as token ids.
- `prepare` checks the data against the model's `input_shape` and `output_classes` before any
  training starts, and returns float32 feature tensors (NxF; models reshape themselves) and int64
  label tensors for train, validation and test.
- Regression (`prepare(..., task="regression", outputs=K)`) takes a `RegressionTable`: float targets
  with one column per `data.target` column. NaN or infinite targets are refused naming the column
  and the row; the split is the same deterministic split over one group (not stratified); the
  targets are standardised per column with train statistics (`TargetStandardizer`, to be stored
  with the model and inverted on its predictions) and handed over as float32 [N, K].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from domain.errors import InvalidInputError
from domain.task import Task
from ml.readers import FORMATS, FloatArray, IndexArray, Table, load_table
from ml.standardizer import Standardizer, TargetStandardizer, fit_standardizer, fit_target_standardizer
from ml.training import TrainingData

__all__ = [
    "FORMATS",
    "PreparedData",
    "RegressionTable",
    "Splits",
    "Standardizer",
    "Table",
    "TargetStandardizer",
    "TensorSplit",
    "fit_standardizer",
    "fit_target_standardizer",
    "load_table",
    "prepare",
    "split",
]


# ---------------------------------------------------------------------------------------- splitting


@dataclass(frozen=True, eq=False)
class Splits:
    """Row indices (sorted int64, into the `Table`) of each split, and what produced them.

    Keeping the indices, not just the rows, makes a test split reproducible and lets two models be
    evaluated on exactly the same rows.
    """

    train: IndexArray
    validation: IndexArray
    test: IndexArray
    seed: int
    validation_fraction: float
    test_fraction: float

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.size), "validation": int(self.validation.size), "test": int(self.test.size)}


def split(table: Table | RegressionTable, validation_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Deterministic split into train / validation / test, stratified by class for a classification `Table`.

    Each split receives round(N x fraction) rows (at least one when its fraction is > 0), and each
    class contributes within one row of its proportional share. Every class keeps at least one row in
    train, so a class with too few rows stays entirely in train. Rows are drawn with a numpy
    Generator seeded with `seed`: the same table, fractions and seed give identical index sets.
    A `RegressionTable`'s rows form one group: a plain seeded split that keeps at least one train row.
    """
    stratified = isinstance(table, Table)
    _check_fraction("data.validation_fraction", validation_fraction, table.source)
    _check_fraction("data.test_fraction", test_fraction, table.source)
    if validation_fraction + test_fraction >= 1:
        raise InvalidInputError(
            f"data.validation_fraction ({validation_fraction}) + data.test_fraction ({test_fraction}) for "
            f"{table.source} must be < 1 so that rows are left for training; lower them"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise InvalidInputError(f"data.seed for {table.source} must be an integer (got {seed!r})")

    groups = table.labels if isinstance(table, Table) else np.zeros(table.num_rows, np.int64)
    classes, counts = np.unique(groups, return_counts=True)
    rows = int(counts.sum())
    want_test = _split_size(rows, test_fraction)
    want_validation = _split_size(rows, validation_fraction)
    # One row of every class stays in train, so only rows - classes can move to validation and test.
    if want_test + want_validation > rows - classes.size:
        needed = rows
        while _split_size(needed, test_fraction) + _split_size(needed, validation_fraction) > needed - classes.size:
            needed += 1
        grouping = f" in {classes.size} classes" if stratified else ""
        kept = "each class keeps a row in train" if stratified else "train keeps at least one row"
        raise InvalidInputError(
            f"data file {table.source} has {rows} rows{grouping}: too few for non-empty splits with "
            f"data.validation_fraction {validation_fraction} and data.test_fraction {test_fraction} ({kept}); "
            f"it needs at least {needed} rows: add data or lower the fractions"
        )

    counts64 = counts.astype(np.float64)
    test_per_class = _allocate(counts64 * test_fraction, want_test, caps=counts - 1)
    validation_per_class = _allocate(counts64 * validation_fraction, want_validation, caps=counts - 1 - test_per_class)

    rng = np.random.default_rng(seed)
    parts: dict[str, list[IndexArray]] = {"train": [], "validation": [], "test": []}
    for cls, n_test, n_val in zip(classes, test_per_class, validation_per_class, strict=True):
        members = rng.permutation(np.flatnonzero(groups == cls)).astype(np.int64)
        parts["test"].append(members[:n_test])
        parts["validation"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])

    def joined(name: str) -> IndexArray:
        return np.sort(np.concatenate(parts[name])).astype(np.int64)

    return Splits(
        train=joined("train"),
        validation=joined("validation"),
        test=joined("test"),
        seed=int(seed),
        validation_fraction=float(validation_fraction),
        test_fraction=float(test_fraction),
    )


def _check_fraction(key: str, value: float, source: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{key} for {source} must be a number in [0, 1) (got {value!r})")
    if not 0 <= value < 1:
        raise InvalidInputError(f"{key} for {source} must be in [0, 1) (got {value}); e.g. 0.15 holds out 15 % of rows")


def _split_size(rows: int, fraction: float) -> int:
    return max(1, round(rows * fraction)) if fraction > 0 else 0


def _allocate(quotas: npt.NDArray[np.float64], total: int, caps: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Splits `total` rows across classes by largest remainder of their `quotas`, never above `caps`.

    The caller guarantees caps.sum() >= total; the floors never exceed `total` because
    total >= round(quotas.sum()) >= floor(quotas.sum()).
    """
    given = np.minimum(np.floor(quotas).astype(np.int64), caps)
    # Stable sort: ties go to the lower class id, keeping the allocation independent of the seed.
    order = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
    remaining = total - int(given.sum())
    while remaining > 0:
        progressed = False
        for cls in order:
            if remaining == 0:
                break
            if given[cls] < caps[cls]:
                given[cls] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # the caller's capacity check makes this unreachable; never loop forever
            raise AssertionError("split allocation exceeded class capacity")
    return given


# ---------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True, eq=False)
class RegressionTable:
    """A regression dataset: `features` float32 NxF, `targets` float [N, outputs] named by `target_names`.

    `targets` may still hold NaN or inf (a reader or `data.loader` passes them on): `prepare` refuses
    them naming the column and the row. A 1-D `targets` is one column. `source` names the file.
    """

    features: FloatArray
    targets: npt.NDArray[Any]
    feature_names: list[str]
    target_names: list[str]
    source: str

    @property
    def num_rows(self) -> int:
        """Rows of features; `prepare` checks that the targets have as many."""
        return len(self.features)

    @property
    def num_features(self) -> int:
        """Columns of features (the model's flattened input size)."""
        return int(self.features.shape[1])


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split as tensors: `features` float32 NxF (standardised), `labels` the targets, `indices` into the table.

    `labels` are int64 class ids [N] for classification, standardised float32 targets [N, outputs]
    for regression (the table's `targets[indices]` are the same rows in the target's units).
    """

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    indices: IndexArray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Everything training and evaluation need, checked against the model's input shape and outputs.

    `num_classes` is 0 for regression; `outputs` is the model's output width for either task.
    `target_standardizer` (regression only) goes into the model's manifest next to `standardizer`.
    """

    train: TensorSplit
    validation: TensorSplit
    test: TensorSplit
    standardizer: Standardizer
    splits: Splits
    feature_names: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    source: str
    task: Task = "classification"
    outputs: int = 0
    target_names: list[str] = field(default_factory=list)
    target_standardizer: TargetStandardizer | None = None

    def training_data(self) -> TrainingData:
        """The train and validation splits as `ml.training.train` takes them."""
        return TrainingData(
            self.train.features,
            self.train.labels,
            self.validation.features,
            self.validation.labels,
            target_standardizer=self.target_standardizer,
        )


def prepare(
    table: Table | RegressionTable,
    *,
    input_shape: Sequence[int],
    output_classes: int | None = None,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    standardize: bool = True,
    task: Task = "classification",
    outputs: int | None = None,
    standardize_targets: bool = True,
) -> PreparedData:
    """Checks `table` against the model spec, splits it, standardises with train statistics, builds tensors.

    `standardize=False` (e.g. token ids for a transformer) keeps the values as they are.
    Classification takes a `Table` and `output_classes`; regression (`task="regression"`) takes a
    `RegressionTable` and `outputs` (the model's output width: one per target column; None takes
    the table's column count), and `standardize_targets=False` trains on the raw targets.
    """
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d <= 0 for d in shape):
        raise InvalidInputError(f"model.input_shape {list(shape)} must be a non-empty list of positive integers")
    needed = math.prod(int(d) for d in shape)
    if table.num_features != needed:
        raise InvalidInputError(
            f"data file {table.source} has {table.num_features} features per row but model.input_shape "
            f"{[int(d) for d in shape]} needs {needed}; fix model.input_shape or the data's columns"
        )
    if task == "regression":
        if not isinstance(table, RegressionTable):
            raise InvalidInputError(
                f"data file {table.source} was read as class ids (target {table.target!r}) but the task is regression; "
                "read float targets into a RegressionTable"
            )
        targets: npt.NDArray[Any] = _regression_targets(table, outputs)
        width, target_names = int(targets.shape[1]), list(table.target_names)
    else:
        if not isinstance(table, Table):
            raise InvalidInputError(
                f"data file {table.source} holds float targets {table.target_names} but the task is {task!r}; "
                "set the task to regression, or read class ids into a Table for classification"
            )
        targets = _class_ids(table, output_classes)
        width, target_names = int(output_classes or 0), [table.target]

    splits = split(table, validation_fraction, test_fraction, seed)
    standardizer = fit_standardizer(table.features[splits.train], enabled=standardize)
    target_standardizer = (
        fit_target_standardizer(targets[splits.train], enabled=standardize_targets) if task == "regression" else None
    )

    def tensors(name: str, indices: IndexArray) -> TensorSplit:
        features = standardizer.transform(table.features[indices])
        labels = targets[indices] if target_standardizer is None else target_standardizer.transform(targets[indices])
        return TensorSplit(
            name=name,
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
            indices=indices,
        )

    return PreparedData(
        train=tensors("train", splits.train),
        validation=tensors("validation", splits.validation),
        test=tensors("test", splits.test),
        standardizer=standardizer,
        splits=splits,
        feature_names=list(table.feature_names),
        num_classes=0 if task == "regression" else width,
        input_shape=tuple(int(d) for d in shape),
        source=table.source,
        task=task,
        outputs=width,
        target_names=target_names,
        target_standardizer=target_standardizer,
    )


def _class_ids(table: Table, output_classes: int | None) -> npt.NDArray[np.int64]:
    if isinstance(output_classes, bool) or not isinstance(output_classes, int | np.integer) or output_classes < 2:
        raise InvalidInputError(f"model.output_classes must be an integer >= 2 (got {output_classes!r})")
    largest = int(table.labels.max())
    if largest >= output_classes:
        raise InvalidInputError(
            f"data file {table.source}: target {table.target!r} has class id {largest} but model.output_classes is "
            f"{output_classes} (ids 0..{output_classes - 1}); set model.output_classes to at least {largest + 1} "
            "or fix the labels"
        )
    return table.labels.astype(np.int64)


def _regression_targets(table: RegressionTable, outputs: int | None) -> npt.NDArray[np.float32]:
    """The targets as float32 [N, outputs], refusing a shape, a count or a value the model cannot train on."""
    raw = np.asarray(table.targets)
    values = raw.reshape(-1, 1) if raw.ndim == 1 else raw
    names = list(table.target_names)
    if values.ndim != 2 or values.shape[0] != table.num_rows or values.shape[1] != len(names):
        raise InvalidInputError(
            f"data file {table.source}: targets have shape {list(raw.shape)} but {table.num_rows} rows and "
            f"{len(names)} target column(s) {names} need [{table.num_rows}, {len(names)}]; return one column per "
            "data.target entry"
        )
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise InvalidInputError(
            f"data file {table.source}: targets {names} have dtype {values.dtype}; regression targets must be numbers"
        )
    wanted = len(names) if outputs is None else outputs
    if isinstance(wanted, bool) or not isinstance(wanted, int | np.integer) or wanted < 1:
        raise InvalidInputError(f"model.outputs must be an integer >= 1 (got {outputs!r})")
    if wanted != len(names):
        raise InvalidInputError(
            f"model.outputs is {wanted} but data.target lists {len(names)} column(s) {names} in {table.source}; "
            f"set model.outputs to {len(names)} or change data.target"
        )
    as64 = values.astype(np.float64)
    finite = np.isfinite(as64)
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        bad = int((~finite[:, column]).sum())
        raise InvalidInputError(
            f"data file {table.source}: target column {names[column]!r} holds {as64[row, column]} at row {row} "
            f"(0-based; {bad} non-finite value(s) in that column); drop or fill those rows before training"
        )
    if np.abs(as64).max(initial=0.0) > np.finfo(np.float32).max:
        raise InvalidInputError(
            f"data file {table.source}: target columns {names} hold values beyond float32's range; rescale them"
        )
    return as64.astype(np.float32)
