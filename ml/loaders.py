"""Datasets a team reads itself: `data.loader: package.module:function` with `data.params`.

The loader is called as `fn(path, **params)` with the fetched local path (a file, or a folder for a
folder / S3-prefix dataset) and returns `(features, targets)`: a 2-D numeric array `[rows, features]`
and the targets (numpy arrays, or anything `numpy.asarray` takes, such as tensors): class ids
`[rows]` for classification, numbers `[rows]` or `[rows, outputs]` for regression, one column per
`data.target` name. Its output is checked exactly like a table read from a file (`ml/readers.py`:
finite features, integer class ids, at least two classes; `ml/regression_readers.py`: finite float
targets), and every message names the loader, the shapes it returned and the fix. Features are
named `f0`, `f1`, ... . `load_data` is the flow's one entry point: the spec's loader when it has
one, else the built-in reader for `data.format`, for the pipeline's task.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from domain.data_spec import DataSpec
from domain.errors import InvalidInputError, RetrainerError
from domain.task import Task
from ml.data import RegressionTable
from ml.imports import resolve_callable
from ml.readers import Table, finish, load_table
from ml.regression_readers import load_regression_table, regression_table, split_targets, target_matrix
from ml.table_files import Columns, array_numbers, did_you_mean, index_row
from ml.text import TextTokenizer, load_text_table

KEY = "data.loader"
_SHAPE_FIX = "return (features [rows, features], targets [rows])"
_CLASS_TARGETS = "targets must be 1-D [rows], one class id per row; e.g. y.ravel()"
_REGRESSION_TARGETS = "targets must be [rows] or [rows, outputs], one column per data.target name"


@overload
def load_data(
    path: Path, data: DataSpec, task: Literal["classification"] = ..., input_shape: Sequence[int] = ...
) -> Table: ...
@overload
def load_data(
    path: Path, data: DataSpec, task: Literal["regression"], input_shape: Sequence[int] = ...
) -> RegressionTable: ...
@overload
def load_data(path: Path, data: DataSpec, task: Task, input_shape: Sequence[int] = ...) -> Table | RegressionTable: ...
def load_data(
    path: Path, data: DataSpec, task: Task = "classification", input_shape: Sequence[int] = ()
) -> Table | RegressionTable:
    """The fetched data (file or folder) as a checked table, read as the spec's `data` section says.

    Classification gives a `Table` of class ids from the one `data.target` column; regression a
    `RegressionTable` of float targets, one column per `data.target` name, in that order. A text
    pipeline (`data.text_column`) gives a `Table` of token ids, `input_shape` [T] (model.input_shape)
    tokens per row (ml/text.py).
    """
    targets = data.target_columns
    if data.text_column is not None:
        if task != "classification" or len(targets) > 1:
            raise InvalidInputError("data.text_column: text pipelines are classifiers with one data.target column")
        tokenizer = TextTokenizer.for_data(data.tokenizer, input_shape)
        return load_text_table(path, data.format, data.text_column, targets[0], tokenizer)
    if task == "regression":
        if data.loader is None:
            return load_regression_table(path, data.format, targets, data.columns)
        return load_regression_with_loader(data.loader, Path(path), data.params, targets=targets)
    if len(targets) > 1:
        raise InvalidInputError(
            f"data.target lists {len(targets)} columns ({', '.join(targets)}) but a classifier reads one label "
            "column: name one column, or set task: regression for several outputs"
        )
    if data.loader is None:
        return load_table(path, data.format, targets[0], data.columns)
    return load_with_loader(data.loader, Path(path), data.params, target=targets[0])


def loader_problems(data: DataSpec) -> list[str]:
    """Validator lines for `data.loader` (empty when it resolves to a callable taking `data.params`)."""
    if data.loader is None:
        return []
    try:
        fn = resolve_callable(data.loader, KEY)
    except InvalidInputError as e:
        return [f"{KEY}: {e.message.removeprefix(KEY + ' ')}"]
    return [f"data.params.{key}: {message}" for key, message in _param_problems(data.loader, fn, data.params)]


def load_with_loader(loader: str, path: Path, params: dict[str, Any], *, target: str = "label") -> Table:
    """Calls the loader on `path` and checks what it returned; InvalidInputError naming the loader and the fix."""
    features_raw, targets_raw, subject = _call(loader, path, params, _CLASS_TARGETS, (1,))
    targets = array_numbers(targets_raw, subject, target, index_row, role="label")
    if targets is None:
        raise InvalidInputError(f"{subject}: targets have dtype {targets_raw.dtype}; they must be integer class ids")
    names = [f"f{i}" for i in range(features_raw.shape[1])]
    return finish(str(path), features_raw.astype(np.float64), targets, names, target, index_row, subject=subject)


def load_regression_with_loader(
    loader: str, path: Path, params: dict[str, Any], *, targets: Sequence[str] = ("label",)
) -> RegressionTable:
    """Calls the loader on `path` and checks its float targets, one column per name of `targets` (data.target).

    NaN or infinite targets, a width other than len(targets) and text that is not a number are
    refused with an InvalidInputError naming the loader, the shapes it returned and the fix.
    """
    target_names = list(targets)
    features_raw, targets_raw, subject = _call(loader, path, params, _REGRESSION_TARGETS, (1, 2))
    values = array_numbers(targets_raw, subject, ", ".join(target_names), index_row, role="target")
    if values is None:
        raise InvalidInputError(
            f"{subject}: targets have dtype {targets_raw.dtype}; regression targets must be numbers (integer or float)"
        )
    fix = f"return targets [rows, {len(target_names)}]"
    matrix = target_matrix(values, subject, target_names, what="targets", fix=fix)
    names = [f"f{i}" for i in range(features_raw.shape[1])]
    read = Columns(str(path), features_raw.astype(np.float64), names, split_targets(matrix), target_names, index_row)
    return regression_table(read, subject=subject)


def _call(
    loader: str, path: Path, params: dict[str, Any], targets_fix: str, target_dims: tuple[int, ...]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], str]:
    """Runs the loader and checks the shapes both tasks need: (features, targets, the subject of messages).

    `target_dims` are the numbers of target dimensions the task takes, `targets_fix` says what they must be.
    """
    fn = resolve_callable(loader, KEY)
    problems = _param_problems(loader, fn, params)
    if problems:
        raise InvalidInputError("; ".join(f"data.params.{key}: {message}" for key, message in problems))
    try:
        returned = fn(path, **params)
    except RetrainerError:
        raise
    except Exception as e:  # the team's code: any failure is reported against its path, never swallowed
        raise InvalidInputError(
            f"{KEY} {loader!r} failed on {path} ({type(e).__name__}: {e}); fix the loader or data.params"
        ) from e
    if not isinstance(returned, tuple | list) or len(returned) != 2:
        raise InvalidInputError(f"{KEY} {loader!r} returned {type(returned).__name__}; {_SHAPE_FIX}")
    features_raw, targets_raw = (np.asarray(value) for value in returned)
    shapes = f"features {list(features_raw.shape)}, targets {list(targets_raw.shape)}"
    subject = f"{KEY} {loader!r} ({shapes})"

    if features_raw.ndim != 2:
        raise InvalidInputError(
            f"{subject}: features must be 2-D [rows, features]; flatten each row, e.g. x.reshape(len(x), -1)"
        )
    if targets_raw.ndim not in target_dims:
        raise InvalidInputError(f"{subject}: {targets_fix}")
    rows = features_raw.shape[0]
    if targets_raw.shape[0] != rows:
        raise InvalidInputError(f"{subject}: {rows} rows of features but {targets_raw.shape[0]} targets; one per row")
    if rows == 0 or features_raw.shape[1] == 0:
        raise InvalidInputError(f"{subject}: no rows or no features; an empty dataset cannot be trained")
    if features_raw.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"{subject}: features have dtype {features_raw.dtype}; they must be numbers (bool, integer or float)"
        )
    return features_raw, targets_raw, subject


def _param_problems(loader: str, fn: Callable[..., Any], params: dict[str, Any]) -> list[tuple[str, str]]:
    """(param, problem) pairs: names the loader does not accept, and required ones not given."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return []
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    ):
        return [("(path)", f"{loader!r} must take the data path as its first positional argument")]
    rest = parameters[1:] if parameters[0].kind is not inspect.Parameter.VAR_POSITIONAL else parameters
    named = [
        p.name for p in rest if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)
    problems: list[tuple[str, str]] = []
    for key in params:
        if key not in named and not takes_any:
            problems.append(
                (
                    key,
                    f"{loader!r} has no parameter {key!r}; it accepts: {', '.join(named) or 'none'}"
                    + did_you_mean(key, named),
                )
            )
    for p in rest:
        required = p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if required and p.name not in params:
            problems.append((p.name, f"required by {loader!r}; set data.params.{p.name}"))
    return problems
