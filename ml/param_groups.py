"""Which parameters train, and how: `model.freeze` and `hyperparameters.param_groups`.

- `freeze_parameters(model, prefixes)` sets requires_grad False on every parameter whose name is
  a prefix or starts with it at a dot boundary (`encoder.layer.1` freezes `encoder.layer.1.x`,
  not `encoder.layer.10.x`, so a prefix never catches a sibling by accident). A prefix matching
  no parameter is refused, naming `model.freeze[i]` and the model's closest parameter names.
- `parameter_groups(model, weight_decay, groups)` splits the trainable parameters into optimizer
  groups. Each spec group takes the parameters its regex finds (re.search on the name) that no
  earlier group took: first match wins, so a specific rule goes above a general one. A group
  without its own `weight_decay` keeps the default rule, under which weight matrices decay and
  biases and normalisation weights (ndim < 2) do not; unmatched parameters follow that rule too.
  Every optimizer group carries `lr_scale`; `build_optimizer` (ml/training.py) sets its lr to
  learning_rate x lr_scale, and the LambdaLR schedule multiplies every group's lr by one factor,
  so the ratios hold all run long. The groups are a pure function of the model and the spec, so
  a checkpoint's optimizer state (which holds the groups) restores exactly.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from domain.errors import SpecError
from domain.param_group_spec import ParamGroupSpec

DEFAULT_GROUP = "default"


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    """Parameter elements (not tensors) that train and that stay frozen."""

    trainable: int
    frozen: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return ParameterCounts(trainable, frozen)


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _near(names: list[str], wanted: str) -> str:
    """A few of the model's parameter names worth showing next to `wanted`."""
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.3) or names[:3]
    return ", ".join(close) + (f" … ({len(names)} in all)" if len(names) > len(close) else "")


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> None:
    """Freezes every parameter under one of `prefixes`; SpecError if one matches nothing or if
    nothing would be left to train."""
    names = [name for name, _ in model.named_parameters()]
    problems = [
        f"model.freeze[{i}]: {prefix!r} matches no parameter of the model; its parameter names include "
        f"{_near(names, prefix)} (use a dotted prefix of one of them)"
        for i, prefix in enumerate(prefixes)
        if not any(_under(name, prefix) for name in names)
    ]
    if problems:
        raise SpecError(problems)
    for name, parameter in model.named_parameters():
        if any(_under(name, prefix) for prefix in prefixes):
            parameter.requires_grad_(False)
    if prefixes and not any(p.requires_grad for p in model.parameters()):
        raise SpecError(["model.freeze: freezes every parameter, so nothing would train; freeze fewer prefixes"])


def _default_split(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, label: str, lr_scale: float
) -> list[dict[str, Any]]:
    """Decay for weight matrices; none for biases and normalisation weights (ndim < 2)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale, "group": label},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale, "group": label},
    ]


def parameter_groups(
    model: nn.Module, weight_decay: float, groups: Sequence[ParamGroupSpec] = ()
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters (empty groups dropped): the unmatched
    parameters first, then each spec group in order. SpecError names
    `hyperparameters.param_groups[i].match` for a regex that takes no trainable parameter."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    claimed: list[list[tuple[str, nn.Parameter]]] = [[] for _ in groups]
    unmatched: list[tuple[str, nn.Parameter]] = []
    patterns = [re.compile(group.match) for group in groups]
    for name, parameter in trainable:
        index = next((i for i, pattern in enumerate(patterns) if pattern.search(name)), None)
        (unmatched if index is None else claimed[index]).append((name, parameter))
    problems = [_no_match(i, group, model, trainable) for i, group in enumerate(groups) if not claimed[i]]
    if problems:
        raise SpecError(problems)
    result = _default_split(unmatched, weight_decay, DEFAULT_GROUP, 1.0)
    for i, (group, named) in enumerate(zip(groups, claimed, strict=True)):
        label = f"param_groups[{i}]"
        if group.weight_decay is None:
            result += _default_split(named, weight_decay, label, group.lr_scale)
        else:
            params = [p for _, p in named]
            result.append(
                {"params": params, "weight_decay": group.weight_decay, "lr_scale": group.lr_scale, "group": label}
            )
    return [g for g in result if g["params"]]


def _no_match(index: int, group: ParamGroupSpec, model: nn.Module, trainable: list[tuple[str, nn.Parameter]]) -> str:
    """Why spec group `index` took no parameter, and what to do about it."""
    key = f"hyperparameters.param_groups[{index}].match: {group.match!r}"
    pattern = re.compile(group.match)
    if any(pattern.search(name) for name, _ in trainable):
        return f"{key} matches only parameters an earlier group took (first match wins); reorder or narrow the groups"
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and pattern.search(name)]
    if frozen:
        return f"{key} matches only frozen parameters ({_near(frozen, group.match)}); unfreeze them or drop the group"
    names = [name for name, _ in trainable]
    return f"{key} matches no trainable parameter; the names include {_near(names, group.match)} (fix the regex)"
