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
