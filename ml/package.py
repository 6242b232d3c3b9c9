"""A trained model as a package: its weights file plus a manifest saying how to rebuild it.

The manifest (JSON-safe, stored with the model version in the metadata database) names the
task, the architecture, its parameters, the input shape and classes (a regression model: its
outputs, target names, target standardizer and prediction bins), the quantization variant and the
standardizer fitted on the training split; a text model (data.text_column) also its tokenizer
(`tokenizer`: source, sha256, sequence length and the tokenizer.json, ml/text.py), checked at
load. Keys added since the first manifests are optional: a manifest without `task` is a
classifier's. Loading rebuilds the float skeleton from the zoo, applies the same variant
transform and loads the weights with `weights_only=True`, after verifying the file's sha256.
Serving and the champion re-evaluation both load through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from torch import nn

from domain.errors import InvalidInputError
from domain.spec import PipelineSpec
from domain.task import REGRESSION_DRIFT_BINS, Task
from ml.quantization import SavedVariant, Variant, load_quantized, save_quantized
from ml.standardizer import Standardizer, TargetStandardizer
from ml.text import TextTokenizer
from ml.zoo import build_model

MANIFEST_FORMAT = "retrainer.model/1"


def manifest_for(
    spec: PipelineSpec,
    variant: str,
    standardizer: Standardizer,
    feature_names: list[str],
    *,
    regression: RegressionOutputs | None = None,
) -> dict[str, Any]:
    """The manifest of a model trained from `spec`; a regression model also needs `regression`."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "task": spec.task,
        "architecture": spec.model.architecture,
        "params": dict(spec.model.params),
        "input_shape": list(spec.model.input_shape),
        "variant": variant,
        "standardizer": standardizer.to_dict(),
        "feature_names": list(feature_names),
    }
    if spec.data.text_column is not None:
        # The tokenizer that made the training rows is the one serving must use: it goes with the version.
        manifest["tokenizer"] = TextTokenizer.for_data(spec.data.tokenizer, spec.model.input_shape).to_manifest()
    if spec.task == "classification":
        return {**manifest, "output_classes": spec.output_width}
    if regression is None:
        raise InvalidInputError("a regression model's manifest needs its target standardizer and names")
    return {
        **manifest,
        "outputs": spec.output_width,
        "target_names": list(regression.target_names),
        "target_standardizer": regression.target_standardizer.to_dict(),
        "prediction_bins": [float(edge) for edge in regression.prediction_bins],
    }


@dataclass(frozen=True)
class RegressionOutputs:
    """What a regression model's manifest adds: its targets' names, their standardizer (inverted at
    serving so clients get the target's units) and the inner edges of its prediction quantile bins
    on its test rows (first output), which the canary's drift check uses while it is the champion."""

    target_names: list[str]
    target_standardizer: TargetStandardizer
    prediction_bins: list[float]


def manifest_task(manifest: dict[str, Any]) -> Task:
    """The manifest's task; manifests written before regression existed are classifiers."""
    return "regression" if manifest.get("task") == "regression" else "classification"


def output_width(manifest: dict[str, Any]) -> int:
    """Classes of a classifier, outputs of a regression model."""
    return int(manifest["outputs"] if manifest_task(manifest) == "regression" else manifest["output_classes"])


def target_standardizer_of(manifest: dict[str, Any], source: str = "manifest") -> TargetStandardizer | None:
    """A regression model's target standardizer (None for a classifier)."""
    if manifest_task(manifest) != "regression":
        return None
    return TargetStandardizer.from_dict(manifest["target_standardizer"], source=f"{source} target_standardizer")


def tokenizer_of(manifest: dict[str, Any], source: str = "manifest") -> TextTokenizer | None:
    """A text model's tokenizer, verified against its sha256 (None for a model of numeric features)."""
    entry = manifest.get("tokenizer")
    return None if entry is None else TextTokenizer.from_manifest(entry, f"{source} tokenizer")


def prediction_bin_edges(predictions: npt.NDArray[np.float64], bins: int = REGRESSION_DRIFT_BINS) -> list[float]:
    """Inner edges cutting the first output's predictions into `bins` equal-count bins (repeated
    edges of a model that predicts few distinct values are merged: fewer, still equal-ish bins)."""
    first = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)[:, 0]
    edges = np.quantile(first, np.linspace(0, 1, bins + 1)[1:-1]) if first.size else np.array([])
    return [float(edge) for edge in np.unique(edges)]


def save_package(model: nn.Module, manifest: dict[str, Any], path: Path) -> SavedVariant:
    return save_quantized(model, cast(Variant, manifest["variant"]), path)


def builder(manifest: dict[str, Any]) -> Callable[[], nn.Module]:
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidInputError(f"model manifest has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")

    def build() -> nn.Module:
        return build_model(
            manifest["architecture"], dict(manifest["params"]), manifest["input_shape"], output_width(manifest)
        )

    return build


def load_package(path: Path, manifest: dict[str, Any], expected_sha256: str) -> tuple[nn.Module, Standardizer]:
    """The model (eval mode, CPU) and its standardizer; ArtifactIntegrityError on a digest mismatch."""
    model = load_quantized(path, builder(manifest), cast(Variant, manifest["variant"]), expected_sha256=expected_sha256)
    return model, Standardizer.from_dict(manifest["standardizer"], source=f"manifest of {path.name}")
