"""The pipeline spec's `data` section (CONTRACT section 2): how fetched data becomes a table.

Kept beside `domain/spec.py` (which re-exports `DataSpec`) so that the spec module stays small.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DataSpec(BaseModel):
    """How the fetched data becomes a table. `format` picks a built-in reader; with `loader` the
    user's function reads it instead, and `format` is `loader` (set when omitted; a reader's name
    next to a loader is refused as contradictory). Whether `loader` imports is checked by
    ml/loaders.py's `loader_problems`, so this module imports no user code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["csv", "parquet", "npz", "loader"] = Field(
        default="csv", description="csv, parquet (a file or a folder of files), npz; 'loader' with data.loader."
    )
    target: str | list[str] = Field(
        default="label",
        description="The target column; for regression a list of columns (one model output each).",
    )
    columns: list[str] | None = Field(
        default=None, min_length=1, description="Feature columns, in this order; default: every column but target."
    )
    loader: str | None = Field(
        default=None, description="'package.module:function' called as fn(path, **params) -> (features, targets)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for data.loader.")
    validation_fraction: float = Field(default=0.15, ge=0, lt=1)
    test_fraction: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 0
    standardize: bool = Field(default=True, description="False for token-id inputs (transformer).")
    text_column: str | None = Field(
        default=None,
        description="A text pipeline's column of strings (csv/parquet), tokenised to model.input_shape [T] token ids.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="With text_column: a tokenizer.json or its folder; default: the bundled MiniLM tokenizer.",
    )

    @property
    def target_columns(self) -> list[str]:
        """`target` as a list: one name for a string, the listed names (in order) for a list."""
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @field_validator("target", mode="before")
    @classmethod
    def _target_names(cls, value: Any) -> Any:
        # Checked before pydantic's union so that a bad value gets one line, not one per union member.
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must name a column (got an empty string)")
            return value
        if not isinstance(value, list):
            raise ValueError(
                f"must be a column name or, for a regression with several outputs, a list of column names "
                f"(got {type(value).__name__} {value!r})"
            )
        if not value:
            raise ValueError("lists no column; name at least one target column")
        for position, name in enumerate(value):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"entry {position} ({name!r}) must be a column name (a non-empty string)")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(map(repr, repeated))} more than once; list each target column once")
        return value

    @model_validator(mode="before")
    @classmethod
    def _loader_format(cls, document: Any) -> Any:
        if isinstance(document, dict) and document.get("loader") is not None and "format" not in document:
            return {**document, "format": "loader"}
        return document

    @model_validator(mode="before")
    @classmethod
    def _text_is_not_standardized(cls, document: Any) -> Any:
        # Token ids are categories, not measurements: a text pipeline leaves them unscaled by default.
        if isinstance(document, dict) and document.get("text_column") is not None and "standardize" not in document:
            return {**document, "standardize": False}
        return document

    @model_validator(mode="after")
    def _text(self) -> DataSpec:
        if self.text_column is None:
            if self.tokenizer is not None:
                raise ValueError("data.tokenizer tokenises data.text_column: set data.text_column or remove it")
            return self
        if self.format not in ("csv", "parquet") or self.loader is not None:
            raise ValueError(
                f"data.text_column reads a csv or parquet table (data.format is {self.format!r}): use csv or parquet"
            )
        if self.text_column in self.target_columns:
            raise ValueError(f"data.text_column {self.text_column!r} is also data.target: name the text column")
        if self.columns is not None:
            raise ValueError("data.columns selects numeric features; a text pipeline reads data.text_column only")
        if self.standardize:
            raise ValueError("data.standardize: token ids of data.text_column must not be standardized; remove it")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataSpec:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"validation_fraction + test_fraction must be < 1 "
                f"(got {self.validation_fraction} + {self.test_fraction}); nothing would be left to train on"
            )
        return self

    @model_validator(mode="after")
    def _reader_or_loader(self) -> DataSpec:
        if self.loader is not None:
            module_name, sep, function = self.loader.partition(":")
            if not (sep and module_name and function):
                raise ValueError(f"data.loader must be an import path 'package.module:function' (got {self.loader!r})")
            if self.format != "loader":
                raise ValueError(
                    f"data.format {self.format!r} contradicts data.loader {self.loader!r} (the loader reads the data "
                    "itself): remove data.format"
                )
            if self.columns is not None:
                raise ValueError(
                    "data.columns selects table columns, but data.loader returns arrays: choose the "
                    "features in the loader and remove data.columns"
                )
        elif self.format == "loader":
            raise ValueError("data.format 'loader' needs data.loader 'package.module:function'")
        elif self.params:
            raise ValueError("data.params are data.loader's arguments: set data.loader or remove data.params")
        if self.columns is not None:
            targets = [name for name in self.columns if name in self.target_columns]
            if targets:
                raise ValueError(f"data.columns lists {targets[0]!r}, the target (data.target): list only features")
            repeated = sorted({name for name in self.columns if self.columns.count(name) > 1})
            if repeated:
                raise ValueError(f"data.columns lists {', '.join(map(repr, repeated))} more than once")
            if self.format == "npz":
                raise ValueError("data.columns names table columns, but npz arrays have none: remove data.columns")
        return self
