"""Opaque cursors of the API's list endpoints: where the previous page ended, as URL-safe base64.

A client passes `next_cursor` back as `?cursor=` and never reads it; the server can change what is
inside without breaking anyone. A cursor that does not decode is refused (400 invalid_input) with
the fix, rather than silently starting again from the first page.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from domain.errors import InvalidInputError
from storage.repositories import RunPosition

MAX_CURSOR_CHARS = 200


def encode_run_cursor(position: RunPosition) -> str:
    raw = json.dumps([position.created_at.isoformat(), position.run_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode_run_cursor(cursor: str) -> RunPosition:
    """The position a `next_cursor` of GET /api/v1/runs stands for."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None or not isinstance(run_id, str):
            raise ValueError("not a run position")
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as err:
        raise InvalidInputError(
            f"cursor {cursor[:40]!r} is not one this API gave out; pass the `next_cursor` of the previous "
            "page unchanged, or leave `cursor` out to start from the newest run"
        ) from err
    return RunPosition(moment, run_id)
