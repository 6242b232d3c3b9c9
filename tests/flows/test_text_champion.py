"""A text champion is compared with a candidate only on the token ids both would read: another
tokenizer or sequence length fails the champion's evaluation closed, with the fix."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from domain import entities as e
from domain.errors import InvalidInputError
from domain.spec import parse_spec
from flows.evaluation import _check_same_tokens
from ml.text import TextTokenizer

TEXT_MODEL = "ml.models:PretrainedTextClassifier"
pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install 'retrainer[text]'")


def spec(tokens: int) -> Any:
    return parse_spec(
        {
            "name": "topics",
            "dataset": "topics",
            "data": {"text_column": "text", "target": "label"},
            "model": {
                "architecture": "ml.models:PretrainedTextClassifier",
                "input_shape": [tokens],
                "output_classes": 3,
            },
        },
        source="spec.yaml",
    )


def champion(tokens: int) -> e.ModelVersion:
    now = datetime.now(UTC)
    manifest = {"tokenizer": TextTokenizer.for_data(None, [tokens]).to_manifest()}
    return e.ModelVersion(
        1, "topics", 1, None, "file:///m.pt", "0" * 64, 1, {}, e.ModelStage.CHAMPION, now, now, manifest
    )


def test_same_tokenizer_and_length_compare() -> None:
    _check_same_tokens(spec(12), champion(12))


def test_another_sequence_length_is_refused_with_the_fix() -> None:
    with pytest.raises(InvalidInputError) as info:
        _check_same_tokens(spec(16), champion(12))
    assert "at 12 tokens" in info.value.message and "at 16" in info.value.message
    assert "keep data.tokenizer and model.input_shape" in info.value.message
