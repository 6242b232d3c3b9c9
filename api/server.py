"""Running the API under uvicorn, in the foreground (`serve_api`) or beside other work (`running_api`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from domain.errors import ConfigurationError, InfrastructureError

SETTING = "RETRAINER_API_ADDRESS"


def parse_address(address: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" (port 0: any free port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"{SETTING}: must be HOST:PORT, e.g. 127.0.0.1:8080 (got {address!r})")
    return host.strip("[]"), int(port)


def _config(app: FastAPI, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level.lower(), server_header=False)


def _bind(address: str) -> socket.socket:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: with protocol 0 asyncio does not set TCP_NODELAY on accepted
    # connections, and every response then waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfrastructureError(f"{SETTING}: cannot listen on {address} ({e.strerror}); pick a free port") from e
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve_api(app: FastAPI, address: str, *, log_level: str = "info") -> None:
    """Serves `app` on "HOST:PORT" until SIGINT/SIGTERM (when called from the main thread)."""
    sock = _bind(address)
    try:
        uvicorn.Server(_config(app, log_level)).run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def running_api(
    app: FastAPI, address: str = "127.0.0.1:0", *, log_level: str = "warning", start_timeout: float = 10.0
) -> Iterator[str]:
    """Serves `app` in a background thread; yields its base URL (http://HOST:PORT) once it accepts
    connections and stops it on exit. Port 0 takes a free port, so tests never collide."""
    sock = _bind(address)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(_config(app, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="retrainer-api", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InfrastructureError(f"the API did not start on {host}:{port} within {start_timeout} s")
            time.sleep(0.01)
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout)
        sock.close()
