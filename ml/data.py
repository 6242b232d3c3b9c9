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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from domain.errors import InvalidInputError
from ml.readers import FORMATS, IndexArray, Table, load_table
from ml.standardizer import Standardizer, fit_standardizer

__all__ = [
    "FORMATS",
    "PreparedData",
    "Splits",
    "Standardizer",
    "Table",
    "TensorSplit",
    "fit_standardizer",
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


def split(table: Table, validation_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Deterministic stratified split into train / validation / test.

    Each split receives round(N x fraction) rows (at least one when its fraction is > 0), and each
    class contributes within one row of its proportional share. Every class keeps at least one row in
    train, so a class with too few rows stays entirely in train. Rows are drawn with a numpy
    Generator seeded with `seed`: the same table, fractions and seed give identical index sets.
    """
    _check_fraction("data.validation_fraction", validation_fraction, table.source)
    _check_fraction("data.test_fraction", test_fraction, table.source)
    if validation_fraction + test_fraction >= 1:
        raise InvalidInputError(
            f"data.validation_fraction ({validation_fraction}) + data.test_fraction ({test_fraction}) for "
            f"{table.source} must be < 1 so that rows are left for training; lower them"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise InvalidInputError(f"data.seed for {table.source} must be an integer (got {seed!r})")

    classes, counts = np.unique(table.labels, return_counts=True)
    rows = int(counts.sum())
    want_test = _split_size(rows, test_fraction)
    want_validation = _split_size(rows, validation_fraction)
    # One row of every class stays in train, so only rows - classes can move to validation and test.
    if want_test + want_validation > rows - classes.size:
        needed = rows
        while _split_size(needed, test_fraction) + _split_size(needed, validation_fraction) > needed - classes.size:
            needed += 1
        raise InvalidInputError(
            f"data file {table.source} has {rows} rows in {classes.size} classes: too few for non-empty splits with "
            f"data.validation_fraction {validation_fraction} and data.test_fraction {test_fraction} (each class keeps "
            f"a row in train); it needs at least {needed} rows: add data or lower the fractions"
        )

    counts64 = counts.astype(np.float64)
    test_per_class = _allocate(counts64 * test_fraction, want_test, caps=counts - 1)
    validation_per_class = _allocate(counts64 * validation_fraction, want_validation, caps=counts - 1 - test_per_class)

    rng = np.random.default_rng(seed)
    parts: dict[str, list[IndexArray]] = {"train": [], "validation": [], "test": []}
    for cls, n_test, n_val in zip(classes, test_per_class, validation_per_class, strict=True):
        members = rng.permutation(np.flatnonzero(table.labels == cls)).astype(np.int64)
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


# ---------------------------------------------------------------------------------------- standardisation


# ---------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split as tensors: `features` float32 NxF (standardised), `labels` int64 N, `indices` into the Table."""

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    indices: IndexArray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Everything training and evaluation need, checked against the model's input shape and classes."""

    train: TensorSplit
    validation: TensorSplit
    test: TensorSplit
    standardizer: Standardizer
    splits: Splits
    feature_names: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    source: str


def prepare(
    table: Table,
    *,
    input_shape: Sequence[int],
    output_classes: int,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    standardize: bool = True,
) -> PreparedData:
    """Checks `table` against the model spec, splits it, standardises with train statistics, builds tensors.

    `standardize=False` (e.g. token ids for a transformer) keeps the values as they are.
    """
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d <= 0 for d in shape):
        raise InvalidInputError(f"model.input_shape {list(shape)} must be a non-empty list of positive integers")
    if isinstance(output_classes, bool) or not isinstance(output_classes, int | np.integer) or output_classes < 2:
        raise InvalidInputError(f"model.output_classes must be an integer >= 2 (got {output_classes!r})")
    needed = math.prod(int(d) for d in shape)
    if table.num_features != needed:
        raise InvalidInputError(
            f"data file {table.source} has {table.num_features} features per row but model.input_shape "
            f"{[int(d) for d in shape]} needs {needed}; fix model.input_shape or the data's columns"
        )
    largest = int(table.labels.max())
    if largest >= output_classes:
        raise InvalidInputError(
            f"data file {table.source}: target {table.target!r} has class id {largest} but model.output_classes is "
            f"{output_classes} (ids 0..{output_classes - 1}); set model.output_classes to at least {largest + 1} "
            "or fix the labels"
        )

    splits = split(table, validation_fraction, test_fraction, seed)
    standardizer = fit_standardizer(table.features[splits.train], enabled=standardize)

    def tensors(name: str, indices: IndexArray) -> TensorSplit:
        features = standardizer.transform(table.features[indices])
        return TensorSplit(
            name=name,
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            labels=torch.from_numpy(table.labels[indices].astype(np.int64)),
            indices=indices,
        )

    return PreparedData(
        train=tensors("train", splits.train),
        validation=tensors("validation", splits.validation),
        test=tensors("test", splits.test),
        standardizer=standardizer,
        splits=splits,
        feature_names=list(table.feature_names),
        num_classes=int(output_classes),
        input_shape=tuple(int(d) for d in shape),
        source=table.source,
    )
