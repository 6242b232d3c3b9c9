"""Training parts by import path (ml/callbacks.py): a custom optimizer with its params resumes
exactly after SIGKILL, callbacks stop the run and add metrics, a raising callback fails the run
naming it, gradient checkpointing matches plain backward, and bad paths are validator lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from domain.errors import InvalidInputError, SpecError, TrainingError
from flows.registry import validate_spec_file
from ml.callbacks import EpochEvent, StepEvent
from ml.training import TrainProgress, seed_everything, train
from ml.zoo import build_model
from tests.ml.test_training import ROOT, assert_same_weights, fresh_model, make_data, make_spec


class SignSGD(torch.optim.Optimizer):
    """A test optimizer with its own parameter and per-parameter state (a step counter)."""

    def __init__(self, params: Any, lr: float = 0.01, damping: float = 0.5) -> None:
        super().__init__(params, {"lr": lr, "damping": damping})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure support
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["t"] = state.get("t", 0) + 1
                p.add_(p.grad.sign(), alpha=-group["lr"] * group["damping"] ** (state["t"] / 10))


class StopAfterTwoEpochs:
    def on_epoch_end(self, event: EpochEvent) -> None:
        if event.metrics.epoch == 2:
            event.request_stop()


class CountsSteps:
    """A stateful callback: its count survives resume through the checkpoint."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, event: StepEvent) -> None:
        self.steps += 1

    def on_epoch_end(self, event: EpochEvent) -> None:
        event.add_metric("steps_seen", self.steps)
        event.add_metric("double_loss", 2 * event.metrics.train_loss)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = state["steps"]


class Raises:
    def on_step_end(self, event: StepEvent) -> None:
        raise RuntimeError("boom")


HERE = "tests.ml.test_training_parts"
OPTIMIZERS = [
    ("torch.optim:RMSprop", {"alpha": 0.9, "momentum": 0.5}),
    (f"{HERE}:SignSGD", {"damping": 0.7}),
]
RESUME: dict[str, Any] = {"epochs": 3, "checkpoint_every_steps": 3, "batch_size": 16}


def _killed_run(checkpoint_dir: str, optimizer: str, params: dict[str, Any]) -> None:
    def progress(p: TrainProgress) -> None:
        if p.step == 11 and p.epoch_metrics is None:
            os.kill(os.getpid(), signal.SIGKILL)

    spec = make_spec(**RESUME, optimizer=optimizer, optimizer_params=params, callbacks=[f"{HERE}:CountsSteps"])
    train(fresh_model(spec), make_data(), spec, Path(checkpoint_dir), progress=progress)


@pytest.mark.parametrize(("optimizer", "params"), OPTIMIZERS)
def test_a_custom_optimizer_resumes_exactly_after_sigkill(
    tmp_path: Path, optimizer: str, params: dict[str, Any]
) -> None:
    spec = make_spec(**RESUME, optimizer=optimizer, optimizer_params=params, callbacks=[f"{HERE}:CountsSteps"])
    code = f"from {HERE} import _killed_run; _killed_run({str(tmp_path / 'ck')!r}, {optimizer!r}, {params!r})"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    resumed = train(fresh_model(spec), make_data(), spec, tmp_path / "ck")
    assert resumed.resumed_from_step == 9
    clean = train(fresh_model(spec), make_data(), spec, tmp_path / "clean")
    assert_same_weights(resumed.model, clean.model)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in clean.history]
    # the callback's step count came back from the checkpoint: 7 steps per epoch
    assert [h.extra["steps_seen"] for h in resumed.history] == [7.0, 14.0, 21.0]
    untouched = train(fresh_model(make_spec(**RESUME)), make_data(), make_spec(**RESUME), tmp_path / "adamw")
    assert not torch.equal(untouched.model.state_dict()["net.0.weight"], clean.model.state_dict()["net.0.weight"])


def test_optimizer_params_reach_the_optimizer(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, optimizer="torch.optim:RMSprop", optimizer_params={"alpha": 0.8, "centered": True})
    from ml.training import build_optimizer

    optimizer = build_optimizer(fresh_model(spec), spec.hyperparameters)
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert optimizer.param_groups[0]["alpha"] == 0.8 and optimizer.param_groups[0]["centered"] is True


@pytest.mark.parametrize(
    ("optimizer", "params", "key"),
    [
        ("torch.optim:RMSprop", {"alphaa": 0.9}, "hyperparameters.optimizer_params.alphaa"),
        ("adamw", {"lr": 0.1}, "hyperparameters.optimizer_params.lr"),
        (f"{HERE}:SignSGD", {"momentum": 0.9}, "hyperparameters.optimizer_params.momentum"),
        ("torch.optim:LBFGSS", {}, "hyperparameters.optimizer"),
        (f"{HERE}:Raises", {}, "hyperparameters.optimizer"),
    ],
)
def test_bad_optimizer_or_params_are_refused_naming_the_key(
    tmp_path: Path, optimizer: str, params: dict[str, Any], key: str
) -> None:
    spec = make_spec(epochs=1, optimizer=optimizer, optimizer_params=params)
    with pytest.raises(InvalidInputError) as caught:
        train(fresh_model(spec), make_data(), spec, tmp_path)
    assert caught.value.code == "invalid_input"
    assert caught.value.message.startswith(key)


def test_a_callback_requesting_a_stop_ends_the_run_after_that_epoch(tmp_path: Path) -> None:
    spec = make_spec(epochs=5, callbacks=[f"{HERE}:StopAfterTwoEpochs", f"{HERE}:CountsSteps"])
    result = train(fresh_model(spec), make_data(), spec, tmp_path)
    assert result.stopped_early and len(result.history) == 2 and result.global_steps == 14
    assert result.history[1].extra == {"steps_seen": 14.0, "double_loss": 2 * result.history[1].train_loss}
    assert result.history_dicts()[0]["extra"]["steps_seen"] == 7.0
    again = train(fresh_model(spec), make_data(), spec, tmp_path)  # the stop request is in the checkpoint
    assert again.resumed_from_step == 14 and again.global_steps == 14


def test_a_raising_callback_fails_the_run_naming_it(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, callbacks=[f"{HERE}:Raises"])
    with pytest.raises(TrainingError) as caught:
        train(fresh_model(spec), make_data(), spec, tmp_path)
    assert caught.value.code == "training_failed"
    assert f"{HERE}:Raises" in caught.value.message and "on_step_end" in caught.value.message


def _transformer_grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    seed_everything(5)
    model = build_model("transformer", {"d_model": 32, "nhead": 4, "num_layers": 2}, [12], 3)
    if checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
    model.train()
    tokens = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(1)).float()
    torch.manual_seed(9)  # same dropout masks: checkpoint() replays the RNG state on recompute
    loss = torch.nn.functional.cross_entropy(model(tokens), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_on_the_transformer_gives_the_same_loss_and_gradients() -> None:
    plain_loss, plain = _transformer_grads(False)
    ckpt_loss, ckpt = _transformer_grads(True)
    assert abs(plain_loss - ckpt_loss) <= 1e-6
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=0), name


def test_gradient_checkpointing_trains_the_transformer_through_the_spec(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, hardware={"device": "cpu", "precision": "fp32", "gradient_checkpointing": True})
    model = build_model("transformer", {"d_model": 16, "nhead": 2, "num_layers": 1}, [8], 3)
    result = train(model, make_data(), spec, tmp_path)
    assert model.gradient_checkpointing and result.global_steps == 7


def test_gradient_checkpointing_without_the_hook_is_refused_naming_the_key(tmp_path: Path) -> None:
    spec = make_spec(epochs=1, hardware={"device": "cpu", "precision": "fp32", "gradient_checkpointing": True})
    with pytest.raises(InvalidInputError) as caught:
        train(fresh_model(spec), make_data(), spec, tmp_path)  # the MLP has no gradient_checkpointing_enable
    assert caught.value.message.startswith("hardware.gradient_checkpointing: MLP has no gradient_checkpointing_enable")


def test_validator_lists_unresolvable_parts_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "parts.yaml"
    path.write_text(
        "name: parts\ndataset: parts\n"
        "model: {architecture: mlp, input_shape: [8], output_classes: 3}\n"
        "hyperparameters:\n  optimizer: torch.optim:RMSprop\n  optimizer_params: {alphaa: 0.9}\n"
        "  callbacks: ['no_such_module_x:Cb', 'tests.ml.test_training_parts:Nope']\n"
        "hardware: {gradient_checkpointing: true}\n"
    )
    with pytest.raises(SpecError) as caught:
        validate_spec_file(path)
    lines = [line.removeprefix(f"{path}: ") for line in caught.value.problems]
    assert any(line.startswith("hyperparameters.optimizer_params.alphaa: RMSprop takes no such") for line in lines)
    assert any(line.startswith("hyperparameters.callbacks[0] 'no_such_module_x:Cb': cannot import") for line in lines)
    assert any(line.startswith("hyperparameters.callbacks[1]") and "no attribute 'Nope'" in line for line in lines)
    assert any(line.startswith("hardware.gradient_checkpointing: MLP has no") for line in lines)


def test_spec_refuses_an_optimizer_that_is_neither_a_name_nor_a_path() -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(optimizer="lamb")
    assert any("hyperparameters.optimizer" in line for line in caught.value.problems)
