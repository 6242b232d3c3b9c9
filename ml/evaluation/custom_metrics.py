"""User metrics by import path (`"package.module:function"`): resolved once, called with checks.

A classification metric is `fn(labels, predictions, probabilities) -> float`, a regression metric
`fn(targets, predictions) -> float` (float64 arrays [N, outputs] in the target's units); either is
stored under the function's name; a failure or a non-finite value is reported against its path, never swallowed. It is
higher-is-better unless the function carries `higher_is_better = False` (set after its `def`):
`compare` passes that on, and the gate's `vs_champion` check reads the improvement's sign from it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from domain.errors import InvalidInputError
from ml.evaluation.regression_metrics import REGRESSION_METRICS
from ml.evaluation.resampling import BUILTIN_METRICS
from ml.imports import is_import_path, resolve_callable

# Called with the report's per-example arrays: (labels, predictions, probabilities) or (targets, predictions).
CustomMetric = Callable[..., Any]


def resolve_custom_metrics(paths: Sequence[str]) -> dict[str, tuple[str, CustomMetric]]:
    """Each import path mapped to (the name its value is stored under, the function); refuses names that clash."""
    if isinstance(paths, str):
        raise InvalidInputError(f"custom_metrics must be a list of import paths, not the string {paths!r}")
    resolved: dict[str, tuple[str, CustomMetric]] = {}
    names: dict[str, str] = {}
    for path in paths:
        name, fn = resolve_custom_metric(path)
        if (
            name in BUILTIN_METRICS
            or name in REGRESSION_METRICS
            or name.startswith(("latency_", "size_bytes", "parameter_count"))
        ):
            raise InvalidInputError(f"custom metric {path!r}: the name {name!r} is taken by a built-in metric")
        if name in names and names[name] != path:
            raise InvalidInputError(f"custom metrics {names[name]!r} and {path!r} would both be stored as {name!r}")
        names[name] = path
        resolved[path] = (name, fn)
    return resolved


def resolve_custom_metric(path: str) -> tuple[str, CustomMetric]:
    """The function an import path names, and its name; InvalidInputError saying what is wrong with the path."""
    if not isinstance(path, str) or not is_import_path(path):
        raise InvalidInputError(f"custom metric {path!r}: use an import path of the form 'package.module:function'")
    fn: CustomMetric = resolve_callable(path, "custom metric")
    return path.partition(":")[2].rsplit(".", 1)[-1], fn


def call_custom_metric(
    path: str,
    fn: CustomMetric,
    *arrays: npt.NDArray[Any],
) -> float:
    """`fn(*arrays)` as a finite float; InvalidInputError naming the path if it fails or returns another thing."""
    try:
        value = fn(*arrays)
    except Exception as e:  # user code: any failure is reported against its path, never swallowed
        raise InvalidInputError(f"custom metric {path!r} raised {type(e).__name__}: {e}") from e
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidInputError(f"custom metric {path!r} must return a finite float (got {value!r})")
    return float(value)
