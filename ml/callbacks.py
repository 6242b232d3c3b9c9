"""Your own training parts, named by import path in the spec: an optimizer class
(`hyperparameters.optimizer` + `optimizer_params`), callbacks (`hyperparameters.callbacks`) and the
gradient-checkpointing hook (`hardware.gradient_checkpointing`).

Decisions, and why:

- **Optimizer.** Built-in names (adamw, adam, sgd) or `package.module:Class`, a subclass of
  `torch.optim.Optimizer` constructed as `Class(param_groups, lr=learning_rate, **optimizer_params)`.
  `lr`, `params` and `weight_decay` are refused in `optimizer_params` (the learning rate and the
  per-group decay come from their own keys); a key the constructor does not take is refused naming
  it. Its `state_dict()` is in every checkpoint, so resume stays exact.
- **Callbacks.** Each path names a class constructed with no arguments. It may define
  `on_step_end(event: StepEvent)` and `on_epoch_end(event: EpochEvent)`; through the event it may
  only request an early stop (`event.request_stop()`, honoured at the end of the current epoch, after
  validation and the checkpoint, like Keras' `stop_training`) and, at epoch end, add finite metrics
  to the history (`event.add_metric(name, value)`, recorded in `EpochMetrics.extra`). A callback with
  state defines both `state_dict() -> dict` and `load_state_dict(dict)`; that state is checkpointed.
  An exception in a callback stops the run with a TrainingError naming the callback.
- **Gradient checkpointing.** The hook is a `gradient_checkpointing_enable()` method, the name
  Hugging Face models use, so their models work as they are; the zoo transformer has one. A model
  without it is refused naming `hardware.gradient_checkpointing`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from domain.errors import InvalidInputError, TrainingError
from domain.spec import HyperparametersSpec, PipelineSpec
from ml.imports import resolve_import_path
from ml.zoo import resolve_architecture

BUILTIN_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
_RESERVED = {
    "params": "the trainer passes the parameter groups",
    "lr": "use hyperparameters.learning_rate",
    "weight_decay": "use hyperparameters.weight_decay or param_groups",
}
HOOK = "gradient_checkpointing_enable"


# ------------------------------------------------------------------------------ optimizer


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name in BUILTIN_OPTIMIZERS:
        return BUILTIN_OPTIMIZERS[name]
    cls = resolve_import_path(name, "hyperparameters.optimizer")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise InvalidInputError(f"hyperparameters.optimizer {name!r}: not a torch.optim.Optimizer subclass")
    return cls


def optimizer_kwargs(hp: HyperparametersSpec, cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """The constructor's keyword arguments besides the groups and lr; unknown or reserved keys refused."""
    kwargs: dict[str, Any] = {"momentum": hp.momentum} if hp.optimizer == "sgd" else {}
    accepted = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key, value in hp.optimizer_params.items():
        if key in _RESERVED:
            raise InvalidInputError(f"hyperparameters.optimizer_params.{key}: not allowed here; {_RESERVED[key]}")
        if not open_ended and key not in accepted:
            known = sorted(k for k in accepted if k not in {"self", *_RESERVED})
            raise InvalidInputError(
                f"hyperparameters.optimizer_params.{key}: {cls.__name__} takes no such parameter "
                f"(it takes: {', '.join(known)})"
            )
        kwargs[key] = value
    return kwargs


def make_optimizer(groups: list[dict[str, Any]], hp: HyperparametersSpec) -> torch.optim.Optimizer:
    cls = optimizer_class(hp.optimizer)
    kwargs = optimizer_kwargs(hp, cls)
    try:
        factory: Any = cls  # the base class's stub has no lr; every concrete optimizer takes one
        return factory(groups, lr=hp.learning_rate, **kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"hyperparameters.optimizer_params: {cls.__name__} refused them ({e})") from e


# ------------------------------------------------------------------------------ callbacks


@dataclass(slots=True)
class _Control:
    stop_requested: bool = False


@dataclass(frozen=True, slots=True)
class StepEvent:
    """After each optimiser step (epoch counts from 1)."""

    epoch: int
    step_in_epoch: int
    global_step: int
    loss: float
    _control: _Control = field(repr=False)

    def request_stop(self) -> None:
        self._control.stop_requested = True


@dataclass(frozen=True, slots=True)
class EpochEvent:
    """After each epoch's validation; `metrics` is that epoch's EpochMetrics (read it, don't change it)."""

    metrics: Any
    _control: _Control = field(repr=False)
    _extra: dict[str, float] = field(repr=False)
    _reserved: frozenset[str] = field(repr=False)

    def request_stop(self) -> None:
        self._control.stop_requested = True

    def add_metric(self, name: str, value: float) -> None:
        if name in self._reserved or not name:
            raise ValueError(f"metric name {name!r} is taken by the trainer's own metrics")
        if not math.isfinite(float(value)):
            raise ValueError(f"metric {name!r} must be finite (got {value})")
        self._extra[name] = float(value)


class Callbacks:
    """The spec's callbacks, constructed in order; dispatches events and carries their state."""

    def __init__(self, paths: list[str]) -> None:
        self.control = _Control()
        self.items: list[tuple[str, Any]] = [
            (path, self._call(path, "__init__", callback_class(i, path))) for i, path in enumerate(paths)
        ]
        # the hooks each callback defines, found once (the step hook runs on every optimiser step)
        self.on_step = [(path, c.on_step_end) for path, c in self.items if hasattr(c, "on_step_end")]
        self.on_epoch = [(path, c.on_epoch_end) for path, c in self.items if hasattr(c, "on_epoch_end")]

    @staticmethod
    def _call(path: str, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            raise TrainingError(
                f"callback {path!r} raised in {what}: {type(e).__name__}: {e}; fix it or remove it from "
                "hyperparameters.callbacks"
            ) from e

    def step_end(self, epoch: int, step_in_epoch: int, global_step: int, loss: float) -> None:
        if not self.on_step:
            return
        event = StepEvent(epoch, step_in_epoch, global_step, loss, self.control)  # frozen: one serves all
        for path, hook in self.on_step:
            self._call(path, "on_step_end", hook, event)

    def epoch_end(self, metrics: Any, extra: dict[str, float]) -> None:
        if not self.on_epoch:
            return
        event = EpochEvent(metrics, self.control, extra, frozenset(f.name for f in fields(metrics)))
        for path, hook in self.on_epoch:
            self._call(path, "on_epoch_end", hook, event)

    def state_dict(self) -> list[Any]:
        return [
            self._call(path, "state_dict", callback.state_dict) if _stateful(callback) else None
            for path, callback in self.items
        ]

    def load_state_dict(self, states: list[Any]) -> None:
        for (path, callback), state in zip(self.items, states, strict=False):
            if state is not None and _stateful(callback):
                self._call(path, "load_state_dict", callback.load_state_dict, state)


def callback_class(i: int, path: str) -> type:
    """The class `hyperparameters.callbacks[i]` names (InvalidInputError naming the key otherwise)."""
    cls = resolve_import_path(path, f"hyperparameters.callbacks[{i}]")
    if not isinstance(cls, type):
        raise InvalidInputError(f"hyperparameters.callbacks[{i}] {path!r}: not a class")
    return cls


def _stateful(callback: Any) -> bool:
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))


# ------------------------------------------------------------------ gradient checkpointing


def _no_hook(model_class: type) -> str:
    return (
        f"hardware.gradient_checkpointing: {model_class.__name__} has no {HOOK}() method; "
        "add one to the model or set it to false"
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    hook = getattr(model, HOOK, None)
    if not callable(hook):
        raise InvalidInputError(_no_hook(type(model)))
    hook()


# ------------------------------------------------------------------------------ validation


def training_parts_problems(spec: PipelineSpec) -> list[str]:
    """Validator lines for the optimizer, its params, the callbacks and the checkpointing hook."""
    problems: list[str] = []
    hp = spec.hyperparameters
    try:
        optimizer_kwargs(hp, optimizer_class(hp.optimizer))
    except InvalidInputError as e:
        problems.append(e.message)
    for i, path in enumerate(hp.callbacks):
        try:
            callback_class(i, path)
        except InvalidInputError as e:
            problems.append(e.message)
    if spec.hardware.gradient_checkpointing:
        try:
            cls = resolve_architecture(spec.model.architecture)
        except InvalidInputError:
            return problems  # the architecture's own check reports it
        if not callable(getattr(cls, HOOK, None)):
            problems.append(_no_hook(cls))
    return problems
