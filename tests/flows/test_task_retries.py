"""Which failures the pipeline's tasks retry: only those that retrying can help (pure logic of the
`retry_condition_fn` Prefect calls; the flows that use it run in test_dataset_folders.py and
test_pipeline_flow.py)."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from domain.errors import ArtifactIntegrityError, InvalidInputError, TrainingError, TransientInfraError
from flows.pipeline import fetch_data, retry_unless_final, train_candidate


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ArtifactIntegrityError("data digest differs: 'part-1.parquet' changed"), False),
        (InvalidInputError("data folder s3://datasets/x/ is empty"), False),
        (TrainingError("loss became nan"), False),
        (TransientInfraError("S3 endpoint not reachable"), True),
        (OSError("connection reset by peer"), True),
    ],
)
def test_only_failures_that_a_retry_can_help_are_retried(error: Exception, retried: bool) -> None:
    assert retry_unless_final(None, None, Failed(data=error)) is retried


def test_the_data_and_training_tasks_use_it() -> None:
    assert fetch_data.retry_condition_fn is retry_unless_final and fetch_data.retries == 2
    assert train_candidate.retry_condition_fn is retry_unless_final and train_candidate.retries == 1
