"""A model for the demo's last act: right answers, slow in serving.

`LookupMLP` is the zoo's MLP plus a blocking wait of `lookup_ms` on every inference forward pass,
standing in for what makes real candidates slow only in production: a synchronous per-request
feature-store call someone added to the model. Offline it is as accurate as the MLP and stays under
an absolute latency ceiling; against the champion on the same live traffic its p99 is several
times higher, which the canary catches. Loaded by import path like any custom architecture:
`architecture: "ml.demo_models:LookupMLP"`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ml.zoo import MLP


class LookupMLP(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        output_classes: int,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        lookup_ms: float = 50.0,
    ) -> None:
        super().__init__()
        self.mlp = MLP(input_shape, output_classes, hidden_sizes, dropout)
        self.lookup_ms = lookup_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # the "lookup" happens at inference only
            time.sleep(self.lookup_ms / 1000.0)
        out: torch.Tensor = self.mlp(x)
        return out
