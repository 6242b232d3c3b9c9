"""Per-column standardisation, fitted on the train split and saved with the model.

`Standardizer` scales the features; `TargetStandardizer` scales a regression model's float targets
(so a target in the thousands trains like one near 1) and maps its predictions back to the target's
units with `inverse` / `inverse_tensor`. Both serialise to the same JSON-safe dict.

Its own module, so the model server (which loads a saved `Standardizer`) imports neither the
dataset readers nor pyarrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import torch

from domain.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-feature (x - mean) / std with statistics from the train split; identity when disabled.

    A disabled standardizer keeps mean 0 and std 1 for every feature, so that it still checks the
    feature count and serialises like an enabled one.
    """

    mean: FloatArray
    std: FloatArray
    enabled: bool = True
    _columns: ClassVar[str] = "features"
    _fix: ClassVar[str] = "send rows shaped like the training data"

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
        """The same transform for a torch tensor (as serving receives), float32 out. The model server
        calls it per batch: the statistics are tensors made once, and no torch call is made that would
        change nothing (each releases and retakes the GIL, costly beside a busy event loop)."""
        x = features if features.dtype == torch.float32 else features.to(torch.float32)
        self._check_width(int(x.shape[-1]) if x.dim() else 0)
        if not self.enabled:
            return x
        mean, std = self._statistics(x)
        return (x - mean) / std

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as tensors on `like`'s device."""
        mean, std = self._tensors
        if like.device != mean.device:
            mean, std = mean.to(like.device), std.to(like.device)
        return mean, std

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # ordinary tensors even when first made under the server's inference_mode: an inference tensor
        # could not be saved for backward by a later caller whose input requires grad
        with torch.inference_mode(False):
            return torch.from_numpy(self.mean), torch.from_numpy(self.std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, to be saved next to the model: {"enabled": bool, "mean": [...], "std": [...]}."""
        return {
            "enabled": self.enabled,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "standardizer") -> Self:
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
                f"input has {width} {self._columns} per row but the standardizer was fitted on {self.num_features}; "
                f"{self._fix}"
            )


@dataclass(frozen=True, eq=False)
class TargetStandardizer(Standardizer):
    """Per-target-column (y - mean) / std for regression, with the inverse for predictions.

    Serving applies `inverse` to the model's outputs so that a client gets the target's own units.
    """

    _columns: ClassVar[str] = "target columns"
    _fix: ClassVar[str] = "the model's outputs must have one column per target (model.outputs)"

    def inverse(self, values: npt.NDArray[Any]) -> FloatArray:
        """Maps standardised [N, outputs] values back to the target's units (float32 out)."""
        y = np.asarray(values, dtype=np.float32)
        self._check_width(int(y.shape[-1]) if y.ndim else 0)
        if not self.enabled:
            return y
        return (y * self.std + self.mean).astype(np.float32)

    def inverse_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """The same inverse for a torch tensor (the model's outputs), float32 out (as `transform_tensor`)."""
        y = values if values.dtype == torch.float32 else values.to(torch.float32)
        self._check_width(int(y.shape[-1]) if y.dim() else 0)
        if not self.enabled:
            return y
        mean, std = self._statistics(y)
        return y * std + mean


def fit_standardizer(train_features: npt.NDArray[Any], enabled: bool = True) -> Standardizer:
    """Fits mean/std on the train rows only; `enabled=False` gives the identity (mean 0, std 1).

    A constant feature (std 0) gets std 1, so it is centred rather than divided by zero.
    """
    mean, std = _fit(train_features, enabled, "train features must be NxF", relative=False)
    return Standardizer(mean, std, enabled=enabled)


def fit_target_standardizer(train_targets: npt.NDArray[Any], enabled: bool = True) -> TargetStandardizer:
    """Fits one mean/std per target column [N, outputs] on the train rows only; `enabled=False` is the identity.

    A constant target column gets std 1: it is centred, the model learns 0 for it, and `inverse`
    gives the constant back exactly as far as float32 holds it.
    """
    mean, std = _fit(train_targets, enabled, "train targets must be [N, outputs]", relative=True)
    return TargetStandardizer(mean, std, enabled=enabled)


def _fit(values: npt.NDArray[Any], enabled: bool, shape_rule: str, relative: bool) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(values)
    if x.ndim != 2:
        raise InvalidInputError(f"{shape_rule} to fit a standardizer (got shape {list(x.shape)})")
    width = int(x.shape[1])
    if not enabled:
        return np.zeros(width, np.float32), np.ones(width, np.float32)
    if x.shape[0] == 0:
        raise InvalidInputError("cannot fit a standardizer on an empty train split; the dataset needs more rows")
    # float64 accumulation: float32 sums over many rows lose precision in the mean and variance.
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    # For targets the constant test is relative to the column's size: a constant 1234.567 column
    # keeps a rounding-level spread in its float64 mean that must not become a divisor.
    std[std <= 1e-12 * (np.maximum(1.0, np.abs(mean)) if relative else 1.0)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
