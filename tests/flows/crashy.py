"""A user model (by import path) that crashes once in the middle of training, like a killed worker."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ml.zoo import MLP


class CrashOnce(nn.Module):
    def __init__(self, input_shape: Sequence[int], output_classes: int, marker: str, crash_at_call: int = 30) -> None:
        super().__init__()
        self.net = MLP(input_shape, output_classes, hidden_sizes=(64,), dropout=0.0)
        self.marker, self.crash_at_call, self.calls = Path(marker), crash_at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at_call and not self.marker.exists():
                self.marker.touch()
                raise RuntimeError("simulated worker crash in the middle of training")
        return self.net(x)  # type: ignore[no-any-return]
