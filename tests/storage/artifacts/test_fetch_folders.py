"""Folder and S3-prefix datasets through `fetch_uri`: fetched whole, digested by manifest, verified on
every later fetch (a changed, added or removed file is named); single files as before."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from domain.settings import load_settings
from storage.artifacts import LocalArtifactStore, open_artifact_store
from storage.artifacts.fetch import MANIFEST_HEADER, ManifestEntry, fetch_uri, manifest_bytes, parse_manifest

SHARDS = {"part-0.parquet": b"first shard", "part-1.parquet": b"second shard", "sub/part-2.parquet": b"third"}


def expected_digest(files: dict[str, bytes]) -> str:
    """The documented canonical form, written out independently of the module under test."""
    lines = "".join(f"{key}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n" for key, data in sorted(files.items()))
    return hashlib.sha256(("retrainer-dataset-manifest-v1\n" + lines).encode()).hexdigest()


@pytest.fixture
def manifests(tmp_path: Path) -> LocalArtifactStore:
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    assert isinstance(store, LocalArtifactStore)
    return store


def write_folder(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def test_manifest_round_trips_and_is_sorted() -> None:
    entries = [ManifestEntry("b", 2, "bb"), ManifestEntry("a", 1, "aa")]
    text = manifest_bytes(entries)
    assert text == (MANIFEST_HEADER + "a\t1\taa\nb\t2\tbb\n").encode()
    assert parse_manifest(text) == sorted(entries, key=lambda e: e.key)
    with pytest.raises(InvalidInputError):
        parse_manifest(b"a\t1\taa\n")


def test_a_local_folder_is_fetched_digested_and_verified(tmp_path: Path, manifests: LocalArtifactStore) -> None:
    source = tmp_path / "sales" / "2026-11-30"
    write_folder(source, {**SHARDS, "_SUCCESS": b"", ".part-0.parquet.crc": b"crc"})
    settings = load_settings()
    dest = tmp_path / "work" / "data"
    digest = fetch_uri(f"file://{source}/", dest, settings, manifests=manifests)
    assert digest == expected_digest(SHARDS)  # bookkeeping files (_SUCCESS, .crc) are neither fetched nor digested
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(SHARDS)
    assert (dest / "sub" / "part-2.parquet").read_bytes() == b"third"
    assert not list((tmp_path / "work").glob(".*partial"))

    # Without the trailing slash, a directory is a folder too; the same files give the same digest.
    again = fetch_uri(f"file://{source}", dest, settings, expected_sha256=digest, manifests=manifests)
    assert again == digest

    (source / "part-1.parquet").write_bytes(b"second shard, edited")
    with pytest.raises(ArtifactIntegrityError) as info:
        fetch_uri(f"file://{source}/", dest, settings, expected_sha256=digest, manifests=manifests)
    assert info.value.code == "artifact_integrity"
    assert "'part-1.parquet' changed (size 12 -> 20 bytes" in str(info.value)
    assert digest in str(info.value) and "new version" in str(info.value)
    assert (dest / "part-1.parquet").read_bytes() == b"second shard"  # the verified copy is left as it was


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda root: (root / "part-0b.parquet").write_bytes(b"late"), "'part-0b.parquet' was added"),
        (lambda root: (root / "sub" / "part-2.parquet").unlink(), "'sub/part-2.parquet' was removed"),
    ],
)
def test_an_added_or_removed_file_is_named(
    tmp_path: Path, manifests: LocalArtifactStore, change: Callable[[Path], object], named: str
) -> None:
    source = tmp_path / "ds"
    write_folder(source, SHARDS)
    settings = load_settings()
    digest = fetch_uri(f"file://{source}/", tmp_path / "a", settings, manifests=manifests)
    change(source)
    with pytest.raises(ArtifactIntegrityError) as info:
        fetch_uri(f"file://{source}/", tmp_path / "b", settings, expected_sha256=digest, manifests=manifests)
    assert named in str(info.value)


def test_without_the_recorded_manifest_the_mismatch_is_still_refused(tmp_path: Path) -> None:
    source = tmp_path / "ds"
    write_folder(source, SHARDS)
    with pytest.raises(ArtifactIntegrityError) as info:
        fetch_uri(f"file://{source}/", tmp_path / "a", load_settings(), expected_sha256="0" * 64)
    assert "cannot be named" in str(info.value) and "3 file(s)" in str(info.value)


def test_an_empty_or_missing_folder_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    write_folder(empty, {"_SUCCESS": b""})  # only bookkeeping: nothing to train on
    with pytest.raises(InvalidInputError) as info:
        fetch_uri(f"file://{empty}/", tmp_path / "out", load_settings())
    assert info.value.code == "invalid_input" and "holds no data files" in str(info.value)
    with pytest.raises(ArtifactNotFoundError):
        fetch_uri(f"file://{tmp_path / 'nowhere'}/", tmp_path / "out", load_settings())


def test_a_single_file_keeps_its_plain_sha256(tmp_path: Path) -> None:
    source = tmp_path / "v1.csv"
    source.write_bytes(b"a,label\n1,0\n")
    plain = hashlib.sha256(b"a,label\n1,0\n").hexdigest()
    dest = tmp_path / "out" / "v1.csv"
    assert fetch_uri(f"file://{source}", dest, load_settings()) == plain
    assert dest.read_bytes() == source.read_bytes()
    source.write_bytes(b"a,label\n2,0\n")
    with pytest.raises(ArtifactIntegrityError) as info:
        fetch_uri(f"file://{source}", dest, load_settings(), expected_sha256=plain)
    assert info.value.code == "artifact_integrity"


# ----------------------------------------------------------------------------- MinIO


@pytest.mark.integration
def test_an_s3_prefix_of_shards_is_fetched_and_a_changed_shard_is_refused(
    s3_endpoint_url: str, tmp_path: Path, manifests: LocalArtifactStore
) -> None:
    prefix = f"tests/sales-{uuid.uuid4().hex}/dt=2026-11-30"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")
    for key, data in {**SHARDS, "_SUCCESS": b""}.items():
        s3.put_object(Bucket="datasets", Key=f"{prefix}/{key}", Body=data)
    s3.put_object(Bucket="datasets", Key=f"{prefix}-other/part-9.parquet", Body=b"a sibling prefix, not ours")
    settings = load_settings(s3_endpoint_url=s3_endpoint_url)
    uri = f"s3://datasets/{prefix}/"

    digest = fetch_uri(uri, tmp_path / "first", settings, manifests=manifests)
    assert digest == expected_digest(SHARDS)
    assert (tmp_path / "first" / "sub" / "part-2.parquet").read_bytes() == b"third"
    # Re-fetched, with and without the trailing slash (no object has the exact key): verified OK.
    assert fetch_uri(uri, tmp_path / "again", settings, expected_sha256=digest, manifests=manifests) == digest
    assert fetch_uri(uri.rstrip("/"), tmp_path / "again", settings, expected_sha256=digest) == digest

    s3.put_object(Bucket="datasets", Key=f"{prefix}/part-0.parquet", Body=b"first shard, rewritten")
    with pytest.raises(ArtifactIntegrityError) as info:
        fetch_uri(uri, tmp_path / "third", settings, expected_sha256=digest, manifests=manifests)
    assert info.value.code == "artifact_integrity" and "'part-0.parquet' changed" in str(info.value)
    assert not (tmp_path / "third").exists()


@pytest.mark.integration
def test_an_empty_s3_prefix_is_refused_and_a_missing_key_not_found(s3_endpoint_url: str, tmp_path: Path) -> None:
    settings = load_settings(s3_endpoint_url=s3_endpoint_url)
    nothing = f"tests/empty-{uuid.uuid4().hex}"
    with pytest.raises(InvalidInputError) as info:
        fetch_uri(f"s3://datasets/{nothing}/", tmp_path / "out", settings)
    assert info.value.code == "invalid_input" and "holds no data files" in str(info.value)
    with pytest.raises(ArtifactNotFoundError) as missing:
        fetch_uri(f"s3://datasets/{nothing}.parquet", tmp_path / "out", settings)
    assert missing.value.code == "artifact_not_found"
