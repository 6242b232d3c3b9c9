"""Entry point for DDP training under torchrun (`distributed.strategy: ddp`).

    torchrun --nproc_per_node 2 -m ml.ddp_worker --spec SPEC.yaml --data DATA.npz \\
        --checkpoint-dir DIR --output MODEL.safetensors

DATA.npz holds train_features, train_labels, val_features, val_labels (already prepared).
Every rank builds the same model from the same seed (DistributedDataParallel also broadcasts
rank 0's weights), trains its shard of each effective batch, and rank 0 writes the weights
(safetensors) and the metrics history (OUTPUT with `.json`). gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from domain.spec import load_spec
from ml.losses import Objective
from ml.training import TrainingData, resolve_device, seed_everything, train
from ml.zoo import build_for_spec, constructor_problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    spec = load_spec(args.spec, constructor_problems)
    device = resolve_device(spec.hardware.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        arrays = np.load(args.data)
        data = TrainingData(
            *(
                torch.from_numpy(arrays[name])
                for name in ("train_features", "train_labels", "val_features", "val_labels")
            )
        )
        seed_everything(spec.data.seed)
        model = build_for_spec(spec)
        result = train(model, data, spec, args.checkpoint_dir, objective=Objective.for_spec(spec))
        if dist.get_rank() == 0:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            save_file(state, str(args.output))
            summary = {"world_size": dist.get_world_size(), "history": result.history_dicts()}
            args.output.with_suffix(".json").write_text(json.dumps(summary))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
