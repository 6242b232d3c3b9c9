"""`tuning`: a hyperparameter search before training (its own module to keep domain/spec.py short;
run by flows/tuning.py with Optuna).

`search_space` maps spec key paths (`hyperparameters.learning_rate`, `model.params.dropout`) to a
range. The search is judged on a validation metric only: the test split belongs to the gate, and a
search that peeked at it would make the gate's comparison optimistic. Every range is checked before
anything runs by validating the spec with each bound (or each choice) put in its place, so a trial
can never meet a value the spec would refuse.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from domain.task import MONITORS, QUALITY_METRICS, TASKS

if TYPE_CHECKING:
    from domain.spec import ParamChecker

# Whether a larger value of each validation metric is better.
VALIDATION_METRICS: dict[str, bool] = {"val_loss": False, "val_accuracy": True, "val_rmse": False, "val_mae": False}
# Sections whose keys are the user's own (a constructor's or an optimizer's keyword arguments).
_FREE_FORM = ("model.params", "hyperparameters.optimizer_params")
_NOT_TUNABLE = ("name", "dataset", "task", "tuning")
RangeKind = Literal["loguniform", "uniform", "int", "choice"]
_KINDS = get_args(RangeKind)


class ParamRange(BaseModel):
    """One searched key: a float range (`loguniform`, `uniform`), an integer range (`int`) or a list
    (`choice`); written `{type: loguniform, low: 1e-5, high: 1e-2}` or, short, `{loguniform: [1e-5, 1e-2]}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: RangeKind
    low: float | None = None
    high: float | None = None
    step: float | None = Field(default=None, gt=0, description="uniform and int: the grid's spacing.")
    choices: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """CONTRACT's short form: `{loguniform: [low, high]}`, `{int: [low, high, step]}`, `{choice: [...]}`."""
        if not (isinstance(value, dict) and len(value) == 1 and "type" not in value):
            return value
        [(kind, values)] = value.items()
        if kind not in _KINDS or not isinstance(values, list):
            return value
        if kind == "choice":
            return {"type": kind, "choices": values}
        if len(values) not in (2, 3):
            raise ValueError(f"{kind} takes [low, high] or [low, high, step] (got {values!r})")
        return {"type": kind, **dict(zip(("low", "high", "step"), values, strict=False))}

    @model_validator(mode="after")
    def _consistent(self) -> ParamRange:
        if self.type == "choice":
            if self.choices is None or self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("type choice takes choices: [...] only (no low, high or step)")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"type {self.type} takes low and high (and no choices)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "loguniform" and (self.low <= 0 or self.step is not None):
            raise ValueError(f"loguniform needs low > 0 (got {self.low:g}) and takes no step")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("type int needs whole numbers for low, high and step")
        return self

    def bounds(self) -> list[Any]:
        """The values that decide whether the spec accepts the whole range: the bounds, or every choice."""
        if self.type == "choice":
            return list(self.choices or [])
        cast: Callable[[float], Any] = int if self.type == "int" else float
        return [cast(bound) for bound in (self.low, self.high) if bound is not None]

    def labels(self) -> list[Any]:
        """The choices as Optuna may store them (None, bool, int, float, str); others as JSON text."""
        choices = list(self.choices or [])
        if all(c is None or isinstance(c, bool | int | float | str) for c in choices):
            return choices
        return [json.dumps(c, sort_keys=True) for c in choices]

    def decode(self, stored: Any) -> Any:
        """The spec value of a stored parameter (a choice's label back to the choice)."""
        if self.type == "choice":
            return (self.choices or [])[self.labels().index(stored)]
        return int(stored) if self.type == "int" else stored


class TuningSpec(BaseModel):
    """A search over `search_space`; the best trial's configuration becomes the run's candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    search_space: dict[str, ParamRange] = Field(min_length=1, description="Spec key path -> range.")
    trials: int = Field(default=20, gt=0, description="Finished trials (complete, pruned or failed) to run.")
    timeout_seconds: float | None = Field(default=None, gt=0, description="No new trial starts after this.")
    metric: str = Field(
        default="val_loss", description="A validation metric: val_loss, val_accuracy, val_rmse, val_mae."
    )
    direction: Literal["minimize", "maximize"] | None = Field(default=None, description="Default: the metric's own.")
    sampler: Literal["tpe", "random"] = Field(default="tpe", description="Seeded by data.seed.")
    pruner: Literal["median", "none"] = Field(default="median", description="Stops a trial worse than the median.")
    pruner_startup_trials: int = Field(default=2, ge=0, description="Trials that finish before any is pruned.")

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, value: str) -> str:
        if value in VALIDATION_METRICS:
            return value
        test_metrics = {name for task in TASKS for name in QUALITY_METRICS[task]}
        if value in test_metrics or value.startswith("test_"):
            raise ValueError(
                f"{value} is measured on the test split, which only the gate may see; tune on a validation "
                f"metric ({', '.join(VALIDATION_METRICS)})"
            )
        close = difflib.get_close_matches(value, list(VALIDATION_METRICS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown validation metric {value!r}{hint}; use {', '.join(VALIDATION_METRICS)}")

    @field_validator("direction")
    @classmethod
    def _direction_fits_metric(cls, value: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")  # absent when the metric itself was refused
        if value is None or metric is None:
            return value
        natural = _natural_direction(metric)
        if value != natural:
            raise ValueError(
                f"{value} does not fit metric {metric} (better when "
                f"{'higher' if natural == 'maximize' else 'lower'}); set direction: {natural} or leave it out"
            )
        return value

    @property
    def objective_direction(self) -> Literal["minimize", "maximize"]:
        return self.direction or _natural_direction(self.metric)


def _natural_direction(metric: str) -> Literal["minimize", "maximize"]:
    return "maximize" if VALIDATION_METRICS[metric] else "minimize"


def with_value(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the spec document with the key at the dotted `path` set to `value`."""
    changed = copy.deepcopy(document)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


def tuning_problems(document: dict[str, Any], param_checker: ParamChecker | None) -> list[str]:
    """One line per problem of the raw spec document's `tuning` section that needs the whole spec: a
    search-space key the spec does not have, a value the spec would refuse, a metric the task does not
    record. Nothing when the section (or the rest of the spec) is invalid on its own: the schema's
    errors report that."""
    from domain.spec import PipelineSpec  # the spec imports this module

    section = document.get("tuning")
    try:
        tuning = TuningSpec.model_validate(section) if isinstance(section, dict) else None
        base = PipelineSpec.model_validate({k: v for k, v in document.items() if k != "tuning"})
    except ValidationError:
        return []
    if tuning is None:
        return []
    problems: list[str] = []
    if tuning.metric not in MONITORS[base.task]:
        problems.append(
            f"tuning.metric: {tuning.metric} is not recorded for a {base.task} task; "
            f"use {', '.join(MONITORS[base.task])}"
        )
    if base.data.validation_fraction == 0:
        problems.append(f"tuning.metric: {tuning.metric} needs validation rows but data.validation_fraction is 0")
    plain = base.to_document()
    for path, space in tuning.search_space.items():
        problem = _key_problem(plain, path) or _value_problem(plain, path, space, param_checker)
        if problem is not None:
            problems.append(f"tuning.search_space.{path}: {problem}")
    return problems


def _key_problem(document: dict[str, Any], path: str) -> str | None:
    parts = path.split(".")
    if parts[0] in _NOT_TUNABLE:
        return f"{parts[0]} cannot be searched; search hyperparameters, model, data or hardware keys"
    node: Any = document
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, dict):
            return f"not a spec key: {prefix} is not a section with keys (set it in the spec first)"
        if part not in node and prefix not in _FREE_FORM:
            close = difflib.get_close_matches(part, list(node), n=1)
            where = f"{prefix} has" if prefix else "the spec has"
            hint = f" (did you mean {'.'.join([*parts[:depth], close[0]])}?)" if close else ""
            return f"not a spec key: {where} no key {part!r}{hint}"
        node = node.get(part)
    return None


def _value_problem(
    document: dict[str, Any], path: str, space: ParamRange, param_checker: ParamChecker | None
) -> str | None:
    from domain.spec import PipelineSpec

    for value in space.bounds():
        trial = with_value(document, path, value)
        try:
            PipelineSpec.model_validate(trial)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or path
            reason = first["msg"].removeprefix("Value error, ").splitlines()[0]
            return f"the spec refuses {value!r} ({where}: {reason}); narrow the range"
        if param_checker is not None and path.startswith("model.params."):
            for key, message in param_checker(trial["model"]["architecture"], dict(trial["model"]["params"])):
                return f"the spec refuses {value!r} (model.params.{key}: {message})"
    return None


def decoded_params(tuning: TuningSpec, stored: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored parameters as spec values, keyed by their spec paths."""
    return {
        path: tuning.search_space[path].decode(value) for path, value in stored.items() if path in tuning.search_space
    }
