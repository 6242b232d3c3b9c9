"""Entry point for DDP training under torchrun (`distributed.strategy: ddp`), and its file formats.

    torchrun --nproc-per-node 2 -m ml.ddp_worker --inputs DIR --checkpoint-dir CHECKPOINTS

The pipeline's train task launches it (flows/distributed.py); `WorkerInputs.write` prepares DIR:
`spec.json`, `data.npz` (train/val features and labels, already prepared), optionally `init.safetensors`
(the verified starting weights) and `target_standardizer.json` (regression); a stored checkpoint to
resume from is put in CHECKPOINTS as `last.pt`. Every rank builds the same model from the
same seed (DistributedDataParallel also broadcasts rank 0's weights) and trains its shard of each
effective batch with the spec's objective (`Objective.for_spec`). gloo on CPU, NCCL on CUDA (one
device per local rank).

Rank 0 tells the launcher what happens with one JSON object per stdout line, keyed by `EVENT`:
`progress` (a `TrainProgress`), `checkpoint` (a snapshot of `last.pt` under `CHECKPOINTS/outbox/`,
hard-linked so that the next checkpoint cannot overwrite it before it is uploaded), and at the end
writes `model.safetensors` (the trained float weights) and `result.json` (`summary_of`) into DIR. Any rank
that fails with a RetrainerError says so first (`error`, with its code and whether a retry can help).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from domain.errors import RetrainerError
from domain.spec import PipelineSpec, load_spec
from ml.init_weights import InitReport, apply_init
from ml.losses import Objective
from ml.standardizer import TargetStandardizer
from ml.training import EpochMetrics, TrainingData, TrainProgress, TrainResult, resolve_device, seed_everything, train
from ml.zoo import build_for_spec, constructor_problems

EVENT = "retrainer_ddp"
_ARRAYS = ("train_features", "train_labels", "val_features", "val_labels")


@dataclass(frozen=True)
class WorkerInputs:
    """The files one DDP job reads and writes: inputs and results in `folder`, checkpoints in `checkpoint_dir`."""

    folder: Path
    checkpoint_dir: Path

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def result(self) -> Path:
        return self.folder / "result.json"

    def worker_args(self) -> list[str]:
        """What follows torchrun's own options to run this job's ranks."""
        return ["-m", "ml.ddp_worker", "--inputs", str(self.folder), "--checkpoint-dir", str(self.checkpoint_dir)]

    def write(
        self,
        spec: PipelineSpec,
        data: TrainingData,
        init_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Everything a rank needs; `init_state` is loaded (with `model.init.strict`) before training."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "spec.json").write_text(json.dumps(spec.to_document()))
        np.savez(self.folder / "data.npz", **{name: getattr(data, name).numpy() for name in _ARRAYS})
        if init_state is not None:
            save_file(_plain(init_state), str(self.folder / "init.safetensors"))
        if data.target_standardizer is not None:
            (self.folder / "target_standardizer.json").write_text(json.dumps(data.target_standardizer.to_dict()))

    def read(self) -> tuple[PipelineSpec, TrainingData, dict[str, torch.Tensor] | None]:
        spec = load_spec(self.folder / "spec.json", constructor_problems)
        arrays = np.load(self.folder / "data.npz")
        scaler_file = self.folder / "target_standardizer.json"
        scaler = (
            TargetStandardizer.from_dict(json.loads(scaler_file.read_text()), source=str(scaler_file))
            if scaler_file.is_file()
            else None
        )
        data = TrainingData(*(torch.from_numpy(arrays[name]) for name in _ARRAYS), target_standardizer=scaler)
        init_file = self.folder / "init.safetensors"
        return spec, data, load_file(str(init_file)) if init_file.is_file() else None


def summary_of(result: TrainResult) -> dict[str, Any]:
    """A TrainResult without its model, JSON-safe (`result_from_summary` reverses it)."""
    plain = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("model", "history")}
    return {**plain, "history": result.history_dicts()}


def result_from_summary(summary: dict[str, Any], model: nn.Module) -> TrainResult:
    history = [EpochMetrics(**m) for m in summary["history"]]
    return TrainResult(model=model, **{**summary, "history": history})


def progress_event(p: TrainProgress) -> dict[str, Any]:
    return {EVENT: "progress", **asdict(p)}


def progress_from_event(event: dict[str, Any]) -> TrainProgress:
    values = {k: v for k, v in event.items() if k != EVENT}
    metrics = values.pop("epoch_metrics")
    return TrainProgress(**values, epoch_metrics=None if metrics is None else EpochMetrics(**metrics))


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights); a copy of each is what loads back
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def _say(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _snapshot(path: Path, step: int) -> None:
    """Links `last.pt` under outbox/ and tells the launcher to upload it (rank 0 only)."""
    outbox = path.parent / "outbox"
    outbox.mkdir(exist_ok=True)
    snapshot = outbox / f"step-{step:09d}.pt"
    snapshot.unlink(missing_ok=True)
    try:
        os.link(path, snapshot)  # the next save renames a new file over last.pt; this inode stays
    except OSError:
        shutil.copy2(path, snapshot)
    _say({EVENT: "checkpoint", "path": str(snapshot), "step": step})


def _train(inputs: WorkerInputs) -> None:
    spec, data, init_state = inputs.read()
    device = resolve_device(spec.hardware.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # every rank on its own device, whatever index the spec names
        spec = spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"device": f"cuda:{local_rank}"})})
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        rank = dist.get_rank()
        seed_everything(spec.data.seed)
        model = build_for_spec(spec)
        if init_state is not None and spec.model.init is not None:
            apply_init(model, init_state, strict=spec.model.init.strict, report=InitReport("init.safetensors"))
        result = train(
            model,
            data,
            spec,
            inputs.checkpoint_dir,
            resume=True,
            progress=lambda p: _say(progress_event(p)),
            on_checkpoint=_snapshot if rank == 0 else None,
            objective=Objective.for_spec(spec),
        )
        if rank == 0:
            save_file(_plain(result.model.state_dict()), str(inputs.weights))
            inputs.result.write_text(json.dumps(summary_of(result)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@record  # torchrun's failure summary then carries this rank's traceback
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, required=True, help="the folder WorkerInputs.write prepared")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="where last.pt is resumed and written")
    args = parser.parse_args(argv)
    try:
        _train(WorkerInputs(args.inputs, args.checkpoint_dir))
    except RetrainerError as error:
        rank = int(os.environ.get("RANK", "0"))
        _say({EVENT: "error", "rank": rank, "code": error.code, "retryable": error.retryable, "message": str(error)})
        raise


if __name__ == "__main__":
    main()
