"""A model for the demo's last act: right answers, slow in serving.

`LookupMLP` is the zoo's MLP plus a blocking wait of `lookup_ms` on every inference forward pass,
standing in for what makes real candidates slow only in production: a synchronous per-request
feature-store call someone added to the model. Offline it is as accurate as the MLP and stays under
an absolute latency ceiling; against the champion on the same live traffic its p99 is several
times higher, which the canary catches. Loaded by import path like any custom architecture:
`architecture: "ml.demo_models:LookupMLP"`; every other parameter is the MLP's (ml/zoo.py checks them
against MLP's constructor).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ml.zoo import MLP


class LookupMLP(MLP):
    def __init__(self, *, lookup_ms: float = 50.0, **mlp_params: Any) -> None:
        super().__init__(**mlp_params)
        self.lookup_ms = lookup_ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # the "lookup" happens at inference only
            time.sleep(self.lookup_ms / 1000.0)
        return super().forward(x)
