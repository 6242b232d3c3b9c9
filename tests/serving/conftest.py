"""Tiny models for the serving tests: an 8-feature, 3-class MLP wrapped to count forward passes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ml.data import Standardizer
from ml.zoo import build_model
from serving.batching import BatchingConfig
from serving.registry import LoadedModel

FEATURES, CLASSES = 8, 3
STANDARDIZER = Standardizer(
    mean=np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32), std=np.linspace(0.5, 2.0, FEATURES, dtype=np.float32)
)


class CountingModule(nn.Module):
    """Counts forward calls (one per forward pass the server runs)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.inner(x)
        return out


def tiny_module(seed: int) -> CountingModule:
    torch.manual_seed(seed)
    return CountingModule(build_model("mlp", {"hidden_sizes": [16]}, [FEATURES], CLASSES).eval())


def tiny_model(
    version: str, seed: int | None = None, *, pipeline: str = "digits", batching: BatchingConfig | None = None
) -> LoadedModel:
    return LoadedModel(
        pipeline,
        version,
        tiny_module(seed if seed is not None else int(version)),
        input_shape=[FEATURES],
        output_classes=CLASSES,
        standardizer=STANDARDIZER,
        batching=batching,
    )


def expected_probabilities(model: LoadedModel, rows: np.ndarray) -> np.ndarray:
    """What the model itself says, outside the server."""
    x = torch.from_numpy(rows.astype(np.float32))
    with torch.inference_mode():
        logits = model.model(STANDARDIZER.transform_tensor(x))
    return torch.softmax(logits, dim=-1).numpy()
