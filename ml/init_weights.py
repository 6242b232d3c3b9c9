"""Starting weights for a run (`model.init`): read them verified, then load them into the built model.

Two sources give a float state dict: a safetensors file (hashed and parsed from one read, so what
was verified is what is loaded; safetensors holds tensors only, nothing executable) and the
champion's package (`float_state_dict` of the model `ml.package.load_package` rebuilt, which already
verified its recorded sha256 and loaded it with `weights_only=True`). A champion saved as dynamic
int8 gives its Linear weights dequantized, fp16 ones are widened to fp32; a static int8 package keeps
no float skeleton to start from and is refused.

`apply_init` compares keys and shapes before touching the model: a shape mismatch is always refused
(naming the key and both shapes), missing or unexpected keys are refused under `strict` and listed
in the report otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.quantization import OnnxModule, float_weights

_SHOWN = 8  # keys named in one error line; the rest are counted


@dataclass(frozen=True)
class InitReport:
    """What the decision record says about the starting weights."""

    source: str  # "scratch", "champion", or the URI
    sha256: str | None = None
    champion_version: int | None = None
    loaded_keys: int = 0
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_safetensors(path: Path, expected_sha256: str, *, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ArtifactIntegrityError if its bytes are not `expected_sha256`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactNotFoundError(f"model.init.from: {source} was not found") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise ArtifactIntegrityError(
            f"model.init.sha256: {source} has sha256 {actual}, expected {expected_sha256}; "
            "refusing to start from it (fix model.init.sha256 or the file)"
        )
    try:
        return load_safetensors(data)
    except SafetensorError as e:
        raise InvalidInputError(f"model.init.from: {source} is not a safetensors file ({e})") from e


def float_state_dict(model: nn.Module, variant: str, *, source: str) -> dict[str, torch.Tensor]:
    """A float32 state dict of a packaged model, with the keys its float skeleton would have."""
    if variant == "static":
        raise InvalidInputError(
            f"model.init.from: {source} is a static int8 package, which keeps no float weights to start from; "
            "start from a safetensors file (model.init.from: file://…) or remove model.init"
        )
    if isinstance(model, OnnxModule):  # a dynamic int8 or fp16 variant, run by ONNX Runtime
        return float_weights(model.onnx_bytes, source=source)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, tensor in module.named_parameters(recurse=False):
            state[prefix + key] = tensor.detach()
        for key, tensor in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[prefix + key] = tensor.detach()
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}


def apply_init(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool, report: InitReport) -> InitReport:
    """Loads `state` into `model` and returns `report` completed with the key lists.

    InvalidInputError (nothing loaded) on a shape mismatch, on missing/unexpected keys under
    `strict`, and when no key matches at all.
    """
    target = model.state_dict()
    source = report.source if report.champion_version is None else f"champion v{report.champion_version}"
    mismatched = [
        f"{key} {list(state[key].shape)} (model: {list(tensor.shape)})"
        for key, tensor in target.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if mismatched:
        raise InvalidInputError(
            f"model.init: the weights of {source} do not fit model {type(model).__name__}: {_some(mismatched)}; "
            "make model.params and model.input_shape/output_classes match the weights, or remove model.init"
        )
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if strict and (missing or unexpected):
        parts = [f"missing from the weights: {_some(missing)}"] if missing else []
        parts += [f"not in the model: {_some(unexpected)}"] if unexpected else []
        raise InvalidInputError(
            f"model.init.strict: {source} does not match model {type(model).__name__} key for key "
            f"({'; '.join(parts)}); set model.init.strict: false to load only the matching keys"
        )
    matching = {key: tensor for key, tensor in state.items() if key in target}
    if not matching:
        raise InvalidInputError(
            f"model.init: no key of {source} is a key of model {type(model).__name__}; "
            "check model.architecture and model.params against the weights"
        )
    model.load_state_dict(matching, strict=False)
    return replace(report, loaded_keys=len(matching), missing_keys=missing, unexpected_keys=unexpected)


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown if len(keys) <= _SHOWN else f"{shown} and {len(keys) - _SHOWN} more"
