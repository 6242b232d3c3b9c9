"""A user model (by import path) whose forward pass fails on DDP rank 1, as a real worker would die."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ml.zoo import MLP


class FailsOnRankOne(nn.Module):
    """An MLP that raises in its `after_calls`-th training forward on rank 1: every time, or only
    until `marker` exists (then it is a crash that a retry gets past)."""

    def __init__(self, input_shape: Sequence[int], output_classes: int, after_calls: int = 1, marker: str = "") -> None:
        super().__init__()
        self.net = MLP(input_shape, output_classes, hidden_sizes=(64,), dropout=0.0)
        self.after_calls, self.marker, self.calls = after_calls, marker, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            self.calls += 1
            if self.calls >= self.after_calls and not (self.marker and Path(self.marker).exists()):
                if self.marker:
                    Path(self.marker).touch()
                raise RuntimeError(f"forward pass failed on rank 1 at call {self.calls}")
        return self.net(x)  # type: ignore[no-any-return]
