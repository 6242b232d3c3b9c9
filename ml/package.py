"""A trained model as a package: its weights file plus a manifest saying how to rebuild it.

The manifest (JSON-safe, stored with the model version in the metadata database) names the
architecture, its parameters, the input shape and classes, the quantization variant and the
standardizer fitted on the training split. Loading rebuilds the float skeleton from the zoo,
applies the same variant transform and loads the weights with `weights_only=True`, after
verifying the file's sha256. Serving and the champion re-evaluation both load through here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import nn

from domain.errors import InvalidInputError
from domain.spec import PipelineSpec
from ml.quantization import SavedVariant, Variant, load_quantized, save_quantized
from ml.standardizer import Standardizer
from ml.zoo import build_model

MANIFEST_FORMAT = "retrainer.model/1"


def manifest_for(
    spec: PipelineSpec, variant: str, standardizer: Standardizer, feature_names: list[str]
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "architecture": spec.model.architecture,
        "params": dict(spec.model.params),
        "input_shape": list(spec.model.input_shape),
        "output_classes": spec.model.output_classes,
        "variant": variant,
        "standardizer": standardizer.to_dict(),
        "feature_names": list(feature_names),
    }


def save_package(model: nn.Module, manifest: dict[str, Any], path: Path) -> SavedVariant:
    return save_quantized(model, cast(Variant, manifest["variant"]), path)


def builder(manifest: dict[str, Any]) -> Callable[[], nn.Module]:
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidInputError(f"model manifest has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")

    def build() -> nn.Module:
        return build_model(
            manifest["architecture"], dict(manifest["params"]), manifest["input_shape"], manifest["output_classes"]
        )

    return build


def load_package(path: Path, manifest: dict[str, Any], expected_sha256: str) -> tuple[nn.Module, Standardizer]:
    """The model (eval mode, CPU) and its standardizer; ArtifactIntegrityError on a digest mismatch."""
    model = load_quantized(path, builder(manifest), cast(Variant, manifest["variant"]), expected_sha256=expected_sha256)
    return model, Standardizer.from_dict(manifest["standardizer"], source=f"manifest of {path.name}")
