"""A regression pipeline's canary end to end: the real model server following SQL, live traffic with
float delayed labels, and the controller judging the canary's mean absolute error against the
champion's (`mae`, relative margin `max_error_increase`) because the stored pipeline spec says
`task: regression`; its predictions are counted in the champion's bins."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from domain import entities as e
from domain.evidence import CheckOutcome
from domain.spec import PipelineSpec
from flows.canary import RolloutResult
from ml.package import RegressionOutputs, manifest_for, prediction_bin_edges
from ml.standardizer import TargetStandardizer
from ml.zoo import build_model
from storage import repositories as repo
from storage.db import transaction
from tests.serving import test_canary_rollout
from tests.serving.conftest import FEATURES, STANDARDIZER
from tests.serving.test_canary_rollout import PIPELINE, ROWS, Stack

stack = test_canary_rollout.stack  # the fixture: a model server following SQL, as for the classifiers

PARAMS = {"hidden_sizes": [16]}
SPEC = PipelineSpec.model_validate(
    {
        "name": PIPELINE,
        "task": "regression",
        "dataset": PIPELINE,
        "data": {"target": "demand"},
        "model": {"architecture": "mlp", "params": PARAMS, "input_shape": [FEATURES], "outputs": 1},
    }
)
# Labels: the champion's own answers plus noise of sd 5 (champion MAE ~4, in units around 1000).
NOISE = np.random.default_rng(3).normal(0.0, 5.0, size=len(ROWS))


_WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}


def _net(seed: int) -> torch.nn.Module:
    """The zoo MLP of `seed`, the same weights every time it is asked for: built once and copied after,
    since other threads of this process (a server, an earlier test's leftovers) may draw from torch's
    global generator between a `manual_seed` here and the initialisation that follows it."""
    if seed not in _WEIGHTS:
        torch.manual_seed(seed)
        first = build_model("mlp", PARAMS, [FEATURES], 1)
        _WEIGHTS[seed] = {k: v.detach().clone() for k, v in first.state_dict().items()}
    net = build_model("mlp", PARAMS, [FEATURES], 1)
    net.load_state_dict(_WEIGHTS[seed])
    return net


def _predictions(seed: int, mean: float) -> np.ndarray:
    """What the server answers for ROWS with the zoo MLP of `seed` and a target mean of `mean`."""
    net = _net(seed).eval()
    with torch.inference_mode():
        raw = net(STANDARDIZER.transform_tensor(torch.from_numpy(ROWS))).numpy()
    return raw * 40.0 + mean


def _register(stack: Stack, seed: int, mean: float) -> int:
    targets = TargetStandardizer(mean=np.array([mean], np.float32), std=np.array([40.0], np.float32))
    bins = prediction_bin_edges(_predictions(seed, mean).astype(np.float64))
    manifest = manifest_for(
        SPEC, "none", STANDARDIZER, [f"f{i}" for i in range(FEATURES)],
        regression=RegressionOutputs(["demand"], targets, bins),
    )  # fmt: skip
    return stack.store_version(_net(seed), manifest, f"reg-{seed}-{mean}")


def _regression_champion(stack: Stack) -> int:
    with transaction(stack.sessions) as session:
        repo.upsert_pipeline(session, PIPELINE, PIPELINE, SPEC.to_document())
    champion = _register(stack, seed=1, mean=1000.0)
    with transaction(stack.sessions) as session:
        repo.move_champion(session, PIPELINE, champion, expected_from_version_id=None, actor="test", reason="first")
    return champion


def _run(stack: Stack, candidate: int, champion: int, **policy: Any) -> tuple[RolloutResult, e.Rollout]:
    # disagreement 1.0: drift may not fail here, so that the labels alone decide
    rollout_id, _ = stack.start_rollout(
        candidate, champion, disagreement=1.0, min_requests=120, min_labels=40, interval_seconds=2.0, **policy
    )
    labels = (_predictions(1, 1000.0)[:, 0] + NOISE).astype(np.float64)
    load = stack.traffic(labels=labels, feedback_fraction=0.5).start()
    try:
        result = stack.drive()
    finally:
        load.stop()
    with transaction(stack.sessions) as session:
        rollout = repo.latest_rollout(session, PIPELINE)
    assert rollout is not None and rollout.id == rollout_id
    return result, rollout


def test_a_regression_candidate_with_a_larger_error_is_rolled_back_on_mae(stack: Stack) -> None:
    champion = _regression_champion(stack)
    candidate = _register(stack, seed=1, mean=1030.0)  # the same model, 30 units off: MAE ~30 vs ~4
    result, rollout = _run(stack, candidate, champion)
    assert result.status is e.RolloutStatus.ROLLED_BACK, result.reason
    attempt = rollout.steps[-1].analysis.attempts[-1]
    assert {c.check for c in attempt.evidence if c.outcome is CheckOutcome.FAIL} == {"mae"}, attempt.evidence
    mae = next(c for c in attempt.evidence if c.check == "mae")
    assert mae.measures["canary_mae"] > 20 > 6 > mae.measures["champion_mae"], mae
    assert mae.interval is not None and mae.interval[0] > 0.1 and min(mae.canary_n, mae.champion_n or 0) >= 40
    assert "accuracy" not in {c.check for c in attempt.evidence}
    # the canary's predictions were counted in the champion's bins (its own would spread over all ten)
    edges = prediction_bin_edges(_predictions(1, 1000.0).astype(np.float64))
    shifted = np.searchsorted(edges, _predictions(1, 1030.0)[:, 0], side="right")
    assert set(attempt.canary.class_counts) <= {str(b) for b in shifted} and "0" not in attempt.canary.class_counts
    assert len(attempt.champion.class_counts) >= 8


def test_a_regression_candidate_as_good_as_the_champion_is_promoted(stack: Stack) -> None:
    champion = _regression_champion(stack)
    candidate = _register(stack, seed=1, mean=1000.5)
    result, rollout = _run(stack, candidate, champion)
    assert result.status is e.RolloutStatus.PROMOTED, result.reason
    judged = [c for step in rollout.steps for a in step.analysis.attempts for c in a.evidence if c.check == "mae"]
    assert judged and all(c.outcome is not CheckOutcome.FAIL for c in judged)
    assert any(c.outcome is CheckOutcome.PASS and c.canary_n >= 40 for c in judged), judged
