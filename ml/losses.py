"""The training loss a spec names (`hyperparameters.loss_function`).

- `cross_entropy` (default), with `hyperparameters.label_smoothing`;
- any loss by import path, `package.module:function`, called as `fn(outputs, targets)` and
  returning a scalar tensor: the mean over the batch's rows (gradient accumulation weights each
  micro-batch by its share of the step, and the validation loss is that mean times the rows).
  Any callable object at that path works. What it returns is checked at every call: a tensor with
  one element that requires grad when the outputs do; anything else stops training with an error
  naming the path and what came back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from domain.errors import InvalidInputError
from domain.spec import HyperparametersSpec
from ml.imports import resolve_callable

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KEY = "hyperparameters.loss_function"


def build_loss(hp: HyperparametersSpec) -> Loss:
    """The loss function for these hyperparameters (InvalidInputError for a path that does not resolve)."""
    if hp.loss_function == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    return _Checked(hp.loss_function, resolve_callable(hp.loss_function, KEY))


def loss_problems(hp: HyperparametersSpec) -> list[str]:
    """Validator lines for the loss (empty when it resolves), e.g. for `retrainer pipelines validate`."""
    try:
        build_loss(hp)
    except InvalidInputError as e:
        return [f"{KEY}: {e.message.removeprefix(KEY + ' ')}"]
    return []


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
