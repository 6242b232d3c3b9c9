"""Per-feature standardisation, fitted on the train split and saved with the model.

Its own module, so the model server (which loads a saved `Standardizer`) imports neither the
dataset readers nor pyarrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
        """The same transform for a torch tensor (as serving receives), float32 out."""
        x = features.to(torch.float32)
        self._check_width(int(x.shape[-1]) if x.dim() else 0)
        if not self.enabled:
            return x
        mean = torch.from_numpy(self.mean).to(x.device)
        std = torch.from_numpy(self.std).to(x.device)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, to be saved next to the model: {"enabled": bool, "mean": [...], "std": [...]}."""
        return {
            "enabled": self.enabled,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "standardizer") -> Standardizer:
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
                f"input has {width} features per row but the standardizer was fitted on {self.num_features}; "
                "send rows shaped like the training data"
            )


def fit_standardizer(train_features: npt.NDArray[Any], enabled: bool = True) -> Standardizer:
    """Fits mean/std on the train rows only; `enabled=False` gives the identity (mean 0, std 1).

    A constant feature (std 0) gets std 1, so it is centred rather than divided by zero.
    """
    x = np.asarray(train_features)
    if x.ndim != 2:
        raise InvalidInputError(f"train features must be NxF to fit a standardizer (got shape {list(x.shape)})")
    width = int(x.shape[1])
    if not enabled:
        return Standardizer(np.zeros(width, np.float32), np.ones(width, np.float32), enabled=False)
    if x.shape[0] == 0:
        raise InvalidInputError("cannot fit a standardizer on an empty train split; the dataset needs more rows")
    # float64 accumulation: float32 sums over many rows lose precision in the mean and variance.
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    std[std <= 1e-12] = 1.0
    return Standardizer(mean.astype(np.float32), std.astype(np.float32), enabled=True)
