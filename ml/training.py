"""The training loop: `train(model, data, spec, checkpoint_dir, resume=True) -> TrainResult`.

What an ML engineer expects from it, and why it is built this way:

- **Exact resume.** Batch order is a pure function of (seed, epoch) and the learning rate a
  pure function of the global step, so a checkpoint only needs the position, the optimiser,
  scheduler and scaler states and the RNG states. A run killed mid-epoch and resumed from its
  last checkpoint ends with exactly the weights of a run never interrupted (tested on CPU).
- **Effective batch is the unit.** `batch_size x gradient_accumulation_steps` samples make one
  optimiser step; each micro-batch's loss is weighted by its share of the step, so the step is
  the mean over the effective batch however it is split. On CUDA out-of-memory the micro-batch
  halves and accumulation doubles, and the same effective batch is retried.
- **Weight decay** (decoupled for AdamW) is applied to weight matrices only: biases and
  normalisation weights (every parameter with fewer than two dimensions) are exempt.
  `model.freeze` and `hyperparameters.param_groups` (frozen prefixes; per-group lr_scale and
  weight_decay) are applied before the optimizer is built: see `ml/param_groups.py`.
- **Your own parts.** An optimizer class by import path, callbacks (step/epoch events: they may
  stop the run and add metrics, nothing else) and gradient checkpointing: see `ml/callbacks.py`.
- **Schedules** (cosine warm restarts and step, in epochs; linear warm-up, in steps) are one
  LambdaLR over the global step, with fractional epochs, so they are exact under resume.
- **Fail loudly.** A NaN or infinite loss stops the run with TrainingError; it never yields a
  model. Early stopping restores the best weights.
- **Either task.** An `Objective` (`ml/losses.py`) says classification (int64 class ids [N],
  `val_accuracy`) or regression (float targets [N, outputs], `val_rmse` and `val_mae` in the
  target's units when `TrainingData.target_standardizer` is given); its `monitor` picks the best
  epoch. Without one, the spec's hyperparameters give today's classification objective.
- **DDP.** Under torchrun (`distributed.strategy: ddp`) each rank takes an interleaved shard of
  every effective batch; gradients are averaged by DistributedDataParallel (gloo on CPU, NCCL
  on CUDA); rank 0 alone writes checkpoints. See `ml/ddp_worker.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from domain.errors import InvalidInputError, TrainingError
from domain.spec import HyperparametersSpec, PipelineSpec
from ml.callbacks import Callbacks, enable_gradient_checkpointing, make_optimizer
from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.losses import Objective
from ml.param_groups import count_parameters, freeze_parameters, parameter_groups
from ml.standardizer import TargetStandardizer


@dataclass(frozen=True, slots=True)
class TrainingData:
    """Tensors for training (already split and scaled): features NxF float32; labels int64 [N] class
    ids, or for regression float32 targets [N, outputs] standardised by `target_standardizer`, which
    maps them back to the target's units for `val_rmse` / `val_mae` (None: the metrics are in the
    units the targets are given in)."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    target_standardizer: TargetStandardizer | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float
    seconds: float
    samples_per_second: float
    val_rmse: float | None = None
    val_mae: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # metrics added by callbacks (ml/callbacks.py)

    def monitored(self, name: str) -> float | None:
        """The value of a validation metric by its name (`Objective.monitor`)."""
        values = {
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "val_rmse": self.val_rmse,
            "val_mae": self.val_mae,
        }
        return values[name]


@dataclass(frozen=True, slots=True)
class TrainProgress:
    """What a progress bar needs; `epoch_metrics` is set on the last call of each epoch."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    epoch_metrics: EpochMetrics | None = None


ProgressCallback = Callable[[TrainProgress], None]
CheckpointCallback = Callable[[Path, int], None]
"""Called with (checkpoint file, global step) after each checkpoint is written, e.g. to copy it
to the artifact store so that a retry on another machine can resume."""


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module
    history: list[EpochMetrics]
    best_epoch: int
    stopped_early: bool
    global_steps: int
    resumed_from_step: int | None
    device: str
    precision: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    warnings: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    frozen_parameters: int = 0
    world_size: int = 1  # processes that trained it (DDP ranks)

    def history_dicts(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.history]


# ------------------------------------------------------------------------------ set-up


def seed_everything(seed: int) -> None:
    """Seeds every RNG a model build or a training step may draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"hardware.device is {requested!r} but no CUDA device is available; use auto or cpu")
    return device


def _precision(requested: str, device: torch.device, notes: list[str]) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if requested == "fp32":
        return None, False
    if requested == "bf16":
        return torch.bfloat16, False
    if device.type == "cuda":
        return torch.float16, True
    notes.append("precision fp16 needs CUDA; trained in fp32 on CPU (documented fallback for device: auto)")
    return None, False


def build_optimizer(model: nn.Module, hp: HyperparametersSpec) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, one group per (param group, decay rule)."""
    groups = parameter_groups(model, hp.weight_decay, hp.param_groups)
    for group in groups:
        group["lr"] = hp.learning_rate * group["lr_scale"]
    return make_optimizer(groups, hp)  # a built-in or one by import path (ml/callbacks.py)


def lr_multiplier(hp: HyperparametersSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor as a pure function of the global optimiser step."""
    schedule = hp.lr_schedule
    eta_ratio = schedule.eta_min / hp.learning_rate

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / schedule.warmup_steps) if schedule.warmup_steps else 1.0
        epoch = step / steps_per_epoch
        if schedule.type == "cosine_warm_restarts":
            period, start = float(schedule.t0), 0.0
            while epoch >= start + period:  # find the current restart cycle
                start += period
                period *= schedule.t_mult
            progress = (epoch - start) / period
            return warm * (eta_ratio + (1 - eta_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if schedule.type == "step":
            return warm * schedule.gamma ** math.floor(epoch / schedule.step_size)
        return warm  # "linear_warmup" and "none"

    return factor


# ---------------------------------------------------------------------------- the loop


class _Trainer:
    def __init__(
        self,
        model: nn.Module,
        data: TrainingData,
        spec: PipelineSpec,
        checkpoint_dir: Path,
        progress: ProgressCallback | None,
        on_checkpoint: CheckpointCallback | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.spec, self.hp = spec, spec.hyperparameters
        self.objective = objective or Objective.from_hyperparameters(self.hp)
        self.objective.check_targets(data.train_labels, "training targets")
        self.objective.check_targets(data.val_labels, "validation targets")
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.on_checkpoint = on_checkpoint
        self.notes: list[str] = []
        self.device = resolve_device(spec.hardware.device)
        self.autocast_dtype, use_scaler = _precision(spec.hardware.precision, self.device, self.notes)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

        self.model = model.to(self.device)
        freeze_parameters(self.model, spec.model.freeze)
        if spec.hardware.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.callbacks = Callbacks(self.hp.callbacks)
        self.data = data
        n = len(data.train_labels)
        if n == 0:
            raise InvalidInputError("training split is empty; add rows or lower the validation/test fractions")
        self.effective_batch = self.hp.batch_size * self.hp.gradient_accumulation_steps
        self.micro_batch = self.hp.batch_size
        self.accumulation = self.hp.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(n / self.effective_batch)
        self.optimizer = build_optimizer(self.model, self.hp)
        self.lr_factor = lr_multiplier(self.hp, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.loss_fn = self.objective.build_loss()
        self.ddp: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world > 1
            else self.model
        )

        # position and early-stopping state (all of it goes into the checkpoint)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[EpochMetrics] = []
        self.best_score: float | None = None
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0
        self.epoch_started = time.perf_counter()

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "history": [asdict(m) for m in self.history],
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_samples": self.epoch_samples,
            "callbacks": self.callbacks.state_dict(),
            "stop_requested": self.callbacks.control.stop_requested,
        }

    def checkpoint(self) -> None:
        if self.rank == 0:
            path = save_checkpoint(self.state(), self.checkpoint_dir)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, self.global_step)

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.micro_batch, self.accumulation = int(state["micro_batch"]), int(state["accumulation"])
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.best_score, self.best_epoch = state["best_score"], int(state["best_epoch"])
        self.best_state, self.bad_epochs = state["best_state"], int(state["bad_epochs"])
        self.epoch_loss_sum, self.epoch_samples = float(state["epoch_loss_sum"]), int(state["epoch_samples"])
        self.callbacks.load_state_dict(state.get("callbacks", []))
        self.callbacks.control.stop_requested = bool(state.get("stop_requested", False))

    # -- batches ----------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.spec.data.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train_labels), generator=generator)

    def effective_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """(this rank's share of each effective batch, the smallest share any rank gets)."""
        order = self.epoch_order(epoch)
        for start in range(0, len(order), self.effective_batch):
            chunk = order[start : start + self.effective_batch]
            if self.world == 1:
                yield chunk, len(chunk)
            elif len(chunk) >= self.world:  # else every rank skips it alike: none may wait for a partner
                yield chunk[self.rank :: self.world], len(chunk) // self.world

    def micro_batches(self, shard: torch.Tensor, smallest_shard: int) -> list[torch.Tensor]:
        """Splits a shard into micro-batches; every rank gets the same number (DDP needs it)."""
        parts = max(1, min(smallest_shard, math.ceil(smallest_shard / self.micro_batch)))
        return list(torch.tensor_split(shard, parts))

    # -- one optimiser step -----------------------------------------------------------------
    def optimizer_step(self, indices: torch.Tensor, smallest_shard: int) -> float:
        """Forward/backward over the micro-batches of one effective batch, then one step.
        Returns the mean loss over the effective batch."""
        while True:
            try:
                return self._try_step(indices, smallest_shard)
            except torch.OutOfMemoryError as e:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro_batch == 1:
                    raise TrainingError("out of memory even at micro-batch 1; use a smaller model or device") from e
                self.micro_batch = max(1, self.micro_batch // 2)
                self.accumulation *= 2
                self.notes.append(
                    f"out of memory at step {self.global_step}: micro-batch {self.micro_batch}, "
                    f"accumulation {self.accumulation} (effective batch unchanged)"
                )

    def _try_step(self, indices: torch.Tensor, smallest_shard: int) -> float:
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.micro_batches(indices, smallest_shard)
        total_loss = 0.0
        for i, part in enumerate(parts):
            features = self.data.train_features[part].to(self.device, non_blocking=True)
            labels = self.data.train_labels[part].to(self.device, non_blocking=True)
            sync = contextlib.nullcontext() if i == len(parts) - 1 or self.world == 1 else self.ddp.no_sync()  # type: ignore[operator]
            with sync, self._autocast():
                loss = self.loss_fn(self.ddp(features), labels)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.global_step + 1}; "
                    "the run is stopped and yields no model (lower hyperparameters.learning_rate, "
                    "set gradient_clip_norm, or check the data for extreme values)"
                )
            weighted = loss * (len(part) / len(indices))
            with sync:
                self.scaler.scale(weighted).backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            total_loss += float(weighted.detach())
        if self.hp.gradient_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.gradient_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total_loss

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- validation and early stopping ------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """The validation metrics of the task by name (empty without validation rows)."""
        n = len(self.data.val_labels)
        if n == 0:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        with torch.inference_mode():
            for start in range(0, n, 1024):
                features = self.data.val_features[start : start + 1024].to(self.device)
                labels = self.data.val_labels[start : start + 1024].to(self.device)
                with self._autocast():
                    outputs = self.model(features).float()
                batch = {"val_loss": self._validation_loss(outputs, labels), **self._metric_sums(outputs, labels)}
                for name, value in batch.items():
                    sums[name] = sums.get(name, 0.0) + value
        if self.objective.task == "classification":
            return {"val_loss": sums["val_loss"] / n, "val_accuracy": sums["correct"] / n}
        elements = n * int(self.data.val_labels.shape[1])
        return {
            "val_loss": sums["val_loss"] / n,
            "val_rmse": math.sqrt(sums["squared_error"] / elements),
            "val_mae": sums["absolute_error"] / elements,
        }

    def _metric_sums(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One batch's sums behind the task's metrics; regression errors in the target's units."""
        if self.objective.task == "classification":
            return {"correct": float((outputs.argmax(dim=1) == labels).sum())}
        scaler = self.data.target_standardizer
        if scaler is not None:
            outputs, labels = scaler.inverse_tensor(outputs), scaler.inverse_tensor(labels)
        error = (outputs - labels).double()
        return {"squared_error": float(error.square().sum()), "absolute_error": float(error.abs().sum())}

    def _validation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """The batch's summed loss: cross-entropy without smoothing for the default loss (the figure
        runs have always recorded), else the objective's own loss (mean-reduced) times the batch size;
        for regression that is in the units the model is trained on (standardised targets)."""
        if self.objective.loss == "cross_entropy":
            return float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return float(self.loss_fn(logits, labels)) * len(labels)

    def improved(self, metrics: EpochMetrics) -> bool:
        """Updates the best-so-far; True when this epoch is the new best."""
        stopping = self.hp.early_stopping
        value = metrics.monitored(self.objective.monitor)
        if value is None:
            return False
        score = value if self.objective.higher_is_better else -value  # higher is better from here on
        min_delta = stopping.min_delta if stopping else 0.0
        if self.best_score is None or score > self.best_score + min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, metrics.epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return True
        self.bad_epochs += 1
        return False

    # -- run --------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        resumed_from: int | None = None
        if resume:
            state = load_checkpoint(self.checkpoint_dir)
            if state is not None:
                self.restore(state)
                resumed_from = self.global_step
        epochs = self.hp.epochs
        total_steps = epochs * self.steps_per_epoch
        stopped_early = self._should_stop()
        every = self.hp.checkpoint_every_steps
        while self.epoch < epochs and not stopped_early:
            if self.step_in_epoch == 0:
                self.epoch_loss_sum, self.epoch_samples, self.epoch_started = 0.0, 0, time.perf_counter()
            for index, (batch, smallest_shard) in enumerate(self.effective_batches(self.epoch)):
                if index < self.step_in_epoch:
                    continue  # done before the checkpoint we resumed from
                loss = self.optimizer_step(batch, smallest_shard)
                self.epoch_loss_sum += loss * len(batch)
                self.epoch_samples += len(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                self.callbacks.step_end(self.epoch + 1, self.step_in_epoch, self.global_step, loss)
                if self.progress is not None and self.rank == 0:
                    self.progress(TrainProgress(self.epoch + 1, epochs, self.global_step, total_steps, loss))
                # the epoch-end checkpoint follows the last step anyway: one checkpoint per step
                if every is not None and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self.checkpoint()
            metrics = self.finish_epoch()
            self.epoch += 1
            self.step_in_epoch = 0
            stopped_early = self._should_stop()
            self.checkpoint()
            if self.progress is not None and self.rank == 0:
                self.progress(
                    TrainProgress(self.epoch, epochs, self.global_step, total_steps, metrics.train_loss, metrics)
                )
        if self.hp.early_stopping is not None and self.best_state is not None:
            self.model.load_state_dict(self.best_state)  # early stopping restores the best weights
        best_epoch = self.best_epoch if self.best_epoch >= 0 else self.epoch
        counts = count_parameters(self.model)
        return TrainResult(
            model=self.model,
            history=list(self.history),
            best_epoch=best_epoch,
            stopped_early=stopped_early and self.epoch < epochs,
            global_steps=self.global_step,
            resumed_from_step=resumed_from,
            device=str(self.device),
            precision="fp32" if self.autocast_dtype is None else self.spec.hardware.precision,
            micro_batch_size=self.micro_batch,
            gradient_accumulation_steps=self.accumulation,
            warnings=list(self.notes),
            trainable_parameters=counts.trainable,
            frozen_parameters=counts.frozen,
            world_size=self.world,
        )

    def _should_stop(self) -> bool:
        """Early stopping's patience is spent, or a callback asked (on any rank, under DDP)."""
        requested = self.callbacks.control.stop_requested
        if self.world > 1:
            flag = torch.tensor([int(requested)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        patience = self.hp.early_stopping.patience if self.hp.early_stopping is not None else None
        return requested or (patience is not None and self.bad_epochs >= patience)

    def finish_epoch(self) -> EpochMetrics:
        seconds = time.perf_counter() - self.epoch_started
        validation = self.validate()
        metrics = EpochMetrics(
            epoch=self.epoch + 1,
            train_loss=self.epoch_loss_sum / max(1, self.epoch_samples),
            val_loss=validation.get("val_loss"),
            val_accuracy=validation.get("val_accuracy"),
            # the base rate (what a group of lr_scale 1 gets); the first group may be a scaled one
            learning_rate=self.hp.learning_rate * self.lr_factor(self.scheduler.last_epoch),
            seconds=seconds,
            samples_per_second=self.epoch_samples / seconds if seconds > 0 else 0.0,
            val_rmse=validation.get("val_rmse"),
            val_mae=validation.get("val_mae"),
        )
        self.callbacks.epoch_end(metrics, metrics.extra)
        self.history.append(metrics)
        self.improved(metrics)
        return metrics


def train(
    model: nn.Module,
    data: TrainingData,
    spec: PipelineSpec,
    checkpoint_dir: Path,
    resume: bool = True,
    progress: ProgressCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Trains `model` in place on `data` as the spec says, checkpointing into `checkpoint_dir`.

    `objective` (the task, loss and monitored metric) defaults to the spec's classification
    objective, `Objective.from_hyperparameters(spec.hyperparameters)`.
    With `resume=True` a checkpoint found there is continued exactly where it stopped.
    Raises TrainingError for a NaN/inf loss (no model is returned) and InvalidInputError for
    unusable inputs.
    """
    if len(data.train_features) != len(data.train_labels) or len(data.val_features) != len(data.val_labels):
        raise InvalidInputError("features and labels differ in length; prepare the data with ml.data.prepare")
    with warnings.catch_warnings():
        # LambdaLR warns when the first lr is read before optimizer.step(); our order is deliberate.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
        return _Trainer(model, data, spec, checkpoint_dir, progress, on_checkpoint, objective).run(resume)
