"""Data loaders as a team would write them, named by import path in tests (`tests.ml.user_loaders:npy_pair`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def npy_pair(path: Path, features: str = "x.npy", targets: str = "y.npy", scale: float = 1.0) -> tuple[Any, Any]:
    """A folder holding two .npy files (as an image or text pipeline might leave them)."""
    return np.load(path / features) * scale, np.load(path / targets)


def images(path: Path, size: int) -> tuple[Any, Any]:
    """Forgets to flatten: N x size x size images."""
    x = np.zeros((6, size, size), dtype=np.float32)
    return x, np.array([0, 1, 0, 1, 0, 1])


def nan_targets(path: Path) -> tuple[Any, Any]:
    return np.ones((4, 3)), np.array([0.0, 1.0, np.nan, 1.0])


def nan_features(path: Path) -> tuple[Any, Any]:
    x = np.ones((4, 3))
    x[2, 1] = np.inf
    return x, np.array([0, 1, 0, 1])


def fewer_targets(path: Path) -> tuple[Any, Any]:
    return np.ones((4, 3)), np.array([0, 1, 0])


def just_features(path: Path) -> Any:
    return np.ones((4, 3))


def broken(path: Path) -> tuple[Any, Any]:
    raise FileNotFoundError(f"{path}/manifest.json")


NOT_A_FUNCTION = 3


def prices(path: Path, outputs: int = 1) -> tuple[Any, Any]:
    """A regression loader: float targets [rows] for one output, [rows, outputs] for several."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = x @ rng.normal(size=(4, outputs)) * 1000.0 + 5000.0
    return x, (y[:, 0] if outputs == 1 else y)


def nan_prices(path: Path) -> tuple[Any, Any]:
    return np.ones((5, 2)), np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, np.inf], [9.0, 1.0]])


def cube_prices(path: Path) -> tuple[Any, Any]:
    return np.ones((4, 2)), np.ones((4, 2, 2))


def worded_prices(path: Path) -> tuple[Any, Any]:
    return np.ones((3, 2)), np.array(["1.5", "2", "cheap"])
