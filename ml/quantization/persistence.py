"""Quantized variants on disk: tensors and plain values only, checked before they are loaded.

`save_quantized` writes a variant's state atomically with its sha256 beside it; `load_quantized`
rebuilds the float skeleton, applies the same transform (ml/quantization/transforms.py) and loads the
state with `torch.load(weights_only=True)`. `serialized_size` is the artifact's size, for evaluators.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.quantization.transforms import apply_variant
from ml.quantization.variants import Variant, check_variant, first_line, torch_ao_quiet

FORMAT = "retrainer.quantized/1"


@dataclass(frozen=True)
class SavedVariant:
    """Where `save_quantized` wrote a variant, and the digest a loader checks it against."""

    path: Path
    variant: Variant
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "variant": self.variant, "sha256": self.sha256, "size_bytes": self.size_bytes}


def _payload(model: nn.Module, variant: Variant) -> dict[str, Any]:
    state = model.state_dict()
    if variant == "fp16":
        state = _map_state(state, torch.float16)
    return {"format": FORMAT, "variant": variant, "engine": torch.backends.quantized.engine, "state": state}


def _map_state(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    mapped: dict[str, Any] = OrderedDict((key, _map_floats(value, dtype)) for key, value in state.items())
    # Per-module versions: without them quantized modules take the state for an old layout and misread it.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        setattr(mapped, "_metadata", metadata)  # noqa: B010 (mypy does not know the attribute)
    return mapped


def _map_floats(value: Any, dtype: torch.dtype) -> Any:
    """Casts float tensors, including those inside packed-parameter tuples, to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and not value.is_quantized else value
    if isinstance(value, tuple):
        return tuple(_map_floats(item, dtype) for item in value)
    return value


def _serialized(model: nn.Module, variant: Variant) -> bytes:
    buffer = io.BytesIO()
    torch.save(_payload(model, variant), buffer)
    return buffer.getvalue()


def serialized_size(model: nn.Module, variant: Variant) -> int:
    """Bytes `save_quantized` would write for this model: the artifact's size, for evaluators."""
    return len(_serialized(model, variant))


def save_quantized(model: nn.Module, variant: Variant, path: Path) -> SavedVariant:
    """Writes the variant's state (tensors and plain values only) atomically to `path`, and its sha256
    to `path` + `.sha256` (sha256sum format)."""
    check_variant(variant)
    data = _serialized(model, variant)
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)
    _write_atomically(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return SavedVariant(path, variant, digest, len(data))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp_name).replace(path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def load_quantized(
    path: Path, build: Callable[[], nn.Module], variant: Variant, *, expected_sha256: str | None = None
) -> nn.Module:
    """Rebuilds the float skeleton with `build()`, applies the same transform as `quantize` (no
    calibration needed: the saved state holds the quantization parameters) and loads the state.

    Nothing pickled is executed (`torch.load(weights_only=True)`). The bytes are hashed and loaded from
    one read, so what was verified is what is loaded: ArtifactIntegrityError if they do not match
    `expected_sha256`.
    """
    check_variant(variant)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactNotFoundError(f"quantized model {path} does not exist") from e
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise ArtifactIntegrityError(
                f"quantized model {path} has sha256 {actual}, expected {expected_sha256}; refusing to load it"
            )
    try:
        with warnings.catch_warnings():
            # torch's own quantized-tensor rebuild touches TypedStorage and warns about it; not our call to fix.
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one that needs code to unpickle: say which
        raise InvalidInputError(f"quantized model {path} cannot be loaded safely ({first_line(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"quantized model {path} is not a {FORMAT} file")
    if payload.get("variant") != variant:
        raise InvalidInputError(f"quantized model {path} holds variant {payload.get('variant')!r}, not {variant!r}")
    model = apply_variant(build(), variant, [])
    state = payload["state"]
    if not isinstance(state, dict):
        raise InvalidInputError(f"quantized model {path} has no state dictionary")
    if variant == "fp16":
        state = _map_state(state, torch.float32)
    expected = set(model.state_dict())
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        with torch_ao_quiet():
            model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned ({first_line(e)})"
        ) from e
    return model.eval()
