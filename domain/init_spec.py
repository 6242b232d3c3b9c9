"""`model.init`: where a run's starting weights come from (its own module to keep domain/spec.py short;
loaded by flows/warm_start.py and ml/init_weights.py)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class InitSpec(BaseModel):
    """Where the starting weights come from (`model.init`); without it a run starts from random weights."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    from_: str = Field(
        alias="from",
        description="'champion' (the current champion's weights and standardizer; none yet: from scratch), "
        "or a file:// or s3:// URI of a .safetensors file.",
    )
    sha256: str | None = Field(default=None, description="Required with a URI: the file's sha256, checked before use.")
    strict: bool = Field(default=True, description="Every key must match; false loads the matching keys only.")

    @model_validator(mode="after")
    def _verified_source(self) -> InitSpec:
        if self.from_ == "champion":
            if self.sha256 is not None:
                raise ValueError(
                    "sha256 is only for a URI: the champion is verified by the digest recorded with its version; "
                    "remove model.init.sha256"
                )
            return self
        scheme, sep, rest = self.from_.partition("://")
        if not sep or scheme not in ("file", "s3") or not rest.endswith(".safetensors"):
            raise ValueError(
                f"from must be 'champion' or a file:// or s3:// URI of a .safetensors file (got {self.from_!r})"
            )
        if self.sha256 is None:
            raise ValueError(
                f"sha256 is required with from: {self.from_} (weights are verified before use); "
                "add model.init.sha256: the file's digest (sha256sum FILE)"
            )
        if not _SHA256.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits (got {self.sha256!r})")
        return self
