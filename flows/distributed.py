"""The train task's training under torchrun, when the spec says `distributed: {strategy: ddp}`.

`train_distributed` takes the same callbacks as `ml.training.train` and returns the same TrainResult,
so the task around it (checkpoint upload and resume, the progress artifact, early stopping, the
record) behaves as with one process. It writes the job's inputs (`ml.ddp_worker.WorkerInputs`), runs

    python -m torch.distributed.run --nproc-per-node N (--standalone | --nnodes … --node-rank …
        --rdzv-endpoint HOST:PORT) --tee 3 … -m ml.ddp_worker --inputs DIR --checkpoint-dir DIR

and reads its console line by line: every rank's lines come tagged `[rankR] `; rank 0's JSON events
become progress calls and checkpoint uploads, the rest is kept as each rank's last log lines. Rank 0's
weights and summary become the TrainResult. When a rank dies, the task fails with WorkerFailedError
naming the rank (torchrun's root cause), its exit code and its last log lines; a retry resumes from
the last uploaded checkpoint unless the rank's own RetrainerError said retrying cannot help.

Several machines: `nnodes`, `node_rank` and `rdzv_endpoint` come from the spec, else from
RETRAINER_DDP_NNODES, RETRAINER_DDP_NODE_RANK and RETRAINER_DDP_RDZV_ENDPOINT (domain/settings.py).
The flow's machine is node 0 (rank 0 writes the result); every other machine runs the logged worker
command with its own `--node-rank`, reading the same input folder (a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from domain.errors import ConfigurationError, InfrastructureError, InvalidInputError, WorkerFailedError
from domain.settings import Settings
from domain.spec import PipelineSpec
from ml.ddp_worker import EVENT, WorkerInputs, progress_from_event, result_from_summary
from ml.param_groups import freeze_parameters
from ml.training import CheckpointCallback, ProgressCallback, TrainingData, TrainResult, resolve_device
from ml.zoo import build_for_spec

log = logging.getLogger("retrainer.flows.distributed")
TAIL_LINES = 15
_RANK_LINE = re.compile(r"^\[rank(\d+)\] ?(.*)$")
_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_CAUSE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_STOP_GRACE_SECONDS = 10


@dataclass(frozen=True)
class Topology:
    """Where the ranks run: `nproc_per_node` processes on each of `nnodes` machines."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # empty: one machine, torchrun's standalone rendezvous on a free port

    @classmethod
    def of(cls, spec: PipelineSpec, settings: Settings) -> Topology:
        """The spec's keys, else the environment's (RETRAINER_DDP_*), else one machine."""
        ddp = spec.distributed
        topology = cls(
            ddp.num_workers,
            ddp.nnodes if ddp.nnodes is not None else settings.ddp_nnodes,
            ddp.node_rank if ddp.node_rank is not None else settings.ddp_node_rank,
            ddp.rdzv_endpoint or settings.ddp_rdzv_endpoint,
        )
        if topology.nnodes > 1 and not topology.rdzv_endpoint:
            raise ConfigurationError(
                f"distributed.nnodes is {topology.nnodes}: the machines need a place to meet; set "
                "distributed.rdzv_endpoint or RETRAINER_DDP_RDZV_ENDPOINT to node 0's HOST:PORT"
            )
        if topology.node_rank != 0:
            raise ConfigurationError(
                f"the pipeline's train task runs node 0 (rank 0 writes the model) but node_rank is "
                f"{topology.node_rank}; set it on the other machines' worker commands only"
            )
        return topology

    def torchrun(self, inputs: WorkerInputs, job_id: str) -> list[str]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc_per_node)]
        if self.rdzv_endpoint:
            command += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank)]
            command += ["--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", job_id]
        else:
            command.append("--standalone")
        command += ["--log-dir", str(inputs.folder / "logs"), "--tee", "3"]
        command += ["--log-line-prefix-template", "[rank${rank}] "]
        return [*command, *inputs.worker_args()]


def train_distributed(
    spec: PipelineSpec,
    data: TrainingData,
    checkpoint_dir: Path,
    settings: Settings,
    *,
    job_id: str,
    init_state: dict[str, torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainResult:
    """Trains like `ml.training.train(…, resume=True)` on `spec.distributed.num_workers` processes.

    A checkpoint already in `checkpoint_dir` (`last.pt`) is resumed. Raises WorkerFailedError when a
    rank dies, ConfigurationError/InvalidInputError for a topology this machine cannot run.
    """
    topology = Topology.of(spec, settings)
    device = resolve_device(spec.hardware.device)
    if device.type == "cuda" and torch.cuda.device_count() < topology.nproc_per_node:
        raise InvalidInputError(
            f"distributed.num_workers {topology.nproc_per_node} needs as many CUDA devices on this machine "
            f"(found {torch.cuda.device_count()}); lower num_workers or set hardware.device: cpu"
        )
    inputs = WorkerInputs(checkpoint_dir.parent / "ddp", checkpoint_dir)
    shutil.rmtree(inputs.folder, ignore_errors=True)  # a previous attempt's result must not be read as ours
    inputs.write(spec, data, init_state)
    command = topology.torchrun(inputs, job_id)
    log.info("training on %d x %d processes: %s", topology.nnodes, topology.nproc_per_node, " ".join(command))
    console = TorchrunConsole(progress, on_checkpoint)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=_worker_environment(),
        start_new_session=True,  # one process group: stopping the task stops every rank
    )
    try:
        assert process.stdout is not None
        console.read(process.stdout)
        returncode = process.wait()
    finally:
        _stop(process)
    if returncode != 0:
        raise console.failure(returncode)
    return _result(spec, inputs)


def _worker_environment() -> dict[str, str]:
    """The task's environment, with its import path: a model class the task can import by path
    (`model.architecture: package.module:Class`), every rank can import too."""
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    path = os.pathsep.join(dict.fromkeys([str(Path.cwd()), *paths]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _result(spec: PipelineSpec, inputs: WorkerInputs) -> TrainResult:
    if not inputs.result.is_file() or not inputs.weights.is_file():
        raise InfrastructureError(
            f"torchrun succeeded but rank 0 wrote no result in {inputs.folder}; "
            "see the task's log for the workers' output"
        )
    model = build_for_spec(spec)
    freeze_parameters(model, spec.model.freeze)  # as the in-process trainer leaves it
    model.load_state_dict(load_file(str(inputs.weights)))
    summary: dict[str, Any] = json.loads(inputs.result.read_text())
    return result_from_summary(summary, model)


class TorchrunConsole:
    """What torchrun prints: rank 0's events acted on, each rank's last lines and torchrun's own kept."""

    def __init__(self, progress: ProgressCallback | None, on_checkpoint: CheckpointCallback | None) -> None:
        self.progress, self.on_checkpoint = progress, on_checkpoint
        self.tails: defaultdict[int, deque[str]] = defaultdict(lambda: deque(maxlen=TAIL_LINES))
        self.launcher: deque[str] = deque(maxlen=400)  # torchrun's failure summary comes last
        self.errors: dict[int, dict[str, Any]] = {}
        self.raised: list[int] = []  # ranks in the order they printed a Python traceback

    def read(self, lines: Iterable[str]) -> None:
        for raw in lines:
            line = raw.rstrip("\n")
            match = _RANK_LINE.match(line)
            if match is None:
                self.launcher.append(line)
                log.debug("torchrun: %s", line)
                continue
            rank, text = int(match.group(1)), match.group(2)
            event = _event(text)
            if event is None:
                self.tails[rank].append(text)
                if text.startswith("Traceback (most recent call last)") and rank not in self.raised:
                    self.raised.append(rank)
                log.debug("rank %d: %s", rank, text)
            else:
                self._handle(rank, event)

    def _handle(self, rank: int, event: dict[str, Any]) -> None:
        kind = event[EVENT]
        if kind == "progress" and self.progress is not None:
            self.progress(progress_from_event(event))
        elif kind == "checkpoint":
            snapshot = Path(event["path"])
            if self.on_checkpoint is not None:
                self.on_checkpoint(snapshot, int(event["step"]))
            snapshot.unlink(missing_ok=True)
        elif kind == "error":
            self.errors[rank] = event

    def failure(self, returncode: int) -> WorkerFailedError:
        """The error that names the rank that failed first (torchrun's root cause), its exit code and lines."""
        rank, exit_code = self._root_cause()
        if rank is None:
            lines = "\n".join(list(self.launcher)[-TAIL_LINES:])
            return WorkerFailedError(
                f"DDP training failed: torchrun exited with code {returncode}; its last log lines:\n{lines}",
                rank=None,
                exit_code=returncode,
            )
        code = exit_code if exit_code is not None else returncode
        reported = self.errors.get(rank)
        killed = code < 0 and -code in _SIGNALS
        how = f"was killed by {signal.Signals(-code).name} (exit code {code})" if killed else f"exited with code {code}"
        said = f" ({reported['code']}: {reported['message']})" if reported else ""
        lines = "\n".join(self.tails.get(rank, ()))
        return WorkerFailedError(
            f"DDP training failed: rank {rank} {how}{said}; its last log lines:\n{lines}",
            rank=rank,
            exit_code=code,
            retryable=bool(reported["retryable"]) if reported else True,
        )

    def _root_cause(self) -> tuple[int | None, int | None]:
        lines = list(self.launcher)
        starts = [i for i, line in enumerate(lines) if "Root Cause" in line]
        rank: int | None = None
        exit_code: int | None = None
        for line in lines[starts[-1] :] if starts else []:
            if rank is None and (match := _ROOT_CAUSE_RANK.match(line)):
                rank = int(match.group(1))
            elif exit_code is None and (match := _ROOT_CAUSE_EXIT.match(line)):
                exit_code = int(match.group(1))
        # No summary: torchrun itself was stopped, or failed writing it (torch's agent can fail reading a
        # rank's half-written error file): the first rank that reported an error, else the first that raised
        # (an uncaught exception exits 1, which torchrun's own code then is).
        if rank is None and self.errors:
            rank = next(iter(self.errors))
        elif rank is None and self.raised:
            rank = self.raised[0]
        return rank, exit_code


_SIGNALS = {int(s) for s in signal.Signals}


def _event(text: str) -> dict[str, Any] | None:
    if not text.startswith("{") or EVENT not in text:
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and EVENT in event else None
