"""Artifacts in S3 (`s3://bucket/prefix`) through boto3; MinIO and other S3-compatible servers
work through RETRAINER_S3_ENDPOINT_URL.

A write is one PutObject carrying `x-amz-checksum-sha256` (the server rejects bytes that do not
match it in transit) and `If-None-Match: *` (the server refuses to replace an existing key). The
hex digest is also kept as object metadata so `stat` needs no download.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from domain.errors import (
    ArtifactNotFoundError,
    ConfigurationError,
    InfrastructureError,
    RetrainerError,
    TransientInfraError,
)
from domain.settings import Settings
from storage.artifacts.base import ArtifactRef, ArtifactStore, iter_chunks
from storage.artifacts.keys import validate_key

ROOT_SETTING = "RETRAINER_ARTIFACT_ROOT"
ENDPOINT_SETTING = "RETRAINER_S3_ENDPOINT_URL"
_MISSING = ("404", "NoSuchKey", "NotFound")
_PRECONDITION = ("412", "PreconditionFailed", "ConditionalRequestConflict")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")

T = TypeVar("T")


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3ArtifactStore(ArtifactStore):
    def __init__(self, root_uri: str, settings: Settings) -> None:
        parts = urlsplit(root_uri)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.root_uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = settings.s3_endpoint_url
        credentials: dict[str, Any] = {}
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            credentials = {
                "aws_access_key_id": settings.s3_access_key_id,
                "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
            }
        timeout = settings.connect_timeout_seconds
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=settings.s3_region,
            config=Config(
                connect_timeout=timeout,
                read_timeout=max(timeout, 30.0),
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"} if self.endpoint else {},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
            **credentials,
        )

    # -- addressing ---------------------------------------------------------------------------
    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"{self.root_uri}/{key}"

    @property
    def _where(self) -> str:
        return f"{ENDPOINT_SETTING}={self.endpoint or 'AWS default'}"

    def _translate(self, error: Exception, key: str | None = None) -> RetrainerError:
        """botocore errors → domain errors that name the setting, the address and the fix."""
        target = self.uri_for(key) if key is not None else self.root_uri
        if isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
            return TransientInfraError(f"{self._where}: S3 endpoint not reachable while accessing {target} ({error})")
        if isinstance(error, NoCredentialsError):
            return ConfigurationError(
                f"{ROOT_SETTING}={self.root_uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or RETRAINER_S3_ACCESS_KEY_ID/RETRAINER_S3_SECRET_ACCESS_KEY"
            )
        if isinstance(error, ClientError):
            code = _error_code(error)
            if code == "NoSuchBucket":
                return self._missing_bucket()
            if code in _MISSING:
                return ArtifactNotFoundError(f"artifact {target} does not exist")
            if code in _CREDENTIALS:
                return ConfigurationError(
                    f"{ROOT_SETTING}={self.root_uri}: access denied ({code}); check the S3 credentials"
                )
            return InfrastructureError(f"{self._where}: S3 error {code} on {target}: {error}")
        return TransientInfraError(f"{self._where}: S3 request for {target} failed ({error})")

    def _missing_bucket(self) -> ConfigurationError:
        return ConfigurationError(
            f"{ROOT_SETTING}={self.root_uri}: bucket {self.bucket!r} does not exist at "
            f"{self.endpoint or 'AWS'}; create it (make services creates the local ones)"
        )

    def _request(self, key: str, send: Callable[[], T], *, declined: tuple[str, ...] = ()) -> T | None:
        """Sends one S3 request. An answer whose error code is in `declined` is an expected "no"
        (the key exists, or does not) and gives None; any other botocore error is translated."""
        try:
            return send()
        except ClientError as e:
            if _error_code(e) in declined:
                return None
            raise self._translate(e, key) from e
        except BotoCoreError as e:
            raise self._translate(e, key) from e

    # -- backend operations -------------------------------------------------------------------
    def _write_new(self, key: str, source: Path | bytes, sha256: str, size: int) -> bool:
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")

        def put() -> bool:
            if isinstance(source, bytes):
                self._put_object(key, source, checksum, sha256, size)
            else:
                with source.open("rb") as body:
                    self._put_object(key, body, checksum, sha256, size)
            return True

        return self._request(key, put, declined=_PRECONDITION) is not None

    def _put_object(self, key: str, body: bytes | BinaryIO, checksum: str, sha256: str, size: int) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self._object_key(key),
            Body=body,
            ContentLength=size,
            ChecksumSHA256=checksum,
            Metadata={"sha256": sha256},
            IfNoneMatch="*",
        )

    def _read_into(self, key: str, sink: BinaryIO) -> None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            body = response["Body"]
            for chunk in iter_chunks(body):
                sink.write(chunk)
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, key) from e

    def stat(self, key: str) -> ArtifactRef | None:
        head = self._request(
            key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._object_key(key)), declined=_MISSING
        )
        if head is None:
            return None
        sha256 = head.get("Metadata", {}).get("sha256", "")
        return ArtifactRef(uri=self.uri_for(key), key=key, sha256=sha256, size=int(head["ContentLength"]))

    def delete(self, key: str) -> None:
        self._request(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key)))

    def list_keys(self, prefix: str) -> list[str]:
        folder = validate_key(prefix.rstrip("/")) + "/"
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._object_key(folder)
            )
            for page in pages:
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as e:
            raise self._translate(e, folder) from e
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[strip:] for key in keys)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _error_code(e) in ("404", "NoSuchBucket", "NotFound"):  # HEAD answers carry no error body
                raise self._missing_bucket() from e
            raise self._translate(e) from e
        except BotoCoreError as e:
            raise self._translate(e) from e
