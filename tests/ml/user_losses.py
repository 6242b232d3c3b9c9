"""Losses as a team would write them, named by import path in tests (`tests.ml.user_losses:focal`)."""

from __future__ import annotations

import torch
from torch.nn import functional


def focal(outputs: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy down-weighted on rows already classified well."""
    log_p = functional.log_softmax(outputs, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def per_row(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forgets to reduce: one loss per row."""
    return functional.cross_entropy(outputs, targets, reduction="none")


def detached(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Leaves the graph: a number, not something to differentiate."""
    return torch.tensor(functional.cross_entropy(outputs, targets).item())


NOT_A_FUNCTION = 3
