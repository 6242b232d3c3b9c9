"""`distributed: {strategy: ddp}`: the train task launches torchrun with two gloo processes on CPU
(flows/distributed.py, ml/ddp_worker.py). Through the real flow: checkpoints reach the artifact store, a
rank that dies once is retried and the retry resumes from them, and a rank that keeps dying fails the
run with its rank, exit code and last lines. Outside a flow: a regression model trained by two ranks is
the model one process trains (same objective, target standardizer and early stopping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import ConfigurationError, WorkerFailedError
from domain.settings import load_settings
from domain.spec import parse_spec
from flows.distributed import Topology, TorchrunConsole, train_distributed
from flows.pipeline import CHECKPOINT_PREFIX, run_pipeline
from flows.records import decision_record
from ml.ddp_worker import WorkerInputs
from ml.losses import Objective
from ml.standardizer import fit_target_standardizer
from ml.training import TrainingData, seed_everything, train
from ml.zoo import build_for_spec
from storage import repositories as repo
from storage.artifacts import open_artifact_store
from storage.db import transaction
from tests.flows.conftest import event_run, spec

pytestmark = pytest.mark.integration
NAME = "digits-classifier"
FAILS_ON_RANK_ONE = "tests.flows.rank_failure:FailsOnRankOne"
JOB = WorkerInputs(Path("job"), Path("checkpoints"))


def ddp_spec(**params: Any) -> dict[str, Any]:
    document = spec(epochs=3)
    document["distributed"] = {"strategy": "ddp", "num_workers": 2}
    document["model"] = {"architecture": FAILS_ON_RANK_ONE, "params": params, "input_shape": [64], "output_classes": 10}
    return document


def test_a_rank_that_dies_once_is_retried_resumes_from_the_stored_checkpoint_and_is_promoted(
    env: sessionmaker[Session], digits: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    run_id = event_run(env, ddp_spec(after_calls=28, marker=str(marker)), "v2", digits["v2"])
    run_pipeline(NAME, run_id)
    with transaction(env) as session:
        record = decision_record(session, run_id)
    assert marker.exists(), "rank 1 did not fail in the first attempt"
    assert record["status"] == "promoted", record["decision"]["outcome"]
    training = record["decision"]["training"]
    # checkpoints every 5 steps; rank 1 fails in step 28, so the retry starts from the last one uploaded
    assert training["world_size"] == 2 and training["resumed_from_step"] in (20, 25)
    assert [epoch["epoch"] for epoch in training["history"]] == [1, 2, 3]
    assert record["decision"]["candidate"]["metrics"]["accuracy"] > 0.8
    # rank 0's checkpoints went to the store as training went, one key per checkpointed step
    settings = load_settings()
    keys = open_artifact_store(settings.artifact_root, settings).list_keys(CHECKPOINT_PREFIX.format(run_id=run_id))
    assert keys[0].endswith("step-000000005.pt") and keys[-1].endswith(f"step-{training['global_steps']:09d}.pt")


def test_a_rank_that_keeps_failing_fails_the_run_naming_rank_exit_code_and_last_lines(
    env: sessionmaker[Session], digits: dict[str, Path]
) -> None:
    run_id = event_run(env, ddp_spec(after_calls=3), "v2", digits["v2"])
    with pytest.raises(WorkerFailedError) as failed:
        run_pipeline(NAME, run_id)
    error = failed.value
    assert error.code == "worker_failed" and error.rank == 1 and error.exit_code == 1
    assert "rank 1 exited with code 1" in str(error)
    assert "RuntimeError: forward pass failed on rank 1 at call 3" in str(error)  # from its last log lines
    with transaction(env) as session:
        stored = repo.get_run(session, run_id)
    assert stored.status.value == "failed" and "rank 1 exited with code 1" in (stored.error or "")


def test_two_ranks_train_the_regression_model_one_process_trains(tmp_path: Path) -> None:
    document = spec(
        learning_rate=0.01,
        batch_size=32,
        gradient_accumulation_steps=2,
        epochs=5,
        checkpoint_every_steps=3,
        # nothing counts as better after epoch 1: early stopping ends epoch 3 with epoch 1's weights
        early_stopping={"monitor": "val_rmse", "patience": 2, "min_delta": 1e6},
    )
    document.update(task="regression", data={"seed": 3}, quantization={"type": "none"}, gates={})
    document["model"] = {
        "architecture": "mlp",
        "params": {"hidden_sizes": [16], "dropout": 0.0},
        "input_shape": [8],
        "outputs": 1,
    }
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(320, 8, generator=generator)
    targets = (1000 + 300 * features[:, :1] - 200 * features[:, 1:2]).float()  # in units far from 1
    scaler = fit_target_standardizer(targets[:256].numpy())
    scaled = torch.from_numpy(scaler.transform(targets.numpy()))
    data = TrainingData(features[:256], scaled[:256], features[256:], scaled[256:], target_standardizer=scaler)

    one = parse_spec(document, source="test")
    seed_everything(one.data.seed)
    alone = train(build_for_spec(one), data, one, tmp_path / "alone", objective=Objective.for_spec(one))
    ddp = parse_spec({**document, "distributed": {"strategy": "ddp", "num_workers": 2}}, source="test")
    steps: list[int] = []
    together = train_distributed(
        ddp,
        data,
        tmp_path / "ddp" / "checkpoints",
        load_settings(),
        job_id="t",
        on_checkpoint=lambda _, s: steps.append(s),
    )

    assert together.world_size == 2 and alone.world_size == 1
    assert together.stopped_early and together.best_epoch == alone.best_epoch == 1 and len(together.history) == 3
    assert steps == [3, 4, 6, 8, 9, 12]  # every 3 steps and each epoch's end (4 steps an epoch)
    for mine, theirs in zip(together.history, alone.history, strict=True):
        assert mine.val_rmse == pytest.approx(theirs.val_rmse, rel=1e-4)  # in the target's units
        assert mine.val_rmse is not None and mine.val_rmse > 10
    for name, tensor in alone.model.state_dict().items():
        torch.testing.assert_close(together.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_the_topology_comes_from_the_spec_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    document = {**spec(), "distributed": {"strategy": "ddp", "num_workers": 2}}
    one_machine = Topology.of(parse_spec(document, source="test"), load_settings())
    assert one_machine == Topology(2) and "--standalone" in one_machine.torchrun(JOB, "j")

    monkeypatch.setenv("RETRAINER_DDP_NNODES", "3")
    with pytest.raises(ConfigurationError, match="RETRAINER_DDP_RDZV_ENDPOINT") as no_endpoint:
        Topology.of(parse_spec(document, source="test"), load_settings())
    assert no_endpoint.value.code == "configuration_error"
    monkeypatch.setenv("RETRAINER_DDP_RDZV_ENDPOINT", "10.0.0.1:29400")
    several = Topology.of(parse_spec(document, source="test"), load_settings())
    assert several == Topology(2, 3, 0, "10.0.0.1:29400")
    args = several.torchrun(JOB, "run-1")
    assert args[args.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and "--standalone" not in args
    spec_wins = {**document, "distributed": {"strategy": "ddp", "num_workers": 2, "nnodes": 2, "rdzv_endpoint": "h:1"}}
    assert Topology.of(parse_spec(spec_wins, source="test"), load_settings()) == Topology(2, 2, 0, "h:1")
    monkeypatch.setenv("RETRAINER_DDP_NODE_RANK", "1")
    with pytest.raises(ConfigurationError, match="runs node 0"):
        Topology.of(parse_spec(document, source="test"), load_settings())


def test_a_failure_is_read_from_torchrun_s_root_cause_and_the_rank_s_own_error() -> None:
    nan = '{"retrainer_ddp": "error", "rank": 1, "code": "training_failed", "retryable": false, "message": "loss nan"}'
    summary = ["Root Cause (first observed failure):", "[0]:", "  rank      : 1 (local_rank: 1)", "  exitcode  : 1"]
    console = TorchrunConsole(None, None)
    console.read(["[rank0] epoch 1", "[rank1] Traceback (most recent call last):", f"[rank1] {nan}", *summary])
    error = console.failure(1)
    assert (error.code, error.rank, error.exit_code, error.retryable) == ("worker_failed", 1, 1, False)
    assert "rank 1 exited with code 1 (training_failed: loss nan)" in str(error) and "Traceback" in str(error)

    killed = TorchrunConsole(None, None)
    killed.read(["[rank0] step 3", *summary[:3], "  exitcode  : -9 (pid: 7)"])
    error = killed.failure(1)
    assert error.retryable and "rank 1 was killed by SIGKILL (exit code -9)" in str(error)
    unknown = TorchrunConsole(None, None)
    unknown.read(["torchrun: rendezvous timed out"])
    error = unknown.failure(1)
    assert error.rank is None and error.exit_code == 1 and "rendezvous timed out" in str(error)

    # torch's agent itself fails reading a rank's half-written error file: no summary, but rank 1 raised
    crashed = TorchrunConsole(None, None)
    crashed.read([
        "[rank0] step 3", "[rank1] Traceback (most recent call last):", "[rank1] RuntimeError: forward pass failed",
        "Traceback (most recent call last):", "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
    ])  # fmt: skip
    error = crashed.failure(1)
    assert (error.rank, error.exit_code) == (1, 1) and "rank 1 exited with code 1" in str(error)
    assert "RuntimeError: forward pass failed" in str(error)
