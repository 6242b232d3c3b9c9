"""`hyperparameters.param_groups` entries (its own module to keep domain/spec.py short)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ParamGroupSpec(BaseModel):
    """Optimizer settings for the trainable parameters whose name the `match` regex finds
    (re.search); the first group that matches a parameter takes it (see ml/param_groups.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1, description="Regex searched in parameter names, e.g. 'embeddings'.")
    lr_scale: float = Field(default=1.0, gt=0, description="This group's lr is learning_rate times this.")
    weight_decay: float | None = Field(
        default=None,
        ge=0,
        description="For every parameter of the group; None: hyperparameters.weight_decay, sparing "
        "biases and normalisation weights as for unmatched parameters.",
    )

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression ({e}) (got {value!r})") from None
        return value
