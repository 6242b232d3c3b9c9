"""Candidates that pass an offline look but misbehave in serving, loaded by import path like any
custom architecture ("tests.serving.faulty:SlowMLP"). Each wraps the zoo's MLP."""

from __future__ import annotations

import time

import torch
from torch import nn

from ml.zoo import build_model


class _Wrapped(nn.Module):
    def __init__(self, input_shape: list[int], output_classes: int, hidden: int) -> None:
        super().__init__()
        self.inner = build_model("mlp", {"hidden_sizes": [hidden]}, input_shape, output_classes)


class SlowMLP(_Wrapped):
    """Right answers, `delay_ms` late on every forward pass."""

    def __init__(self, input_shape: list[int], output_classes: int, hidden: int = 16, delay_ms: float = 30.0) -> None:
        super().__init__(input_shape, output_classes, hidden)
        self.delay_ms = delay_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_ms / 1000.0)
        out: torch.Tensor = self.inner(x)
        return out


class FlakyMLP(_Wrapped):
    """Fails on inputs whose standardized `feature` (the first by default) is above `threshold`
    (about 1 in 6 of normal rows with the defaults). The batcher fails the whole batch with it."""

    def __init__(
        self, input_shape: list[int], output_classes: int, hidden: int = 16, threshold: float = 1.0, feature: int = 0
    ) -> None:
        super().__init__(input_shape, output_classes, hidden)
        self.threshold, self.feature = threshold, feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, self.feature] > self.threshold).any()):
            raise RuntimeError(f"feature {self.feature} out of the range this model was built for")
        out: torch.Tensor = self.inner(x)
        return out


class SkewedMLP(_Wrapped):
    """Answers fast and without errors, but almost always says class 0: its predictions drift."""

    def __init__(self, input_shape: list[int], output_classes: int, hidden: int = 16) -> None:
        super().__init__(input_shape, output_classes, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.inner(x)
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[0] = 50.0
        return logits + bias
