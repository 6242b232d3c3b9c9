"""Resolves `model.init` before training: which weights the candidate starts from, verified.

- no `model.init`: random weights (from scratch);
- `from: champion`: the current champion's package from the artifact store, verified against the
  sha256 recorded with its version and loaded weights-only (`ml.package.load_package`, as the
  champion's evaluation does). With no champion yet the run trains from scratch and says so.
- `from: <file:// or s3:// URI>`: copied with `fetch_uri`, then hashed and parsed from one read
  (`ml.init_weights.read_safetensors`), so the bytes checked against `model.init.sha256` are the
  bytes loaded; a mismatch is an ArtifactIntegrityError naming the key.

The weights are tried on a freshly built model here, so weights that do not fit (shapes, strict
keys) fail the run before any training starts.

Decision on preprocessing: a warm start from the champion REUSES the champion's standardizer
instead of fitting a new one on this run's training split. The champion's weights were learned
on inputs scaled by it; a refitted mean and scale would shift every input the first layer sees
and throw part of the warm start away. The candidate's manifest then carries that standardizer,
so serving scales inputs exactly as training did. A champion trained on other feature columns is
refused (its first layer would read the wrong columns). A safetensors file carries no
preprocessing, so a URI start uses the standardizer fitted on this run's data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import torch

from domain import entities as e
from domain.errors import InvalidInputError
from domain.spec import PipelineSpec
from flows.context import FlowContext
from ml.data import PreparedData, RegressionTable, Table, TensorSplit
from ml.init_weights import InitReport, apply_init, float_state_dict, read_safetensors
from ml.package import load_package, target_standardizer_of
from ml.standardizer import Standardizer, TargetStandardizer
from ml.zoo import build_for_spec
from storage.artifacts.fetch import fetch_uri


@dataclass(frozen=True)
class StartingWeights:
    """The verified state to load (None: from scratch), what the record says, and the champion's
    standardizer when its preprocessing is reused."""

    state: dict[str, torch.Tensor] | None
    report: InitReport
    standardizer: Standardizer | None = None
    feature_names: list[str] | None = None
    target_standardizer: TargetStandardizer | None = None  # a regression champion's: its head predicts in its scale

    def load_into(self, model: torch.nn.Module, spec: PipelineSpec) -> InitReport:
        if self.state is None or spec.model.init is None:
            return self.report
        return apply_init(model, self.state, strict=spec.model.init.strict, report=self.report)


def resolve_starting_weights(
    ctx: FlowContext, spec: PipelineSpec, champion: e.ModelVersion | None, workdir: Path
) -> StartingWeights:
    init = spec.model.init
    if init is None:
        return StartingWeights(None, InitReport("scratch"))
    folder = workdir / "init"
    if init.from_ == "champion":
        if champion is None:
            return StartingWeights(None, InitReport("champion", note="no champion yet: trained from scratch"))
        path = ctx.champion_package(champion, workdir)
        model, standardizer = load_package(path, champion.manifest, champion.sha256)
        variant = str(champion.manifest.get("variant", "none"))
        state = float_state_dict(model, variant, source=f"champion v{champion.version}")
        report = InitReport("champion", sha256=champion.sha256, champion_version=champion.version)
        names = champion.manifest.get("feature_names")
        start = StartingWeights(
            state,
            report,
            standardizer,
            list(names) if names is not None else None,
            target_standardizer_of(champion.manifest, source=f"champion v{champion.version}"),
        )
    else:
        assert init.sha256 is not None  # the spec refuses a URI without one
        dest = folder / PurePosixPath(urlsplit(init.from_).path).name
        fetch_uri(init.from_, dest, ctx.settings)
        state = read_safetensors(dest, init.sha256, source=init.from_)
        start = StartingWeights(state, InitReport(init.from_, sha256=init.sha256.lower()))
    trial = build_for_spec(spec)
    return replace(start, report=start.load_into(trial, spec))


def with_champion_preprocessing(
    start: StartingWeights, data: PreparedData, table: Table | RegressionTable
) -> PreparedData:
    """`data` re-scaled with the champion's standardizer, and a regression champion's targets with its
    target standardizer (see the module docstring); as is otherwise."""
    if start.standardizer is None:
        return data
    if start.feature_names is not None and start.feature_names != data.feature_names:
        raise InvalidInputError(
            f"model.init.from: champion v{start.report.champion_version} was trained on features "
            f"{start.feature_names} but this data has {data.feature_names}; align data.columns with the "
            "champion's, or remove model.init to train from scratch"
        )
    standardizer, scaler = start.standardizer, start.target_standardizer

    def rescaled(split: TensorSplit) -> TensorSplit:
        features = standardizer.transform(table.features[split.indices])
        labels = split.labels
        if scaler is not None and isinstance(table, RegressionTable):
            targets = np.asarray(table.targets, dtype=np.float32).reshape(table.num_rows, -1)[split.indices]
            labels = torch.from_numpy(np.ascontiguousarray(scaler.transform(targets), dtype=np.float32))
        return replace(
            split, features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), labels=labels
        )

    return replace(
        data,
        train=rescaled(data.train),
        validation=rescaled(data.validation),
        test=rescaled(data.test),
        standardizer=standardizer,
        target_standardizer=scaler if scaler is not None else data.target_standardizer,
    )
