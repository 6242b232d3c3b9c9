"""Running an ASGI app under uvicorn on "HOST:PORT": in the foreground until SIGINT/SIGTERM
(`serve`) or in a background thread beside other work (`running`). Every Retrainer process that
listens (API, model server, the health/metrics port of the others) goes through here, so each
binds the same way and names its own setting when the address is wrong or taken.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

from domain.errors import ConfigurationError, InfrastructureError
from domain.settings import split_address


def parse_address(address: str, setting: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" (port 0: any free port); `setting` names the variable in errors."""
    try:
        return split_address(address)
    except ValueError as e:
        raise ConfigurationError(f"{setting}: {e}") from e


def bind(address: str, setting: str) -> socket.socket:
    """A listening, non-blocking socket on `address`."""
    host, port = parse_address(address, setting)
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and without it
    # every response (headers and body written separately) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfrastructureError(f"{setting}: cannot listen on {address} ({e.strerror}); pick a free port") from e
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def base_url(sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _server(app: Any, log_level: str, options: dict[str, Any]) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), server_header=False, **options))


def serve(app: Any, address: str, setting: str, *, log_level: str = "info", **options: Any) -> None:
    """Serves `app` on `address` until SIGINT/SIGTERM (uvicorn's handlers: call from the main thread).
    `options` go to `uvicorn.Config` (e.g. access_log=False)."""
    sock = bind(address, setting)
    try:
        _server(app, log_level, options).run(sockets=[sock])
    finally:
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread, failure: str, timeout: float) -> None:
    """Until `server` accepts connections; InfrastructureError(`failure`) after `timeout` s, or at
    once if its thread ended (uvicorn logged why)."""

    deadline = stop_after_delay(timeout)

    def give_up(_state: RetryCallState) -> None:
        raise InfrastructureError(failure)

    Retrying(
        stop=lambda state: not thread.is_alive() or deadline(state),
        wait=wait_fixed(0.01),
        retry=retry_if_result(lambda started: not started),
        retry_error_callback=give_up,
    )(lambda: server.started)


@contextmanager
def running(
    app: Any,
    address: str,
    setting: str,
    *,
    name: str,
    log_level: str = "warning",
    start_timeout: float = 10.0,
    **options: Any,
) -> Iterator[str]:
    """Serves `app` in a background thread; yields its base URL once it accepts connections and
    stops it on exit. Port 0 takes a free port, so tests never collide. `name` (e.g. "the API")
    is what a start-up failure calls it."""
    sock = bind(address, setting)
    server = _server(app, log_level, options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"retrainer-{setting}", daemon=True)
    thread.start()
    url = base_url(sock)
    try:
        _wait_started(server, thread, f"{name} did not start on {url} within {start_timeout} s", start_timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout)
        sock.close()
