"""Reading a dataset file into a `Table`: CSV and Parquet through pyarrow, NPZ through numpy.

It is strict on purpose. A non-numeric cell, an empty cell, a NaN or a label that is not an integer
class id is refused with an `InvalidInputError` that names the file, the column (or npz key), the
row and the fix. Coercing them silently would train a model on data nobody looked at.

CSV is read by `pyarrow.csv` with every column typed float64 up front (so `true`, `abc` or a date
is a conversion error, never an inferred column type). When that read fails, the file is read
again as text to find the cell or row to name (the error path only); CSV rows are named by their
line in the file, Parquet and NPZ rows by their 0-based index. Labels must already be class ids
0..K-1 (integral floats and strings such as "3.0" are accepted as the integers they spell).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# Accepted npz key names, in order of preference.
NPZ_FEATURE_KEYS = ("features", "x", "X")
NPZ_LABEL_KEYS = ("labels", "y")
_NUMERIC_FIX = "every column except the target must be numeric: encode it as numbers or drop the column"
_LABEL_FIX = "labels must be integer class ids 0..K-1 (K = model.output_classes)"

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

# Describes row i for an error message ("line 7" for CSV, "row 6 (0-based)" otherwise).
RowLocator = Callable[[int], str]


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
        table, where = _read_parquet_folder(path)
        return _from_arrow(table, str(path), target, where, columns)
    if not path.is_file():
        raise InvalidInputError(f"data file {path} is not a regular file; point the spec at a file or a folder")
    if kind == "csv":
        return _from_arrow(_read_csv(path, target, columns), str(path), target, _CsvLines(path), columns)
    if kind == "parquet":
        return _from_arrow(_read_parquet(path), str(path), target, index_row, columns)
    if columns is not None:
        raise InvalidInputError(
            f"data file {path}: data.columns selects named columns, but npz arrays have none; remove data.columns"
        )
    return _load_npz(path)


def index_row(i: int) -> str:
    return f"row {i} (0-based)"


# ---------------------------------------------------------------------------------------- CSV


def _read_csv(path: Path, target: str, columns: Sequence[str] | None) -> Any:
    names = _csv_header(path)
    wanted = names
    if columns is not None:
        # Only the target and the selected columns are typed as numbers: the others may hold text.
        stripped = [name.strip() for name in names]
        check_column_names(str(path), stripped)
        target_position(str(path), stripped, target)
        feature_positions(str(path), stripped, target, columns)
        keep = {*columns, target}
        wanted = [name for name in names if name.strip() in keep]
    convert = pacsv.ConvertOptions(
        column_types=dict.fromkeys(wanted, pa.float64()), include_columns=wanted, null_values=[""]
    )
    try:
        return pacsv.read_csv(path, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise _csv_problem(path, names, target, set(wanted)) or InvalidInputError(
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


def _csv_problem(path: Path, names: list[str], target: str, wanted: set[str]) -> InvalidInputError | None:
    """Why the typed read failed: a ragged row, a cell that is not UTF-8 or not a number (with its line)."""
    source, lines = str(path), _CsvLines(path)
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
            numbers(text, source, name.strip(), lines, role="label" if name.strip() == target else "feature")
        except InvalidInputError as problem:
            return problem
    return None


def numbers(
    column: Any, source: str, name: str, where: RowLocator, *, role: str, allow_empty: bool = True
) -> Float64Array:
    """A text column as float64 (surrounding spaces ignored), naming the first cell that is not a number.

    `role` "label" words the message for class ids; empty cells become NaN unless `allow_empty` is
    False (the callers' own checks then name them as empty, not as NaN).
    """
    trimmed = pc.utf8_trim_whitespace(column)
    empty = pc.fill_null(pc.equal(trimmed, ""), True)
    if pc.any(empty).as_py():
        first = int(pc.index(empty, True).as_py())
        if not allow_empty:
            raise InvalidInputError(
                f"data file {source}: column {name!r} is empty at {where(first)}; fill the cell or drop the row "
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
            f"data file {source}: label column {name!r} holds {cell!r} at {where(row)}; {_LABEL_FIX}; map class "
            "names to ids before training"
        ) from None
    raise InvalidInputError(
        f"data file {source}: column {name!r} holds the non-numeric value {cell!r} at {where(row)}; {_NUMERIC_FIX}"
    ) from None


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


def _read_parquet(path: Path) -> Any:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(
            f"data file {path} is not a readable Parquet file ({exc}); fix or re-export it"
        ) from exc


def _read_parquet_folder(folder: Path) -> tuple[Any, RowLocator]:
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


def _from_arrow(table: Any, source: str, target: str, where: RowLocator, columns: Sequence[str] | None = None) -> Table:
    """The checks CSV and Parquet share, on the pyarrow table either was read into."""
    names = [str(name).strip() for name in table.column_names]
    check_column_names(source, names)
    target_index = target_position(source, names, target)
    if table.num_rows == 0:
        raise InvalidInputError(
            f"data file {source} has a header but no data rows (no rows at all); an empty dataset cannot be trained"
        )
    feature_indices = feature_positions(source, names, target, columns)
    if not feature_indices:
        raise InvalidInputError(
            f"data file {source} has no feature columns besides the target column {target!r}; add feature columns"
        )

    def numeric(index: int, *, role: str) -> Float64Array:
        column, name = table.column(index), names[index]
        kind = column.type
        if role == "label" and (pat.is_string(kind) or pat.is_large_string(kind)):
            return numbers(column, source, name, where, role="label", allow_empty=False)
        if not (pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind) or pat.is_decimal(kind)):
            fix = _LABEL_FIX if role == "label" else _NUMERIC_FIX
            raise InvalidInputError(f"data file {source}: column {name!r} has the non-numeric type {kind}; {fix}")
        if column.null_count:
            first = int(pc.index(column.is_null(), True).as_py())
            raise InvalidInputError(
                f"data file {source}: column {name!r} has {column.null_count} empty (null) value(s), the first at "
                f"{where(first)}; fill them or drop those rows (empty values are not treated as NaN)"
            )
        return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)

    features = np.empty((table.num_rows, len(feature_indices)), dtype=np.float64)
    for out, index in enumerate(feature_indices):
        features[:, out] = numeric(index, role="feature")
    raw_labels = numeric(target_index, role="label")
    feature_names = [names[i] for i in feature_indices]
    return finish(source, features, raw_labels, feature_names, names[target_index], where)


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


def feature_positions(source: str, names: list[str], target: str, columns: Sequence[str] | None) -> list[int]:
    """Where the feature columns are: those `columns` names, in that order, else all but the target."""
    if columns is None:
        return [i for i, name in enumerate(names) if name != target]
    available = [name for name in names if name != target]
    for position, name in enumerate(columns):
        if name in columns[:position]:
            raise InvalidInputError(f"data file {source}: data.columns lists {name!r} twice; list each column once")
        if name == target:
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
    labels = _class_ids(subject, raw_labels, target, where)
    present = np.unique(labels)
    if present.size < 2:
        raise InvalidInputError(
            f"{subject}: target {target!r} has a single class ({int(present[0])}) in all {labels.size} rows; "
            "training a classifier needs at least 2 classes"
        )
    return Table(features=features, labels=labels, feature_names=feature_names, source=source, target=target)


def _class_ids(subject: str, values: Float64Array, target: str, where: RowLocator) -> IndexArray:
    fix = f"{_LABEL_FIX}; map them before training"
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


# ---------------------------------------------------------------------------------------- NPZ


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

    where = index_row
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
    raw_labels = label_numbers(labels_raw, source, label_key, where)
    if raw_labels is None:
        raise InvalidInputError(
            f"data file {source}: key {label_key!r} has dtype {labels_raw.dtype}; labels must be integer class ids "
            "0..K-1"
        )
    feature_names = [f"f{i}" for i in range(features.shape[1])]
    return finish(source, features, raw_labels, feature_names, label_key, where)


def label_numbers(values: npt.NDArray[Any], source: str, name: str, where: RowLocator) -> Float64Array | None:
    """Numeric or text labels as float64 (text must spell numbers); None for any other dtype."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    if values.dtype.kind == "U":
        texts = pa.array([str(value) for value in values], pa.string())
        return numbers(texts, source, name, where, role="label", allow_empty=False)
    return None


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
            + did_you_mean(accepted[0], keys)
        )
    return found[0]
