from __future__ import annotations

import pytest

from domain import apikeys
from domain.errors import (
    ArtifactIntegrityError,
    ConflictError,
    InvalidInputError,
    RetrainerError,
    TransientInfraError,
)
from storage.artifacts.keys import validate_key


def test_generated_keys_verify_and_differ() -> None:
    a, b = apikeys.generate_api_key(), apikeys.generate_api_key()
    assert a.plaintext != b.plaintext and a.prefix != b.prefix
    assert apikeys.prefix_of(a.plaintext) == a.prefix
    assert apikeys.key_matches(a.plaintext, a.sha256)
    assert not apikeys.key_matches(b.plaintext, a.sha256)
    assert a.plaintext not in a.sha256


def test_malformed_key_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError) as info:
        apikeys.prefix_of("Bearer something")
    assert info.value.code == "invalid_input"


def test_error_hierarchy_codes_and_retryability() -> None:
    assert issubclass(TransientInfraError, RetrainerError) and TransientInfraError.retryable
    assert not ArtifactIntegrityError.retryable and not ConflictError.retryable
    codes = {cls.code for cls in (RetrainerError, InvalidInputError, ConflictError, TransientInfraError)}
    assert len(codes) == 4


@pytest.mark.parametrize("key", ["runs/abc/model.pt", "sha256/ab/" + "a" * 64, "datasets/digits/v3.csv", "a=b+c@d"])
def test_safe_keys_pass(key: str) -> None:
    assert validate_key(key) == key
