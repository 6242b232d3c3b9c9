"""A sharded Parquet dataset on MinIO (an s3:// prefix of several files) through the real pipeline
flow: the event's prefix is fetched, read as one table, trained on, and its manifest digest recorded
on the dataset version; a shard changed under the same prefix fails the digest check on re-fetch,
before any training, and the champion stays."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from sqlalchemy.orm import Session, sessionmaker

from domain.errors import SpecError
from domain.settings import load_settings
from flows.pipeline import run_pipeline
from flows.records import decision_record
from flows.registry import validate_spec_file
from storage import repositories as repo
from storage.artifacts import open_artifact_store
from storage.db import transaction
from tests.flows.conftest import WEAK, event_run, spec

pytestmark = pytest.mark.integration
BUCKET = "datasets"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_an_s3_prefix_of_parquet_shards_trains_and_a_changed_shard_is_refused(
    env: sessionmaker[Session],
    digits: dict[str, Path],
    s3_endpoint_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("RETRAINER_S3_ENDPOINT_URL", s3_endpoint_url)
    digits_table = pacsv.read_csv(digits["v1"])
    features = [name for name in digits_table.column_names if name != "label"]
    # An id column the model must not see: data.columns leaves it out (it is text, so it could not be a feature).
    ids = pa.array([f"row-{i}" for i in range(digits_table.num_rows)])
    table = digits_table.append_column("id", ids)
    prefix = f"flows/sales-{uuid.uuid4().hex}/dt=2026-11-30"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")
    third = table.num_rows // 3
    shards = {
        "part-0.parquet": parquet_bytes(table.slice(0, third)),
        "part-1.parquet": parquet_bytes(table.slice(third, third)),
        "part-2.parquet": parquet_bytes(table.slice(2 * third)),
    }
    for key, body in shards.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/_SUCCESS", Body=b"")

    document = spec(**WEAK)
    document["data"].update({"format": "parquet", "columns": features})
    uri = f"s3://{BUCKET}/{prefix}/"
    run_id = event_run(env, document, "2026-11-30", uri)
    outcome = run_pipeline(document["name"], run_id)
    assert outcome["status"] == "promoted"

    manifest = "retrainer-dataset-manifest-v1\n" + "".join(
        f"{key}\t{len(body)}\t{hashlib.sha256(body).hexdigest()}\n" for key, body in sorted(shards.items())
    )
    digest = hashlib.sha256(manifest.encode()).hexdigest()
    with transaction(env) as session:
        record = decision_record(session, run_id)
        run = repo.get_run(session, run_id)
        assert run.dataset_version_id is not None
        version = repo.get_dataset_version(session, run.dataset_version_id)
    assert version.uri == uri and version.sha256 == digest
    assert record["decision"]["dataset"]["sha256"] == digest
    assert record["decision"]["candidate"]["n_examples"] == round(table.num_rows * 0.2)  # all three shards' rows

    # The same version, one shard rewritten under the same prefix: refused on re-fetch, nothing trained.
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/part-1.parquet", Body=parquet_bytes(table.slice(third, third - 1)))
    again = event_run(env, document, "2026-11-30", uri)
    with pytest.raises(Exception, match=r"part-1\.parquet' changed") as info:
        run_pipeline(document["name"], again)
    assert getattr(info.value, "code", None) == "artifact_integrity"
    with transaction(env) as session:
        failed = repo.get_run(session, again)
        champion = repo.get_champion(session, document["name"])
    assert failed.status.value == "failed" and "part-1.parquet' changed" in (failed.error or "")
    assert champion is not None and champion.version == 1
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    assert store.list_keys(f"runs/{again}/checkpoints/") == []  # the run stopped before training


def test_pipelines_validate_checks_the_loader_and_its_params(tmp_path: Path) -> None:
    document = spec()
    document["data"] = {"loader": "tests.ml.user_loaders:images", "params": {"sise": 28}}
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError) as info:
        validate_spec_file(path)
    assert info.value.code == "invalid_spec"
    assert f"{path}: data.params.sise: 'tests.ml.user_loaders:images' has no parameter 'sise'" in info.value.problems[0]
    assert any("data.params.size: required" in line for line in info.value.problems)

    document["data"] = {"loader": "tests.ml.user_loaders:npy_pair", "format": "csv"}
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError) as info:
        validate_spec_file(path)
    assert "data.format 'csv' contradicts data.loader" in info.value.problems[0]

    document["data"] = {"loader": "tests.ml.user_loaders:npy_pair", "params": {"scale": 2.0}}
    path.write_text(yaml.safe_dump(document))
    assert validate_spec_file(path).data.format == "loader"
