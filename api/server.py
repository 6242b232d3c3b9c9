"""Running the API under uvicorn, in the foreground (`serve_api`) or beside other work (`running_api`),
through the one server helper of `web/server.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from web import server

SETTING = "RETRAINER_API_ADDRESS"


def parse_address(address: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" (port 0: any free port); errors name RETRAINER_API_ADDRESS."""
    return server.parse_address(address, SETTING)


def serve_api(app: FastAPI, address: str, *, log_level: str = "info") -> None:
    """Serves `app` on "HOST:PORT" until SIGINT/SIGTERM (when called from the main thread)."""
    server.serve(app, address, SETTING, log_level=log_level)


@contextmanager
def running_api(
    app: FastAPI, address: str = "127.0.0.1:0", *, log_level: str = "warning", start_timeout: float = 10.0
) -> Iterator[str]:
    """Serves `app` in a background thread; yields its base URL (http://HOST:PORT) once it accepts
    connections and stops it on exit. Port 0 takes a free port, so tests never collide."""
    with server.running(app, address, SETTING, name="the API", log_level=log_level, start_timeout=start_timeout) as url:
        yield url
