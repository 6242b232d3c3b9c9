"""Atomic training checkpoints, loaded without executing pickled code.

A checkpoint holds everything needed to continue a run bit-for-bit: model, optimiser,
scheduler and grad-scaler state, the RNG states, the position (epoch, step in epoch, global
step), the early-stopping state with the best weights so far, and the metrics history. It is
written to a temporary file in the same folder, fsynced and renamed over `last.pt`, so a crash
at any moment leaves either the previous checkpoint or the new one, never half of one. Loading
uses `torch.load(weights_only=True)`: only tensors and plain containers come back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from domain.errors import InvalidInputError

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".last.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save({"format_version": FORMAT_VERSION, **state}, out)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp_name).replace(final)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return final


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The last checkpoint in `directory`, or None if there is none."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never guess
        raise InvalidInputError(f"checkpoint {path} cannot be loaded ({e}); delete it to start over") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"checkpoint {path} has format {state.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "delete it to start over"
        )
    return state
