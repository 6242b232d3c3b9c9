"""The pipeline spec's `notifications` section: webhooks that receive the pipeline's decision events.

Kept beside `domain/spec.py` (which re-exports these names) so that the spec module stays small.
Each webhook gets the same CloudEvent the relay publishes to Kafka (domain/decisions.py), in HTTP
structured mode, signed with the secret held by the environment variable `secret_env` (flows/webhooks.py).
The secret is read when a delivery is sent, not here: the machine that validates a spec is often
not the one that delivers.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from domain.decisions import DecisionType

ALL_EVENTS = "*"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="http:// or https:// address that receives each event by POST.")
    events: list[str] = Field(
        default_factory=lambda: [ALL_EVENTS],
        min_length=1,
        description='Event types to deliver (domain/decisions.py DecisionType), or ["*"] for all.',
    )
    secret_env: str = Field(description="Name of the environment variable that holds the signing secret.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"must be an http:// or https:// URL with a host, like https://hooks.example.com/x (got {value!r})"
            )
        return value

    @field_validator("events")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        known = {kind.value for kind in DecisionType}
        unknown = [kind for kind in value if kind != ALL_EVENTS and kind not in known]
        if unknown:
            raise ValueError(f"unknown event types {unknown}; use ['*'] or some of {sorted(known)}")
        return value

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError(f"must be an environment variable's name, like HOOK_SECRET (got {value!r})")
        return value

    def wants(self, kind: str) -> bool:
        return ALL_EVENTS in self.events or kind in self.events


class NotificationsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    webhooks: list[WebhookSpec] = Field(default_factory=list)
