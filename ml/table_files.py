"""CSV and Parquet (a file, or a folder of Parquet files) read into columns of numbers, checked.

The part of reading that does not depend on the task: `read_columns` finds the file or folder,
reads it with pyarrow and returns the feature columns and the target column(s) as float64, with a
`RowLocator` that names a row in later messages. `ml/readers.py` turns that into class ids (a
`Table`), `ml/regression_readers.py` into float targets (a `RegressionTable`); each reads NPZ itself.

CSV is read by `pyarrow.csv` with every used column typed float64 up front (so `true`, `abc` or a
date is a conversion error, never an inferred column type). When that read fails, the file is read
again as text to find the cell or row to name (the error path only); CSV rows are named by their
line in the file, Parquet rows by their 0-based index (and file, in a folder).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.types as pat

from domain.errors import InvalidInputError

FORMATS = ("csv", "parquet", "npz")
# Accepted npz key names for the features, in order of preference.
NPZ_FEATURE_KEYS = ("features", "x", "X")
LABEL_FIX = "labels must be integer class ids 0..K-1 (K = model.output_classes)"
# What a column is for: the message for a bad value says what that column must hold.
Role = Literal["feature", "label", "target"]
FIXES: dict[Role, str] = {
    "feature": "every column except the target must be numeric: encode it as numbers or drop the column",
    "label": LABEL_FIX,
    "target": "regression targets (data.target) must be numbers: fix or drop those rows",
}

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

# Describes row i for an error message ("line 7" for CSV, "row 6 (0-based)" otherwise).
RowLocator = Callable[[int], str]


@dataclass(frozen=True, eq=False)
class Columns:
    """What `read_columns` read: float64 features (NxF) and one float64 array per target, by name."""

    source: str
    features: Float64Array
    feature_names: list[str]
    targets: list[Float64Array]
    target_names: list[str]
    where: RowLocator


def read_columns(
    path: Path, fmt: str, targets: Sequence[str], columns: Sequence[str] | None, *, role: Role
) -> Columns | None:
    """Reads a CSV or Parquet file or a folder of Parquet files; None for an npz file (its caller reads it).

    `targets` are the target column names (data.target) and `role` what they hold ("label": class
    ids, "target": regression values); `columns` (data.columns) names the features in the order the
    model sees them, by default every column but the targets. Columns left out may hold anything.
    Raises `InvalidInputError` naming the file, the column and the fix for an unknown format, a
    missing file, a folder that is not Parquet, is empty or mixes schemas, no rows, a missing target
    or selected column, and a non-numeric or empty cell.
    """
    kind = fmt.strip().lower()
    if kind not in FORMATS:
        raise InvalidInputError(
            f"data.format {fmt!r} for {path} is not supported; use one of {', '.join(FORMATS)}"
            + did_you_mean(kind, FORMATS)
        )
    if not path.exists():
        raise InvalidInputError(f"data file {path} does not exist; fix the data path in the pipeline spec")
    if path.is_dir():
        if kind != "parquet":
            raise InvalidInputError(
                f"data folder {path}: a folder is read as Parquet files, but data.format is {fmt!r}; set "
                "data.format: parquet (or point the event's data.uri at one file)"
            )
        table, where = read_parquet_folder(path)
        return _from_arrow(table, str(path), targets, where, columns, role)
    if not path.is_file():
        raise InvalidInputError(f"data file {path} is not a regular file; point the spec at a file or a folder")
    if kind == "csv":
        return _from_arrow(read_csv(path, targets, columns, role), str(path), targets, _CsvLines(path), columns, role)
    if kind == "parquet":
        return _from_arrow(read_parquet(path), str(path), targets, index_row, columns, role)
    if columns is not None:
        raise InvalidInputError(
            f"data file {path}: data.columns selects named columns, but npz arrays have none; remove data.columns"
        )
    return None


def index_row(i: int) -> str:
    return f"row {i} (0-based)"


# ---------------------------------------------------------------------------------------- CSV


def read_csv(path: Path, targets: Sequence[str], columns: Sequence[str] | None, role: Role) -> Any:
    names = _csv_header(path)
    wanted = names
    if columns is not None:
        # Only the targets and the selected columns are typed as numbers: the others may hold text.
        stripped = [name.strip() for name in names]
        check_column_names(str(path), stripped)
        for target in targets:
            target_position(str(path), stripped, target)
        feature_positions(str(path), stripped, targets, columns)
        keep = {*columns, *targets}
        wanted = [name for name in names if name.strip() in keep]
    convert = pacsv.ConvertOptions(
        column_types=dict.fromkeys(wanted, pa.float64()), include_columns=wanted, null_values=[""]
    )
    try:
        return pacsv.read_csv(path, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise _csv_problem(path, names, (targets, role), set(wanted)) or InvalidInputError(
            f"data file {path} is not valid CSV ({exc}); fix the file"
        ) from exc


def _csv_header(path: Path) -> list[str]:
    # Only the names are wanted here: a bad row is reported by the full read, with its line.
    skip_bad_rows = pacsv.ParseOptions(invalid_row_handler=lambda _row: "skip")
    try:
        with pacsv.open_csv(path, parse_options=skip_bad_rows) as reader:
            return [str(name) for name in reader.schema.names]
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"data file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8 CSV") from exc
    except pa.ArrowInvalid as exc:
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        if not lines:
            raise InvalidInputError(
                f"data file {path} is empty; it needs a header row naming the columns, then data"
            ) from exc
        if len(lines) == 1:
            raise InvalidInputError(
                f"data file {path} has a header but no data rows; an empty dataset cannot be trained"
            ) from exc
        raise InvalidInputError(f"data file {path} is not valid CSV ({exc}); fix the file") from exc


class _CsvLines:
    """Row i's line in the file, counted only when an error message needs one.

    pyarrow skips empty lines and (with newlines_in_values off, its default) reads one record per
    line, so the records are exactly the non-empty lines, the first being the header.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: list[int] | None = None

    def record(self, number: int) -> int:
        """The line of the `number`-th record (1-based, the header being record 1)."""
        if self._lines is None:
            self._lines = [n for n, text in enumerate(self.path.read_bytes().splitlines(), start=1) if text]
        return self._lines[number - 1] if 0 < number <= len(self._lines) else number

    def __call__(self, i: int) -> str:
        return f"line {self.record(i + 2)}"


def _csv_problem(
    path: Path, names: list[str], targets: tuple[Sequence[str], Role], wanted: set[str]
) -> InvalidInputError | None:
    """Why the typed read failed: a ragged row, a cell that is not UTF-8 or not a number (with its line)."""
    source, lines = str(path), _CsvLines(path)
    target_names, target_role = targets
    ragged: list[Any] = []

    def first_ragged_row(row: Any) -> str:
        ragged.append(row)
        return "error"

    as_text = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary()))
    parse = pacsv.ParseOptions(invalid_row_handler=first_ragged_row)
    single_threaded = pacsv.ReadOptions(use_threads=False)  # only then does pyarrow number the rows it reports
    try:
        table = pacsv.read_csv(path, read_options=single_threaded, parse_options=parse, convert_options=as_text)
    except pa.ArrowInvalid:
        if not ragged:
            return None
        row = ragged[0]
        return InvalidInputError(
            f"data file {source}: line {lines.record(row.number)} has {row.actual_columns} values but the header has "
            f"{row.expected_columns} columns; every row needs one value per column"
        )
    for index, name in enumerate(names):
        if name not in wanted:
            continue
        column = table.column(index)
        try:
            text = column.cast(pa.string())
        except pa.ArrowInvalid:
            row = _first_failure(column, pa.string())
            return InvalidInputError(
                f"data file {source}: column {name.strip()!r} is not UTF-8 text at {lines(row)}; save the file as "
                "UTF-8 CSV"
            )
        try:
            numbers(text, source, name.strip(), lines, role=target_role if name.strip() in target_names else "feature")
        except InvalidInputError as problem:
            return problem
    return None


def numbers(
    column: Any,
    source: str,
    name: str,
    where: RowLocator,
    *,
    role: Role,
    allow_empty: bool = True,
    subject: str | None = None,
) -> Float64Array:
    """A text column as float64 (surrounding spaces ignored), naming the first cell that is not a number.

    `role` words the message (class ids for "label", regression targets for "target"); empty cells
    become NaN unless `allow_empty` is False (the callers' own checks then name them as empty, not as NaN).
    `subject` starts each message (default `data file SOURCE`; a loader names itself and its shapes).
    """
    subject = subject or f"data file {source}"
    trimmed = pc.utf8_trim_whitespace(column)
    empty = pc.fill_null(pc.equal(trimmed, ""), True)
    if pc.any(empty).as_py():
        first = int(pc.index(empty, True).as_py())
        if not allow_empty:
            raise InvalidInputError(
                f"{subject}: column {name!r} is empty at {where(first)}; fill the cell or drop the row "
                "(empty values are not treated as NaN)"
            )
        trimmed = pc.if_else(empty, pa.scalar(None, pa.string()), trimmed)
    try:
        return np.asarray(trimmed.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowInvalid:
        row = _first_failure(trimmed, pa.float64())
    cell = column[row].as_py()
    if role == "label":
        raise InvalidInputError(
            f"{subject}: label column {name!r} holds {cell!r} at {where(row)}; {LABEL_FIX}; map class "
            "names to ids before training"
        ) from None
    kind = "target column" if role == "target" else "column"
    raise InvalidInputError(
        f"{subject}: {kind} {name!r} holds the non-numeric value {cell!r} at {where(row)}; {FIXES[role]}"
    ) from None


def array_numbers(
    values: npt.NDArray[Any], subject: str, name: str, where: RowLocator, *, role: Role
) -> Float64Array | None:
    """Numeric or text values (a loader's or an npz's) as float64, text spelling numbers; None for other dtypes.

    `subject` starts a message (`data file PATH`, or the loader and its shapes).
    """
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    if values.dtype.kind == "U":
        texts = pa.array([str(value) for value in values.ravel()], pa.string())
        width = max(1, int(np.prod(values.shape[1:])))  # cells of a row: a flat index names its row

        def row_of(i: int) -> str:
            return where(i // width)

        as_numbers = numbers(texts, subject, name, row_of, role=role, allow_empty=False, subject=subject)
        return as_numbers.reshape(values.shape)
    return None


def _first_failure(column: Any, to: Any) -> int:
    """The first index whose value does not cast to `to`: a bisection of pyarrow casts over prefixes."""
    good, bad = 0, len(column)  # column[:good] casts, column[:bad] does not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            column.slice(0, middle).cast(to)
            good = middle
        except pa.ArrowInvalid:
            bad = middle
    return good


# ---------------------------------------------------------------------------------------- Parquet


def read_parquet(path: Path) -> Any:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(
            f"data file {path} is not a readable Parquet file ({exc}); fix or re-export it"
        ) from exc


def read_parquet_folder(folder: Path) -> tuple[Any, RowLocator]:
    """Every data file below `folder` as one table (sorted path order), and where each row came from."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts)
    )
    if not files:
        raise InvalidInputError(
            f"data folder {folder} holds no data files; an empty dataset cannot be trained: point data.uri at the "
            "folder or prefix that holds the Parquet files"
        )
    names = [path.relative_to(folder).as_posix() for path in files]
    schemas = []
    for name, path in zip(names, files, strict=True):
        try:
            schemas.append(pq.read_schema(path))
        except (OSError, pa.ArrowException) as exc:
            raise InvalidInputError(
                f"data folder {folder}: {name} is not a readable Parquet file ({exc}); remove it from the folder or "
                "re-export it (names starting with '.' or '_' are skipped)"
            ) from exc
    for name, schema in zip(names[1:], schemas[1:], strict=True):
        _same_columns(folder, (names[0], schemas[0]), (name, schema))
    dataset = ds.dataset([str(path) for path in files], schema=schemas[0], format="parquet")
    # One fragment at a time, concatenated: the row order (and so the seeded split) follows the file order.
    parts = [fragment.to_table() for fragment in dataset.get_fragments()]
    starts = np.cumsum([0] + [part.num_rows for part in parts])

    def where(i: int) -> str:
        index = int(np.searchsorted(starts, i, side="right")) - 1
        return f"row {i - int(starts[index])} (0-based) of {names[index]}"

    return pa.concat_tables(parts), where


def _same_columns(folder: Path, first: tuple[str, Any], other: tuple[str, Any]) -> None:
    """Refuses two files whose columns differ in name or type, naming both files and the first such column."""
    types = [{field.name: field.type for field in schema} for _, schema in (first, other)]
    for column in [*types[0], *(name for name in types[1] if name not in types[0])]:
        kinds = [found.get(column) for found in types]
        if kinds[0] != kinds[1]:
            said = ["missing" if kind is None else f"type {kind}" for kind in kinds]
            raise InvalidInputError(
                f"data folder {folder}: {other[0]} and {first[0]} have different schemas: column {column!r} is "
                f"{said[1]} in {other[0]} but {said[0]} in {first[0]}; every file of a dataset needs the same "
                "columns and types: re-export the odd file"
            )


# ---------------------------------------------------------------------------------------- both


def _from_arrow(
    table: Any, source: str, targets: Sequence[str], where: RowLocator, columns: Sequence[str] | None, role: Role
) -> Columns:
    """The checks CSV and Parquet share, on the pyarrow table either was read into."""
    names = [str(name).strip() for name in table.column_names]
    check_column_names(source, names)
    target_indices = [target_position(source, names, target) for target in targets]
    if table.num_rows == 0:
        raise InvalidInputError(
            f"data file {source} has a header but no data rows (no rows at all); an empty dataset cannot be trained"
        )
    feature_indices = feature_positions(source, names, targets, columns)
    if not feature_indices:
        said = ", ".join(repr(target) for target in targets)
        raise InvalidInputError(
            f"data file {source} has no feature columns besides the target column(s) {said}; add feature columns"
        )

    def numeric(index: int, role: Role) -> Float64Array:
        column, name = table.column(index), names[index]
        kind = column.type
        if role != "feature" and (pat.is_string(kind) or pat.is_large_string(kind)):
            return numbers(column, source, name, where, role=role, allow_empty=False)
        if not (pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind) or pat.is_decimal(kind)):
            raise InvalidInputError(
                f"data file {source}: column {name!r} has the non-numeric type {kind}; {FIXES[role]}"
            )
        if column.null_count:
            first = int(pc.index(column.is_null(), True).as_py())
            raise InvalidInputError(
                f"data file {source}: column {name!r} has {column.null_count} empty (null) value(s), the first at "
                f"{where(first)}; fill them or drop those rows (empty values are not treated as NaN)"
            )
        return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)

    features = np.empty((table.num_rows, len(feature_indices)), dtype=np.float64)
    for out, index in enumerate(feature_indices):
        features[:, out] = numeric(index, "feature")
    return Columns(
        source=source,
        features=features,
        feature_names=[names[i] for i in feature_indices],
        targets=[numeric(index, role) for index in target_indices],
        target_names=[names[i] for i in target_indices],
        where=where,
    )


def check_column_names(source: str, names: list[str]) -> None:
    seen: set[str] = set()
    for position, name in enumerate(names):
        if not name:
            raise InvalidInputError(f"data file {source}: header column {position + 1} has no name; name every column")
        if name in seen:
            raise InvalidInputError(f"data file {source}: column {name!r} appears twice in the header; rename one")
        seen.add(name)


def target_position(source: str, names: list[str], target: str) -> int:
    if target in names:
        return names.index(target)
    raise InvalidInputError(
        f"data file {source} has no target column {target!r} (data.target); columns present: {', '.join(names)}"
        + did_you_mean(target, names)
    )


def feature_positions(
    source: str, names: list[str], targets: Sequence[str], columns: Sequence[str] | None
) -> list[int]:
    """Where the feature columns are: those `columns` names, in that order, else all but the targets."""
    if columns is None:
        return [i for i, name in enumerate(names) if name not in targets]
    available = [name for name in names if name not in targets]
    for position, name in enumerate(columns):
        if name in columns[:position]:
            raise InvalidInputError(f"data file {source}: data.columns lists {name!r} twice; list each column once")
        if name in targets:
            raise InvalidInputError(
                f"data file {source}: data.columns lists {name!r}, the target column (data.target); list only features"
            )
        if name not in available:
            raise InvalidInputError(
                f"data file {source} has no column {name!r} (data.columns); available: {', '.join(available)}"
                + did_you_mean(name, available)
            )
    return [names.index(name) for name in columns]


def did_you_mean(wanted: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(wanted, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def finite_features(subject: str, features64: Float64Array, feature_names: list[str], where: RowLocator) -> FloatArray:
    """The features as float32, refusing NaN, inf and values beyond float32's range, naming the first."""
    # Cast first: a finite float64 beyond float32's range becomes inf and must be caught too.
    with np.errstate(over="ignore"):
        features = features64.astype(np.float32)
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"{subject}: column {feature_names[col]!r} holds {float(features64[row, col])!r} at {where(row)}; "
            "features must be finite numbers (no NaN or inf; |x| < 3.4e38): impute or drop those rows"
        )
    return features


@dataclass(frozen=True, eq=False)
class NpzArrays:
    """An npz archive's features (flattened to float64 NxF) and its raw target array, with their keys."""

    features: Float64Array
    targets: npt.NDArray[Any]
    feature_key: str
    target_key: str


def read_npz(path: Path, target_keys: tuple[str, ...], role: str) -> NpzArrays:
    """Reads the features (any shape N x ..., flattened) and the array under one of `target_keys`.

    Checks what both tasks need: a readable archive without pickled objects, numeric features with
    rows, and a target array with one entry (or row) per feature row; `role` names the targets in
    messages ("labels", "targets"). The caller checks the targets' values and width.
    """
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
            f"data file {source} holds a single .npy array, not an .npz archive; save features and {role} together "
            f"with np.savez(path, features=..., {target_keys[0]}=...)"
        )
    with loaded as archive:
        keys = list(archive.files)
        feature_key = npz_key(source, keys, NPZ_FEATURE_KEYS, "features")
        target_key = npz_key(source, keys, target_keys, role)
        try:
            features_raw = archive[feature_key]
            targets = archive[target_key]
        except ValueError as exc:
            raise InvalidInputError(
                f"data file {source}: key {feature_key!r} or {target_key!r} is an object array that needs pickle to "
                f"load ({exc}); save plain numeric arrays"
            ) from exc
    if features_raw.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has dtype {features_raw.dtype}; features must be numeric "
            "(bool, integer or float)"
        )
    if features_raw.ndim == 0 or targets.ndim == 0:
        key = feature_key if features_raw.ndim == 0 else target_key
        raise InvalidInputError(f"data file {source}: key {key!r} is a scalar; it must be an array of rows")
    rows = features_raw.shape[0]
    if targets.shape[0] != rows:
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has {rows} rows but key {target_key!r} has "
            f"{targets.shape[0]}; they need one entry of {role} per row"
        )
    if rows == 0:
        raise InvalidInputError(
            f"data file {source}: key {feature_key!r} has no rows; an empty dataset cannot be trained"
        )
    features = features_raw.reshape(rows, -1).astype(np.float64)
    if features.shape[1] == 0:
        raise InvalidInputError(f"data file {source}: key {feature_key!r} has zero features per row")
    return NpzArrays(features=features, targets=targets, feature_key=feature_key, target_key=target_key)


def npz_key(source: str, keys: list[str], accepted: tuple[str, ...], role: str) -> str:
    """The one key of `accepted` present in an npz archive, refusing none or two of them."""
    found = [key for key in accepted if key in keys]
    if len(found) > 1:
        raise InvalidInputError(
            f"data file {source} has both {found[0]!r} and {found[1]!r} arrays for the {role}; keep only one"
        )
    if not found:
        names = " / ".join(repr(key) for key in accepted)
        raise InvalidInputError(
            f"data file {source} has no {role} array: expected key {names}; keys present: {keys or 'none'}"
            + did_you_mean(accepted[0], keys)
        )
    return found[0]
