"""What training minimises and watches, per task: an `Objective` and the loss it builds.

- classification (default): `cross_entropy` with `hyperparameters.label_smoothing`, on int64 class
  ids `[N]` and logits `[N, classes]`;
- regression: `mse`, `mae` or `huber` (quadratic within `huber_delta` of the target, linear beyond),
  on float targets `[N, outputs]` and outputs of the same shape, mean-reduced over every element;
- either task: any loss by import path, `package.module:function`, called as `fn(outputs, targets)`
  and returning a scalar tensor: the mean over the batch's rows (gradient accumulation weights each
  micro-batch by its share of the step, and the validation loss is that mean times the rows).
  Any callable object at that path works. What it returns is checked at every call: a tensor with
  one element that requires grad when the outputs do; anything else stops training with an error
  naming the path and what came back.

A classification loss with float targets, or a regression loss with class ids, is refused before
the first step (`Objective.check_targets`), since either would train on nonsense (or broadcast
`[N, 1]` against `[N]` into an `[N, N]` loss) without failing. The objective also names the
validation metric that picks the best epoch and drives early stopping (`monitor`): `val_loss` for
either task, `val_accuracy` for classification, `val_rmse` / `val_mae` (in the target's units) for
regression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from domain.errors import InvalidInputError
from domain.spec import HyperparametersSpec, PipelineSpec
from domain.task import BUILTIN_LOSSES, MONITORS, TASKS, Task
from ml.imports import is_import_path, resolve_callable

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KEY = "hyperparameters.loss_function"

_HIGHER_IS_BETTER = frozenset({"val_accuracy"})


@dataclass(frozen=True, slots=True)
class Objective:
    """The task, its loss and the monitored validation metric; refused at construction when inconsistent.

    `Objective.from_hyperparameters(hp)` is today's behaviour (classification, the spec's loss and
    early-stopping monitor). Messages name the spec key a user would fix.
    """

    task: Task = "classification"
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    huber_delta: float = 1.0
    monitor: str = "val_loss"

    def __post_init__(self) -> None:
        problems = objective_problems(self.task, self.loss, self.label_smoothing, self.huber_delta, self.monitor)
        if problems:
            raise InvalidInputError("; ".join(problems))

    @classmethod
    def from_hyperparameters(
        cls, hp: HyperparametersSpec, task: Task = "classification", huber_delta: float = 1.0
    ) -> Objective:
        """The objective a spec's hyperparameters describe, for `task`."""
        return cls(task, hp.loss_function, hp.label_smoothing, huber_delta, _monitor(hp))

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> Objective:
        """The objective of a whole spec: its task, loss, huber_delta and early-stopping monitor."""
        return cls.from_hyperparameters(spec.hyperparameters, spec.task, spec.hyperparameters.huber_delta)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of `monitor` is a better epoch."""
        return self.monitor in _HIGHER_IS_BETTER

    def build_loss(self) -> Loss:
        """The loss function (InvalidInputError for an import path that does not resolve)."""
        if self.loss == "cross_entropy":
            return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        if self.loss in BUILTIN_LOSSES["regression"]:
            return _Regression(self._regression_loss())
        return _Checked(self.loss, resolve_callable(self.loss, KEY))

    def _regression_loss(self) -> nn.Module:
        if self.loss == "mse":
            return nn.MSELoss()
        if self.loss == "mae":
            return nn.L1Loss()
        return nn.HuberLoss(delta=self.huber_delta)

    def check_targets(self, targets: torch.Tensor, what: str) -> None:
        """Refuses targets of the wrong kind for the task: `what` (e.g. "training targets") names them."""
        if self.task == "classification":
            if targets.dtype.is_floating_point or targets.dim() != 1:
                raise InvalidInputError(
                    f"{what} are {_describe(targets)} but the task is classification, which needs int64 class ids "
                    f"[N] (loss {self.loss!r}); for float targets set the task to regression with mse, mae or huber"
                )
        elif not targets.dtype.is_floating_point or targets.dim() != 2:
            raise InvalidInputError(
                f"{what} are {_describe(targets)} but the task is regression, which needs float targets "
                f"[N, outputs] (loss {self.loss!r}); for class ids set the task to classification, or prepare the "
                "data with ml.data.prepare(task='regression')"
            )


def objective_problems(task: str, loss: str, label_smoothing: float, huber_delta: float, monitor: str) -> list[str]:
    """Validator lines ("key: message") for an objective's fields; empty when they are usable together."""
    if task not in TASKS:
        return [f"task: must be one of {', '.join(TASKS)} (got {task!r})"]
    problems: list[str] = []
    this: Task = "regression" if task == "regression" else "classification"
    other: Task = "classification" if this == "regression" else "regression"
    if loss in BUILTIN_LOSSES[other]:
        problems.append(
            f"{KEY}: {loss!r} is a {other} loss but the task is {this}; use "
            f"{' / '.join(BUILTIN_LOSSES[this])} or a loss by import path 'package.module:function'"
        )
    elif loss not in BUILTIN_LOSSES[this] and not is_import_path(loss):
        problems.append(
            f"{KEY}: must be {' / '.join(BUILTIN_LOSSES[this])} for {this}, or an import path "
            f"'package.module:function' (got {loss!r})"
        )
    if monitor not in MONITORS[this]:
        problems.append(
            f"hyperparameters.early_stopping.monitor: {monitor!r} is not a {this} validation metric; "
            f"use {' / '.join(MONITORS[this])}"
        )
    if not huber_delta > 0:
        problems.append(f"hyperparameters.huber_delta: must be > 0 (got {huber_delta})")
    if label_smoothing and this == "regression":
        problems.append("hyperparameters.label_smoothing: applies to classification only; remove it")
    return problems


def build_loss(hp: HyperparametersSpec) -> Loss:
    """The classification loss for these hyperparameters (InvalidInputError for a path that does not resolve)."""
    return Objective.from_hyperparameters(hp).build_loss()


def loss_problems(hp: HyperparametersSpec, task: Task = "classification", huber_delta: float = 1.0) -> list[str]:
    """Validator lines for the loss (empty when it suits the task and resolves), for `pipelines validate`."""
    problems = objective_problems(task, hp.loss_function, hp.label_smoothing, huber_delta, _monitor(hp))
    if problems:
        return problems
    try:
        Objective.from_hyperparameters(hp, task, huber_delta).build_loss()
    except InvalidInputError as e:  # from the resolver: "KEY 'path': problem"
        return [f"{KEY}: {e.message.removeprefix(KEY + ' ')}"]
    return []


def _monitor(hp: HyperparametersSpec) -> str:
    return hp.early_stopping.monitor if hp.early_stopping is not None else "val_loss"


def _describe(targets: torch.Tensor) -> str:
    return f"{str(targets.dtype).removeprefix('torch.')} {list(targets.shape)}"


class _Regression:
    """A built-in regression loss that refuses outputs and targets of different shapes.

    Torch would broadcast `[N, 1]` against `[N]` into `[N, N]` with only a warning, and train on it.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.shape != targets.shape:
            raise InvalidInputError(
                f"the model returns {list(outputs.shape)} but the targets are {list(targets.shape)}; make the "
                "model's output width model.outputs equal the number of target columns (data.target)"
            )
        value: torch.Tensor = self.loss(outputs, targets)
        return value


class _Checked:
    """A user loss whose every answer is checked before `backward` sees it."""

    def __init__(self, path: str, fn: Loss) -> None:
        self.path, self.fn = path, fn

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.fn(outputs, targets)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidInputError(
                f"{KEY} {self.path!r} returned {shape}; it must return a scalar tensor (reduce the loss, e.g. .mean())"
            )
        if outputs.requires_grad and not value.requires_grad:
            raise InvalidInputError(
                f"{KEY} {self.path!r} returned a tensor detached from the model's outputs; compute it with torch "
                "operations on `outputs` (no .item(), numpy or .detach())"
            )
        return value.reshape(())
