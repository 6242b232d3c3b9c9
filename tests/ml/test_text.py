"""Text data (ml/text.py, `data.text_column`): the spec's rules, reading a text column into token ids
with the bundled MiniLM tokenizer, the tokenizer carried in a manifest and verified, the demo topics
data, and a missing optional package named with its extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domain.data_spec import DataSpec
from domain.errors import ArtifactIntegrityError, ConfigurationError, InvalidInputError, SpecError
from domain.spec import parse_spec
from ml.demo_data import write_csv_atomically
from ml.demo_text import ROWS, text_versions, topic_sentences
from ml.loaders import load_data
from ml.text import PAD_ID, TextTokenizer, require

pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install 'retrainer[text]'")


MODEL = {"architecture": "transformer", "input_shape": [16], "output_classes": 3}


def text_spec(data: dict[str, Any]) -> dict[str, Any]:
    """A transformer over token ids, reading `data`."""
    return {"name": "p", "dataset": "d", "data": data, "model": MODEL}


def test_a_text_column_turns_standardization_off_and_its_companions_are_checked() -> None:
    data = parse_spec(text_spec({"text_column": "text"}), source="s").data
    assert data.text_column == "text" and data.standardize is False and data.tokenizer is None
    assert DataSpec(text_column="body", format="parquet").format == "parquet"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"text_column": "text", "format": "npz"}, "data.text_column reads a csv or parquet table"),
        ({"text_column": "label"}, "also data.target"),
        ({"text_column": "text", "standardize": True}, "must not be standardized"),
        ({"text_column": "text", "columns": ["a"]}, "data.columns"),
        ({"tokenizer": "tok.json"}, "set data.text_column"),
    ],
)
def test_contradictory_text_settings_are_refused_with_the_fix(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec(text_spec(data), source="s")
    assert refused.value.code == "invalid_spec" and fragment in refused.value.message


def write(path: Path, texts: list[Any], labels: list[Any]) -> Path:
    write_csv_atomically(pa.table({"text": texts, "label": labels}), path)
    return path


def test_a_text_csv_becomes_padded_token_ids_and_parquet_reads_the_same(tmp_path: Path) -> None:
    texts, labels = ["Goal in the last minute.", "Shares fell.", "Snow tomorrow " * 20], [0, 1, 2]
    data = DataSpec(text_column="text")
    table = load_data(write(tmp_path / "t.csv", texts, labels), data, input_shape=[12])
    assert table.features.shape == (3, 12) and table.labels.tolist() == labels
    assert table.feature_names[0] == "token_0" and table.feature_names[-1] == "token_11"
    ids = table.features.astype(np.int64)
    assert ids[0, 0] == 101 and (ids[1] == PAD_ID).sum() > 0  # [CLS] first, short rows padded with 0
    assert (ids[2] != PAD_ID).all()  # a long row is truncated to exactly T tokens
    np.testing.assert_array_equal(ids, TextTokenizer.for_data(None, [12]).encode(texts))

    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "t.parquet")
    parquet = load_data(tmp_path / "t.parquet", DataSpec(text_column="text", format="parquet"), input_shape=[12])
    np.testing.assert_array_equal(parquet.features, table.features)


def test_bad_text_tables_are_refused_naming_the_file_column_and_row(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["a", "b"], [0, 1])
    with pytest.raises(InvalidInputError) as refused:
        load_data(path, DataSpec(text_column="body"), input_shape=[8])
    assert "no column 'body' (data.text_column)" in refused.value.message

    numbers = tmp_path / "n.csv"
    numbers.write_text("text,label\n1,0\n2,1\n")
    with pytest.raises(InvalidInputError) as refused:
        load_data(numbers, DataSpec(text_column="text"), input_shape=[8])
    assert "must hold text" in refused.value.message

    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": ["a", None], "label": [0, 1]}), empty)
    with pytest.raises(InvalidInputError) as refused:
        load_data(empty, DataSpec(text_column="text", format="parquet"), input_shape=[8])
    assert "row 1" in refused.value.message and str(empty) in refused.value.message

    with pytest.raises(InvalidInputError) as refused:
        load_data(path, DataSpec(text_column="text"), input_shape=[4, 4])
    assert refused.value.code == "invalid_input" and "model.input_shape [4, 4]" in refused.value.message

    with pytest.raises(InvalidInputError) as refused:
        load_data(path, DataSpec(text_column="text", tokenizer=str(tmp_path / "missing.json")), input_shape=[8])
    assert "data.tokenizer" in refused.value.message


def test_the_tokenizer_travels_in_the_manifest_and_a_changed_one_is_refused() -> None:
    tokenizer = TextTokenizer.for_data(None, [16])
    entry = tokenizer.to_manifest()
    back = TextTokenizer.from_manifest(entry, "model v1")
    assert back.sha256 == tokenizer.sha256 and back.max_length == 16
    np.testing.assert_array_equal(back.encode(["Fog at dawn."]), tokenizer.encode(["Fog at dawn."]))

    with pytest.raises(ArtifactIntegrityError) as refused:
        TextTokenizer.from_manifest({**entry, "sha256": "f" * 64}, "model v1")
    assert refused.value.code == "artifact_integrity" and "model v1" in refused.value.message
    with pytest.raises(InvalidInputError):
        TextTokenizer.from_manifest({"sha256": entry["sha256"]}, "model v1")


def test_a_missing_optional_package_names_the_extra() -> None:
    with pytest.raises(ConfigurationError) as refused:
        require("retrainer_no_such_module", "a text pipeline")
    assert "retrainer[text]" in refused.value.message and "retrainer_no_such_module" in refused.value.message


def test_demo_topics_are_deterministic_balanced_and_v2_extends_v1(tmp_path: Path) -> None:
    texts, labels = topic_sentences(60)
    assert (texts, labels) == topic_sentences(60) and np.bincount(labels).tolist() == [20, 20, 20]
    paths = text_versions(tmp_path)
    first = paths["v1"].read_text().splitlines()
    second = paths["v2"].read_text().splitlines()
    assert first[0] == "text,label" and len(first) == ROWS["v1"] + 1 and len(second) == ROWS["v2"] + 1
    assert second[: len(first)] == first
