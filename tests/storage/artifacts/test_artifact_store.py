"""The artifact store contract, run against the local store and against MinIO (the `store` fixture)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import boto3
import pytest

from domain.errors import (
    ArtifactExistsError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ConfigurationError,
    TransientInfraError,
    UnsafeArtifactKeyError,
)
from domain.settings import load_settings
from storage.artifacts import ArtifactRef, ArtifactStore, LocalArtifactStore, content_key, open_artifact_store
from storage.artifacts.local import path_from_file_uri

BUCKET = "retrainer-test"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    endpoint = request.getfixturevalue("s3_endpoint_url")
    root = f"s3://{BUCKET}/tests/{uuid.uuid4().hex}"  # a fresh prefix per test
    return open_artifact_store(root, load_settings(s3_endpoint_url=endpoint, artifact_root=root))


def tamper(store: ArtifactStore, key: str, data: bytes) -> None:
    """Replaces the stored bytes behind the store's back, as corruption or an attacker would."""
    if isinstance(store, LocalArtifactStore):
        path_from_file_uri(store.uri_for(key)).write_bytes(data)
        return
    raw = boto3.client("s3", endpoint_url=store.endpoint, region_name="us-east-1")  # type: ignore[attr-defined]
    raw.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)  # type: ignore[attr-defined]


def test_put_and_read_back_verified(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"weights", key="runs/r1/model.pt")
    assert ref.sha256 == hashlib.sha256(b"weights").hexdigest() and ref.size == 7
    assert ref.uri == store.uri_for("runs/r1/model.pt") and ref.uri.startswith(store.root_uri)
    assert store.read_bytes(ref) == b"weights"
    stat = store.stat("runs/r1/model.pt")
    assert stat is not None and (stat.sha256, stat.size) == (ref.sha256, 7)
    assert store.exists("runs/r1/model.pt") and not store.exists("runs/r1/other.pt")


def test_content_addressed_when_no_key(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"dataset rows")
    assert ref.key == content_key(ref.sha256) and ref.key.startswith(f"sha256/{ref.sha256[:2]}/")
    assert store.put_bytes(b"dataset rows") == ref  # same bytes, same object


def test_put_file_and_download_atomically(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: several read chunks
    ref = store.put_file(source, key="datasets/digits/v1.bin")
    dest = store.download(ref, tmp_path / "out" / "v1.bin")
    assert dest.read_bytes() == source.read_bytes()
    assert not list((tmp_path / "out").glob(".*partial"))


def test_same_bytes_again_is_idempotent_other_bytes_refused(store: ArtifactStore) -> None:
    first = store.put_bytes(b"v1", key="models/m.pt")
    assert store.put_bytes(b"v1", key="models/m.pt") == first
    with pytest.raises(ArtifactExistsError) as info:
        store.put_bytes(b"v2", key="models/m.pt")
    assert info.value.code == "artifact_exists" and "models/m.pt" in str(info.value)
    assert store.read_bytes(first) == b"v1"  # never silently overwritten


def test_tampered_object_is_refused_naming_the_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    ref = store.put_bytes(b"honest weights", key="models/champion.pt")
    tamper(store, "models/champion.pt", b"evil weights!!")
    with pytest.raises(ArtifactIntegrityError) as info:
        store.read_bytes(ref)
    assert info.value.code == "artifact_integrity" and not info.value.retryable
    assert ref.uri in str(info.value) and ref.sha256 in str(info.value)
    dest = tmp_path / "champion.pt"
    with pytest.raises(ArtifactIntegrityError):
        store.download(ref, dest)
    assert not dest.exists()  # nothing unverified is left behind


def test_wrong_recorded_digest_is_refused(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"abc", key="x/y.bin")
    wrong = ArtifactRef(uri=ref.uri, key=ref.key, sha256=hashlib.sha256(b"abd").hexdigest(), size=3)
    with pytest.raises(ArtifactIntegrityError):
        store.read_bytes(wrong)


def test_missing_artifact(store: ArtifactStore) -> None:
    ghost = ArtifactRef(uri=store.uri_for("no/such.pt"), key="no/such.pt", sha256="0" * 64, size=0)
    with pytest.raises(ArtifactNotFoundError) as info:
        store.read_bytes(ghost)
    assert info.value.code == "artifact_not_found" and "no/such.pt" in str(info.value)
    assert store.stat("no/such.pt") is None


@pytest.mark.parametrize(
    "key",
    [
        "../escape.pt",
        "runs/../../etc/passwd",
        "/etc/passwd",
        "C:/windows/system32",
        "runs\\..\\model.pt",
        "runs/%2e%2e/%2e%2e/etc/passwd",
        "runs/%252e%252e/x",
        "%2Fetc%2Fpasswd",
        "runs/./model.pt",
        "runs//model.pt",
        "runs/model.pt\x00.txt",
        "",
    ],
)
def test_unsafe_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(UnsafeArtifactKeyError) as info:
        store.put_bytes(b"x", key=key)
    assert info.value.code == "unsafe_artifact_key"


def test_ref_from_uri_refuses_other_roots(store: ArtifactStore) -> None:
    ref = store.put_bytes(b"m", key="a/m.pt")
    assert store.ref(ref.uri, ref.sha256, ref.size) == ref
    with pytest.raises(Exception, match="not under this store's root"):
        store.ref("s3://elsewhere/a/m.pt", ref.sha256, 1)


def test_check_passes_on_a_usable_store(store: ArtifactStore) -> None:
    store.check()


# ----------------------------------------------------------------------- S3 specifics


@pytest.mark.integration
def test_s3_rejects_bytes_that_do_not_match_the_sent_checksum(s3_endpoint_url: str) -> None:
    """The PUT carries x-amz-checksum-sha256: the server refuses bytes corrupted in transit."""
    root = f"s3://{BUCKET}/tests/{uuid.uuid4().hex}"
    store = open_artifact_store(root, load_settings(s3_endpoint_url=s3_endpoint_url, artifact_root=root))
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(Exception, match=r"(?i)checksum|digest"):
        store._put_object("k.bin", b"payload", wrong, hashlib.sha256(b"payload").hexdigest(), 7)  # type: ignore[attr-defined]
    assert store.stat("k.bin") is None


@pytest.mark.integration
def test_s3_missing_bucket_is_a_configuration_error(s3_endpoint_url: str) -> None:
    root = "s3://no-such-bucket-retrainer/x"
    store = open_artifact_store(root, load_settings(s3_endpoint_url=s3_endpoint_url, artifact_root=root))
    with pytest.raises(ConfigurationError) as info:
        store.check()
    assert "RETRAINER_ARTIFACT_ROOT" in str(info.value) and "no-such-bucket-retrainer" in str(info.value)


def test_s3_unreachable_endpoint_names_the_setting_and_address() -> None:
    settings = load_settings(
        s3_endpoint_url="http://127.0.0.1:9",
        artifact_root="s3://b/p",
        connect_timeout_seconds=1,
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    store = open_artifact_store(settings.artifact_root, settings)
    with pytest.raises(TransientInfraError) as info:
        store.check()
    assert info.value.retryable
    assert "RETRAINER_S3_ENDPOINT_URL=http://127.0.0.1:9" in str(info.value)


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme 'gs'"):
        open_artifact_store("gs://bucket/x", load_settings())
