"""The training loop on tiny in-memory data: exact resume after SIGKILL, accumulation, schedules,
early stopping, NaN refusal, OOM back-off, mixed precision on CPU, DDP with 2 gloo processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from domain.errors import TrainingError
from domain.spec import PipelineSpec, parse_spec
from ml.param_groups import parameter_groups
from ml.training import TrainingData, TrainProgress, lr_multiplier, seed_everything, train
from ml.zoo import build_model

ROOT = Path(__file__).resolve().parents[2]


def make_spec(**hyper: Any) -> PipelineSpec:
    hardware = hyper.pop("hardware", {"device": "cpu", "precision": "fp32"})
    distributed = hyper.pop("distributed", {"strategy": "none", "num_workers": 1})
    document = {
        "name": "tiny",
        "dataset": "tiny",
        "data": {"seed": 3},
        "model": {
            "architecture": "mlp",
            "params": {"hidden_sizes": [16], "dropout": 0.2},
            "input_shape": [8],
            "output_classes": 3,
        },
        "hyperparameters": {
            "optimizer": "adamw",
            "learning_rate": 0.01,
            "weight_decay": 0.01,
            "batch_size": 16,
            "epochs": 3,
            **hyper,
        },
        "hardware": hardware,
        "distributed": distributed,
    }
    return parse_spec(document, source="test")


def make_data(n: int = 100, seed: int = 0) -> TrainingData:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n + 40, 8, generator=generator)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 1).long()
    return TrainingData(features[:n], labels[:n], features[n:], labels[n:])


def fresh_model(spec: PipelineSpec) -> nn.Module:
    seed_everything(spec.data.seed)
    m = spec.model
    return build_model(m.architecture, dict(m.params), m.input_shape, m.output_classes)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


# ------------------------------------------------------------------ exact resume after SIGKILL

RESUME_HYPER: dict[str, Any] = {"epochs": 3, "checkpoint_every_steps": 3, "batch_size": 16}


def _killed_run(checkpoint_dir: str, kill_at_step: int) -> None:
    """Runs in a child process: trains and SIGKILLs itself mid-epoch (no cleanup, no flush)."""

    def progress(p: TrainProgress) -> None:
        if p.step == kill_at_step and p.epoch_metrics is None:
            os.kill(os.getpid(), signal.SIGKILL)

    spec = make_spec(**RESUME_HYPER)
    train(fresh_model(spec), make_data(), spec, Path(checkpoint_dir), progress=progress)


def test_a_run_killed_mid_epoch_resumes_to_exactly_the_same_weights(tmp_path: Path) -> None:
    spec = make_spec(**RESUME_HYPER)  # 100 rows / 16 = 7 steps per epoch; kill at step 11 (epoch 2)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from tests.ml.test_training import _killed_run; _killed_run({str(tmp_path / 'ck')!r}, 11)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    resumed = train(fresh_model(spec), make_data(), spec, tmp_path / "ck")
    assert resumed.resumed_from_step == 9  # the last checkpoint before the kill, mid-epoch 2

    uninterrupted = train(fresh_model(spec), make_data(), spec, tmp_path / "clean")
    assert uninterrupted.resumed_from_step is None
    assert resumed.global_steps == uninterrupted.global_steps == 21
    assert_same_weights(resumed.model, uninterrupted.model)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in uninterrupted.history]


def test_a_finished_run_resumes_to_a_no_op(tmp_path: Path) -> None:
    spec = make_spec(epochs=2)
    first = train(fresh_model(spec), make_data(), spec, tmp_path)
    again = train(fresh_model(spec), make_data(), spec, tmp_path)
    assert again.resumed_from_step == first.global_steps
    assert_same_weights(first.model, again.model)


# ------------------------------------------------------------------------------- the step


def test_accumulation_matches_one_big_batch() -> None:
    def run(batch: int, accumulation: int) -> nn.Module:
        spec = make_spec(batch_size=batch, gradient_accumulation_steps=accumulation, epochs=2)
        spec = spec.model_copy(
            update={"model": spec.model.model_copy(update={"params": {"hidden_sizes": [16], "dropout": 0.0}})}
        )
        import tempfile

        return train(fresh_model(spec), make_data(), spec, Path(tempfile.mkdtemp())).model

    big, accumulated = run(32, 1), run(8, 4)
    for (name, a), (_, b) in zip(big.state_dict().items(), accumulated.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_weight_decay_spares_biases_and_norm_weights() -> None:
    model = build_model("mlp", {"hidden_sizes": [16]}, [8], 3)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("bias") for n in spared) and any("net.1" in n for n in spared)  # net.1 = LayerNorm


def test_cosine_warm_restarts_and_warmup_follow_the_global_step() -> None:
    spec = make_spec(lr_schedule={"type": "cosine_warm_restarts", "t0": 2, "t_mult": 2, "warmup_steps": 0})
    factor = lr_multiplier(spec.hyperparameters, steps_per_epoch=10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(0.5)  # halfway through the first 2-epoch cycle
    assert factor(20) == pytest.approx(1.0)  # restart
    assert factor(40) == pytest.approx(0.5)  # the second cycle lasts 4 epochs
    warm = lr_multiplier(make_spec(lr_schedule={"type": "linear_warmup", "warmup_steps": 4}).hyperparameters, 10)
    assert [warm(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    step = lr_multiplier(make_spec(lr_schedule={"type": "step", "step_size": 1, "gamma": 0.5}).hyperparameters, 10)
    assert (step(9), step(10), step(25)) == pytest.approx((1.0, 0.5, 0.25))


def test_progress_reports_every_step_and_each_epoch(tmp_path: Path) -> None:
    seen: list[TrainProgress] = []
    spec = make_spec(epochs=2)
    result = train(fresh_model(spec), make_data(), spec, tmp_path, progress=seen.append)
    steps = [p.step for p in seen if p.epoch_metrics is None]
    assert steps == list(range(1, 15))
    epoch_ends = [p.epoch_metrics for p in seen if p.epoch_metrics is not None]
    assert [m.epoch for m in epoch_ends] == [1, 2] and epoch_ends == result.history
    assert all(m.val_loss is not None and m.samples_per_second > 0 for m in result.history)


# ------------------------------------------------------------------------- failing safely


def test_nan_loss_stops_the_run_and_yields_no_model(tmp_path: Path) -> None:
    data = make_data()
    poisoned = data.train_features.clone()
    poisoned[5, 0] = float("nan")
    spec = make_spec()
    with pytest.raises(TrainingError) as info:
        train(
            fresh_model(spec),
            TrainingData(poisoned, data.train_labels, data.val_features, data.val_labels),
            spec,
            tmp_path,
        )
    assert info.value.code == "training_failed" and "loss became nan" in str(info.value)


def test_out_of_memory_halves_the_micro_batch_keeping_the_effective_batch(tmp_path: Path) -> None:
    class Fussy(nn.Module):
        """Pretends that more than 8 rows do not fit in memory."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 8 and self.training:
                raise torch.OutOfMemoryError("simulated CUDA out of memory")
            return self.inner(x)  # type: ignore[no-any-return]

    spec = make_spec(batch_size=32, epochs=1)
    result = train(Fussy(fresh_model(spec)), make_data(), spec, tmp_path)
    assert (result.micro_batch_size, result.gradient_accumulation_steps) == (8, 4)
    assert any("out of memory" in w for w in result.warnings)


# ------------------------------------------------------------------ early stopping, precision


def test_early_stopping_restores_the_best_weights(tmp_path: Path) -> None:
    data = make_data()
    noisy_val = TrainingData(
        data.train_features,
        data.train_labels,
        data.val_features,
        torch.randint(0, 3, (len(data.val_labels),), generator=torch.Generator().manual_seed(1)),
    )
    spec = make_spec(epochs=30, learning_rate=0.05, early_stopping={"monitor": "val_loss", "patience": 2})
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model = fresh_model(spec)

    def keep(p: TrainProgress) -> None:
        if p.epoch_metrics is not None:
            snapshots[p.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = train(model, noisy_val, spec, tmp_path, progress=keep)
    losses = [h.val_loss for h in result.history]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    assert result.stopped_early and len(result.history) == result.best_epoch + 2
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, hardware={"device": "cpu", "precision": "bf16"})
    result = train(fresh_model(spec), make_data(), spec, tmp_path)
    assert result.precision == "bf16" and np.isfinite(result.history[0].train_loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp16_without_cuda_falls_back_to_fp32_with_a_warning(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, hardware={"device": "auto", "precision": "fp16"})
    result = train(fresh_model(spec), make_data(), spec, tmp_path)
    assert result.precision == "fp32" and any("fp16 needs CUDA" in w for w in result.warnings)


# ------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_with_two_gloo_processes(tmp_path: Path) -> None:
    from ml.ddp_worker import WorkerInputs

    spec = make_spec(epochs=2, distributed={"strategy": "ddp", "num_workers": 2})
    inputs = WorkerInputs(tmp_path / "job", tmp_path / "ck")
    inputs.write(spec, make_data())
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            *inputs.worker_args(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(inputs.result.read_text())
    assert summary["world_size"] == 2 and len(summary["history"]) == 2
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]
    from safetensors.torch import load_file

    weights = load_file(str(inputs.weights))
    model = fresh_model(spec)
    model.load_state_dict(weights)
    assert (tmp_path / "ck" / "last.pt").exists()
