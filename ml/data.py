"""What a pipeline trains and evaluates on: load a table, split it, standardise it, hand over tensors.

The flow is `load_table` → `split` → `fit_standardizer` → tensors, and `prepare` runs it for a spec:

- `load_table` reads CSV (stdlib `csv` + numpy, no pandas), Parquet (pyarrow, imported lazily because
  it is only needed for that format) or NPZ into a `Table`: float32 features NxF and int64 class ids.
  It is strict on purpose. A non-numeric cell, an empty cell, a NaN or a label that is not an integer
  class id is refused with an `InvalidInputError` that names the file, the column (or npz key), the
  row and the fix. Coercing them silently would train a model on data nobody looked at.
- Labels must already be class ids 0..K-1: the spec declares `model.output_classes`, so we refuse to
  invent a mapping from strings or arbitrary numbers (integral floats and strings such as "3.0" are
  accepted as the integers they spell).
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

import csv
import difflib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from domain.errors import InvalidInputError

FORMATS = ("csv", "parquet", "npz")
# Accepted npz key names, in order of preference.
NPZ_FEATURE_KEYS = ("features", "x", "X")
NPZ_LABEL_KEYS = ("labels", "y")

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]

# Describes row i for an error message ("line 7" for CSV, "row 6 (0-based)" otherwise).
_RowLocator = Callable[[int], str]


# ---------------------------------------------------------------------------------------- loading


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


def load_table(path: Path, fmt: str, target: str) -> Table:
    """Reads a dataset file into a `Table`, refusing anything that would train on unchecked data.

    - `csv`: a header row is required; `target` names the label column; every other column is a
      feature and must hold numbers in every row (comma-separated, UTF-8).
    - `parquet`: the same rules; feature columns must have an integer, floating-point, boolean or
      decimal type and no nulls. Needs pyarrow.
    - `npz`: arrays `features` (or `x` / `X`) and `labels` (or `y`). `target` is ignored for npz:
      the label array is found by those key names. Features may have any shape N x ... (e.g. images
      N x 1 x 8 x 8) and are flattened to NxF; they are named `f0`, `f1`, ...

    Raises `InvalidInputError` (naming the file, the column or key, and the fix) for a missing file,
    an unknown format, no rows, a missing target column, non-numeric or empty cells, NaN/inf
    features, labels that are not non-negative integer class ids, and data with a single class.
    """
    path = Path(path)
    kind = fmt.strip().lower()
    if kind not in FORMATS:
        raise InvalidInputError(
            f"data.format {fmt!r} for {path} is not supported; use one of {', '.join(FORMATS)}"
            + _did_you_mean(kind, FORMATS)
        )
    if not path.exists():
        raise InvalidInputError(f"data file {path} does not exist; fix the data path in the pipeline spec")
    if not path.is_file():
        raise InvalidInputError(f"data file {path} is not a regular file (a directory?); point the spec at a file")
    if kind == "csv":
        return _load_csv(path, target)
    if kind == "parquet":
        return _load_parquet(path, target)
    return _load_npz(path)


def _load_csv(path: Path, target: str) -> Table:
    source = str(path)
    try:
        # utf-8-sig: spreadsheets often prepend a BOM, which would otherwise end up in the first column name.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row:  # blank line (often a trailing one)
                    continue
                if header is not None and len(row) != len(header):
                    raise InvalidInputError(
                        f"data file {source}: line {reader.line_num} has {len(row)} values but the header has "
                        f"{len(header)} columns; every row needs one value per column"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"data file {source} is not UTF-8 text ({exc.reason}); save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise InvalidInputError(f"data file {source} is not valid CSV ({exc}); fix the file") from exc

    if header is None or not any(name.strip() for name in header):
        raise InvalidInputError(f"data file {source} is empty; it needs a header row naming the columns, then data")
    names = [name.strip() for name in header]
    _check_column_names(source, names)
    target_index = _target_index(source, names, target)
    if not rows:
        raise InvalidInputError(f"data file {source} has a header but no data rows; an empty dataset cannot be trained")
    feature_indices = [i for i in range(len(names)) if i != target_index]
    if not feature_indices:
        raise InvalidInputError(
            f"data file {source} has no feature columns besides the target column {target!r}; add feature columns"
        )

    def where(i: int) -> str:
        return f"line {lines[i]}"

    columns = list(zip(*rows, strict=True))
    features = np.empty((len(rows), len(feature_indices)), dtype=np.float64)
    for out, index in enumerate(feature_indices):
        features[:, out] = _parse_numbers(columns[index], source, names[index], where, role="feature")
    raw_labels = _parse_numbers(columns[target_index], source, names[target_index], where, role="label")
    feature_names = [names[i] for i in feature_indices]
    return _finish(source, features, raw_labels, feature_names, names[target_index], where)


def _parse_numbers(
    cells: Sequence[str], source: str, column: str, where: _RowLocator, *, role: str
) -> npt.NDArray[np.float64]:
    """Converts one CSV column to float64, naming the first empty or non-numeric cell on failure."""
    try:
        # Fast path: numpy parses the whole column at once; it raises on the first bad cell without saying where.
        return np.array(cells, dtype=np.float64)
    except ValueError:
        pass
    values = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        if not cell.strip():
            raise InvalidInputError(
                f"data file {source}: column {column!r} is empty at {where(i)}; fill the cell or drop the row "
                "(empty values are not treated as NaN)"
            )
        try:
            values[i] = float(cell)
        except ValueError:
            if role == "label":
                raise InvalidInputError(
                    f"data file {source}: label column {column!r} holds {cell!r} at {where(i)}; labels must be "
                    "integer class ids 0..K-1 (K = model.output_classes); map class names to ids before training"
                ) from None
            raise InvalidInputError(
                f"data file {source}: column {column!r} holds the non-numeric value {cell!r} at {where(i)}; every "
                "column except the target must be numeric: encode it as numbers or drop the column"
            ) from None
    return values


def _load_parquet(path: Path, target: str) -> Table:
    source = str(path)
    try:
        # Untyped and optional: imported by name so that only Parquet users need pyarrow installed.
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
        pat = importlib.import_module("pyarrow.types")
    except ImportError as exc:
        raise InvalidInputError(
            f"data file {source}: reading Parquet needs pyarrow, which is not installed; `pip install pyarrow` "
            "or use data.format csv/npz"
        ) from exc
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(
            f"data file {source} is not a readable Parquet file ({exc}); fix or re-export it"
        ) from exc

    names = [str(name) for name in table.column_names]
    _check_column_names(source, names)
    target_index = _target_index(source, names, target)
    if table.num_rows == 0:
        raise InvalidInputError(f"data file {source} has no rows; an empty dataset cannot be trained")
    feature_indices = [i for i in range(len(names)) if i != target_index]
    if not feature_indices:
        raise InvalidInputError(
            f"data file {source} has no feature columns besides the target column {target!r}; add feature columns"
        )

    def where(i: int) -> str:
        return f"row {i} (0-based)"

    def numeric(index: int, *, role: str) -> npt.NDArray[np.float64]:
        column, name = table.column(index), names[index]
        kind = column.type
        if not (pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind) or pat.is_decimal(kind)):
            if role == "label" and (pat.is_string(kind) or pat.is_large_string(kind)):
                return _parse_numbers(
                    [str(value) if value is not None else "" for value in column.to_pylist()],
                    source,
                    name,
                    where,
                    role="label",
                )
            fix = (
                "labels must be integer class ids 0..K-1"
                if role == "label"
                else "every column except the target must be numeric: encode it as numbers or drop the column"
            )
            raise InvalidInputError(f"data file {source}: column {name!r} has the non-numeric type {kind}; {fix}")
        if column.null_count:
            first = int(np.argmax(np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)))
            raise InvalidInputError(
                f"data file {source}: column {name!r} has {column.null_count} empty (null) values, the first at "
                f"{where(first)}; fill them or drop those rows (empty values are not treated as NaN)"
            )
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64)

    features = np.empty((table.num_rows, len(feature_indices)), dtype=np.float64)
    for out, index in enumerate(feature_indices):
        features[:, out] = numeric(index, role="feature")
    raw_labels = numeric(target_index, role="label")
    feature_names = [names[i] for i in feature_indices]
    return _finish(source, features, raw_labels, feature_names, names[target_index], where)


def _load_npz(path: Path) -> Table:
    source = str(path)
    try:
        # allow_pickle=False: an npz from outside must never be able to run code when loaded.
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError: all mean "not an npz we can read"
        raise InvalidInputError(
            f"data file {source} is not a readable .npz archive ({exc}); save it with np.savez"
        ) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InvalidInputError(
            f"data file {source} holds a single .npy array, not an .npz archive; save features and labels together "
            "with np.savez(path, features=..., labels=...)"
        )
    with loaded as archive:
        keys = list(archive.files)
        feature_key = _npz_key(source, keys, NPZ_FEATURE_KEYS, "features")
        label_key = _npz_key(source, keys, NPZ_LABEL_KEYS, "labels")
        try:
            features_raw = archive[feature_key]
            labels_raw = archive[label_key]
        except ValueError as exc:
            raise InvalidInputError(
                f"data file {source}: key {feature_key!r} or {label_key!r} is an object array that needs pickle to "
                f"load ({exc}); save plain numeric arrays"
            ) from exc

    def where(i: int) -> str:
        return f"row {i} (0-based)"

    if features_raw.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has dtype {features_raw.dtype}; features must be numeric "
            "(bool, integer or float)"
        )
    if features_raw.ndim == 0:
        raise InvalidInputError(f"data file {source}: key {feature_key!r} is a scalar; it must be an array of rows")
    rows = features_raw.shape[0]
    if labels_raw.ndim == 2 and labels_raw.shape[1] == 1:
        labels_raw = labels_raw[:, 0]
    if labels_raw.ndim != 1:
        raise InvalidInputError(
            f"data file {source}: key {label_key!r} has shape {list(labels_raw.shape)}; labels must be one class id "
            "per row (shape [N])"
        )
    if labels_raw.shape[0] != rows:
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has {rows} rows but key {label_key!r} has "
            f"{labels_raw.shape[0]}; they need one label per row"
        )
    if rows == 0:
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has no rows; an empty dataset cannot be trained"
        )
    features = features_raw.reshape(rows, -1).astype(np.float64)
    if features.shape[1] == 0:
        raise InvalidInputError(f"data file {source}: key {feature_key!r} has zero features per row")
    if labels_raw.dtype.kind in "biuf":
        raw_labels = labels_raw.astype(np.float64)
    elif labels_raw.dtype.kind == "U":
        raw_labels = _parse_numbers([str(v) for v in labels_raw], source, label_key, where, role="label")
    else:
        raise InvalidInputError(
            f"data file {source}: key {label_key!r} has dtype {labels_raw.dtype}; labels must be integer class ids "
            "0..K-1"
        )
    feature_names = [f"f{i}" for i in range(features.shape[1])]
    return _finish(source, features, raw_labels, feature_names, label_key, where)


def _npz_key(source: str, keys: list[str], accepted: tuple[str, ...], role: str) -> str:
    found = [key for key in accepted if key in keys]
    if len(found) > 1:
        raise InvalidInputError(
            f"data file {source} has both {found[0]!r} and {found[1]!r} arrays for the {role}; keep only one"
        )
    if not found:
        names = " / ".join(repr(key) for key in accepted)
        raise InvalidInputError(
            f"data file {source} has no {role} array: expected key {names}; keys present: {keys or 'none'}"
            + _did_you_mean(accepted[0], keys)
        )
    return found[0]


def _check_column_names(source: str, names: list[str]) -> None:
    seen: set[str] = set()
    for position, name in enumerate(names):
        if not name:
            raise InvalidInputError(f"data file {source}: header column {position + 1} has no name; name every column")
        if name in seen:
            raise InvalidInputError(f"data file {source}: column {name!r} appears twice in the header; rename one")
        seen.add(name)


def _target_index(source: str, names: list[str], target: str) -> int:
    if target in names:
        return names.index(target)
    raise InvalidInputError(
        f"data file {source} has no target column {target!r} (data.target); columns present: {', '.join(names)}"
        + _did_you_mean(target, names)
    )


def _did_you_mean(wanted: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(wanted, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _finish(
    source: str,
    features64: npt.NDArray[np.float64],
    raw_labels: npt.NDArray[np.float64],
    feature_names: list[str],
    target: str,
    where: _RowLocator,
) -> Table:
    """The checks every format shares: finite features (after the float32 cast) and integer class ids."""
    # Cast first: a finite float64 beyond float32's range becomes inf and must be caught too.
    with np.errstate(over="ignore"):
        features = features64.astype(np.float32)
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"data file {source}: column {feature_names[col]!r} holds {features64[row, col]!r} at {where(row)}; "
            "features must be finite numbers (no NaN or inf; |x| < 3.4e38): impute or drop those rows"
        )
    labels = _class_ids(source, raw_labels, target, where)
    present = np.unique(labels)
    if present.size < 2:
        raise InvalidInputError(
            f"data file {source}: target {target!r} has a single class ({int(present[0])}) in all {labels.size} rows; "
            "training a classifier needs at least 2 classes"
        )
    return Table(features=features, labels=labels, feature_names=feature_names, source=source, target=target)


def _class_ids(source: str, values: npt.NDArray[np.float64], target: str, where: _RowLocator) -> IndexArray:
    fix = "labels must be integer class ids 0..K-1 (K = model.output_classes); map them before training"
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
                f"data file {source}: label {values[row]!r} in {target!r} at {where(row)} {problem}; {fix}"
            )
    return values.astype(np.int64)


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


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-feature (x - mean) / std with statistics from the train split; identity when disabled.

    A disabled standardizer keeps mean 0 and std 1 for every feature, so that it still checks the
    feature count and serialises like an enabled one.
    """

    mean: FloatArray
    std: FloatArray
    enabled: bool = True

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def transform(self, features: npt.NDArray[Any]) -> FloatArray:
        """Standardises an NxF array (float32 out); the identity (as float32) when disabled."""
        x = np.asarray(features, dtype=np.float32)
        self._check_width(int(x.shape[-1]) if x.ndim else 0)
        if not self.enabled:
            return x
        return ((x - self.mean) / self.std).astype(np.float32)

    def transform_tensor(self, features: torch.Tensor) -> torch.Tensor:
        """The same transform for a torch tensor (as serving receives), float32 out."""
        x = features.to(torch.float32)
        self._check_width(int(x.shape[-1]) if x.dim() else 0)
        if not self.enabled:
            return x
        mean = torch.from_numpy(self.mean).to(x.device)
        std = torch.from_numpy(self.std).to(x.device)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, to be saved next to the model: {"enabled": bool, "mean": [...], "std": [...]}."""
        return {
            "enabled": self.enabled,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "standardizer") -> Standardizer:
        """Rebuilds a standardizer from `to_dict` output; `source` (e.g. the artifact key) names errors."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"{source}: a standardizer must be a JSON object with keys enabled, mean, std")
        missing = [key for key in ("enabled", "mean", "std") if key not in data]
        if missing:
            raise InvalidInputError(
                f"{source}: standardizer is missing key(s) {', '.join(missing)}; save it with Standardizer.to_dict()"
            )
        enabled = data["enabled"]
        if not isinstance(enabled, bool):
            raise InvalidInputError(f"{source}: standardizer key 'enabled' must be true or false (got {enabled!r})")
        arrays: dict[str, FloatArray] = {}
        for key in ("mean", "std"):
            values = data[key]
            if not isinstance(values, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                raise InvalidInputError(f"{source}: standardizer key {key!r} must be a list of numbers")
            array = np.asarray(values, dtype=np.float32).reshape(-1)
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{source}: standardizer key {key!r} holds NaN or inf; refit it")
            arrays[key] = array
        if arrays["mean"].shape != arrays["std"].shape:
            raise InvalidInputError(
                f"{source}: standardizer keys 'mean' ({arrays['mean'].size} values) and 'std' "
                f"({arrays['std'].size}) must have the same length"
            )
        if (arrays["std"] <= 0).any():
            raise InvalidInputError(f"{source}: standardizer key 'std' holds a value <= 0; refit it")
        return cls(mean=arrays["mean"], std=arrays["std"], enabled=enabled)

    def _check_width(self, width: int) -> None:
        if width != self.num_features:
            raise InvalidInputError(
                f"input has {width} features per row but the standardizer was fitted on {self.num_features}; "
                "send rows shaped like the training data"
            )


def fit_standardizer(train_features: npt.NDArray[Any], enabled: bool = True) -> Standardizer:
    """Fits mean/std on the train rows only; `enabled=False` gives the identity (mean 0, std 1).

    A constant feature (std 0) gets std 1, so it is centred rather than divided by zero.
    """
    x = np.asarray(train_features)
    if x.ndim != 2:
        raise InvalidInputError(f"train features must be NxF to fit a standardizer (got shape {list(x.shape)})")
    width = int(x.shape[1])
    if not enabled:
        return Standardizer(np.zeros(width, np.float32), np.ones(width, np.float32), enabled=False)
    if x.shape[0] == 0:
        raise InvalidInputError("cannot fit a standardizer on an empty train split; the dataset needs more rows")
    # float64 accumulation: float32 sums over many rows lose precision in the mean and variance.
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    std[std <= 1e-12] = 1.0
    return Standardizer(mean.astype(np.float32), std.astype(np.float32), enabled=True)


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
