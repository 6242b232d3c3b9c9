"""The example regression pipeline through `retrainer serve` on the production-like stack
(PostgreSQL, MinIO, Kafka, a real Prefect server and runner): a first model promoted on its absolute
RMSE, a better one canaried under live traffic with float delayed labels and promoted on the
regression checks, an underfit one rejected by the paired RMSE gate; an outside OIP v2 client
(tritonclient.http, its defaults) gets float predictions in the target's units."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from domain import entities as e
from domain.evidence import CheckOutcome
from flows.records import decision_record
from retrainer import demo as story
from storage import repositories as repo
from storage.db import create_db_engine, make_sessions, transaction
from tests.integration.service import production_stack, retrainer_serve

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def example_spec() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "pipelines/examples/diabetes-regression.yaml").read_text())
    document["hardware"] = {"device": "cpu"}
    document["evaluation"] = {"latency_budget_seconds": 0.3}
    # a short canary (the example's is sized for real traffic): each window's sample stays powered
    document["canary"] = {
        "steps": [50, 100],
        "interval_seconds": 4,
        "min_requests": 150,
        "max_error_rate": 0.01,
        "max_latency_p99_ratio": 1.2,
        "latency_p99_slack_ms": 10.0,
        "max_prediction_psi": 0.25,
        "min_labels": 30,
        "max_error_increase": 0.25,
    }
    document["triggers"] = {"events": {"debounce_seconds": 1, "max_wait_seconds": 10}, "manual": True}
    return document


ACTS = (
    story.Act("v1", "v1", "first model on 60 % of the rows", "promoted", 40),
    story.Act("v2", "v2", "all the rows: canaried, then promoted", "promoted", 60),
    story.Act(
        "v2-underfit",
        "v2",
        "one epoch at a tiny rate: worse on the same rows",
        "rejected",
        1,
        {"hyperparameters": {"learning_rate": 0.0001}},
    ),
)


def test_a_regression_pipeline_through_retrainer_serve(
    tmp_path: Path, e2e_database: str, s3_endpoint_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tritonclient.http as triton

    from ml.demo_regression import diabetes_versions

    files = diabetes_versions(tmp_path / "data")
    stack = production_stack(
        tmp_path, monkeypatch, database=e2e_database, s3_endpoint_url=s3_endpoint_url,
        kafka_bootstrap=kafka_bootstrap, prefix="regression", files=files,
    )  # fmt: skip
    settings, api, serving, data = stack.settings, stack.api, stack.serving, stack.data
    base = example_spec()
    story.write_spec(settings.pipelines_dir, story.spec_for(ACTS[0], base))

    with retrainer_serve(api, tmp_path / "serve.log"):
        sessions = make_sessions(create_db_engine(e2e_database))
        results = story.run_story(
            settings, sessions, serving_url=f"http://{serving}", data=data, traffic_rows=files["v2"], acts=ACTS,
            base_spec=base, act_timeout_s=240,
        )  # fmt: skip
        summary = [(r.act.key, r.status, r.reason) for r in results]
        assert [r.status for r in results] == ["promoted", "promoted", "rejected"], summary

        with transaction(sessions) as session:
            champion = repo.get_champion(session, base["name"])
            (rollout,) = repo.list_rollouts(session, base["name"])
            underfit = decision_record(session, results[2].run_id)
        assert champion is not None and champion.version == results[1].model_version
        assert rollout.status is e.RolloutStatus.PROMOTED and results[1].traffic
        evidence = {c.check: c for c in rollout.steps[0].analysis.attempts[-1].evidence}
        assert evidence["prediction_drift"].outcome is CheckOutcome.PASS
        assert evidence["prediction_drift"].measures["expected_disagreement"] is not None
        rmse = next(g for g in underfit["decision"]["gate"] if g["check"] == "vs_champion")
        assert rmse["metric"] == "rmse" and rmse["verdict"] == "fail", rmse

        rows, targets = story.read_rows(files["v2"], base)
        client = triton.InferenceServerClient(serving)
        request = triton.InferInput("input", [20, rows.shape[1]], "FP32")
        request.set_data_from_numpy(rows[:20].astype(np.float32))  # binary tensor data: the client's default
        answer = client.infer(base["name"], [request])
        predictions = answer.as_numpy("prediction")
        assert predictions is not None and predictions.dtype == np.float32 and predictions.shape == (20, 1)
        # the target's units (disease-progression score 25..346), not standardised ones
        assert 80 < float(predictions.mean()) < 220
        assert float(np.sqrt(np.mean((predictions[:, 0] - targets[:20]) ** 2))) < 75
    story.delete_topics(settings)
