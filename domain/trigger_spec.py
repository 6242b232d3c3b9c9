"""The pipeline spec's `triggers` section (CONTRACT section 2): events, a cron schedule, manual runs.

Kept beside `domain/spec.py` (which re-exports these names) so that the spec module stays small.
croniter checks `triggers.schedule.cron` field by field, with the rules Prefect's scheduler adds.
"""

from __future__ import annotations

import difflib
import functools
import re
import zoneinfo
from typing import Literal

from croniter import CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Prefect's scheduler accepts these nicknames besides the 5 fields; @reboot has no schedule to follow.
_CRON_NICKNAMES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31 or L"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, N#K for the K-th weekday N"),
)
# croniter accepts these, Prefect's scheduler refuses them: R/H (random/hashed, not names such as
# MAR or THU) and W (nearest weekday).
_CRON_PREFECT_REFUSES = (
    (re.compile(r"(?<![A-Z])[RH](?![A-Z])", re.IGNORECASE), "R and H (random/hashed values)"),
    (re.compile(r"\dW", re.IGNORECASE), "W (nearest weekday)"),
)


class EventTriggerSpec(_Strict):
    debounce_seconds: float = Field(default=60, ge=0)
    max_wait_seconds: float = Field(default=600, gt=0)
    while_running: Literal["queue", "supersede", "skip"] = "queue"

    @model_validator(mode="after")
    def _bounds(self) -> EventTriggerSpec:
        if self.max_wait_seconds < self.debounce_seconds:
            raise ValueError(
                f"max_wait_seconds ({self.max_wait_seconds}) must be >= debounce_seconds ({self.debounce_seconds})"
            )
        return self


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        # Prefect checks membership in this set (a zone file such as 'posixrules' loads but is refused there).
        if value not in _time_zones():
            close = difflib.get_close_matches(value, sorted(_time_zones()), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown time zone {value!r}{hint}; use an IANA name like UTC or Europe/Berlin")
        return value


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def cron_problem(expression: str) -> str | None:
    """Why Prefect's scheduler would refuse `expression` (or never fire it); None when it is usable.

    Every field's range is checked by croniter (strict: a day that no listed month has, such as
    `0 0 31 2 *`, never fires and is refused too); the message names the field that is wrong.
    """
    text = expression.strip()
    if text.lower() in _CRON_NICKNAMES:
        return None
    fields = text.split()
    if len(fields) != 5:
        counted = f"{len(fields)} field{'' if len(fields) == 1 else 's'}"
        return (
            f"must be a 5-field cron expression (minute hour day-of-month month day-of-week) like '0 3 * * *', "
            f"or one of {', '.join(_CRON_NICKNAMES)} (got {expression!r}: {counted})"
        )
    for position, ((name, allowed), field) in enumerate(zip(_CRON_FIELDS, fields, strict=True)):
        for pattern, what in _CRON_PREFECT_REFUSES:
            if pattern.search(field):
                return f"{name} field {field!r} uses {what}, which Prefect's scheduler does not support"
        # The field alone, the others '*': croniter's own message does not say which field is wrong.
        probe = " ".join(field if i == position else "*" for i in range(5))
        if not croniter.is_valid(probe, strict=True):
            return f"{name} field {field!r} is not valid: allowed are {allowed}, with * , - / (got {expression!r})"
    try:
        croniter.expand(text, strict=True)
    except CroniterError as e:
        return f"{expression!r} is not a usable schedule ({e})"
    return None


class TriggersSpec(_Strict):
    events: EventTriggerSpec = Field(default_factory=EventTriggerSpec)
    schedule: ScheduleSpec | None = None
    manual: bool = True
