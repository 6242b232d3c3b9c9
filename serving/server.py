"""Running the model server under uvicorn: in the foreground on `Settings.serving_address`
(`serve_models`) or in a background thread for tests and embedding (`running_server`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from domain.errors import ConfigurationError, InfrastructureError

SETTING = "RETRAINER_SERVING_ADDRESS"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024

log = logging.getLogger(__name__)


def tune_process(torch_threads: int, *, fixed_mmap_threshold: bool = True) -> None:
    """Process-wide settings for serving, called once before the server starts:
    - torch's intra-op threads (`RETRAINER_SERVING_TORCH_THREADS`, 1 by default);
    - glibc's mmap threshold fixed at 128 KiB. By default glibc raises it after the first large
      free, so later weight tensors come from the heap and a swapped-out model's memory stays in
      the process; with it fixed, every tensor over 128 KiB is its own mapping, returned to the
      system when the model is freed (`bench/serving.py`, section 4).
    """
    import torch

    torch.set_num_threads(torch_threads)
    if not fixed_mmap_threshold:
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        ok = libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except OSError:
        ok = False
    if not ok:
        log.info("mallopt(M_MMAP_THRESHOLD) not available (not glibc): swapped-out models may keep heap memory")


def parse_address(address: str) -> tuple[str, int]:
    """("HOST", PORT) from "HOST:PORT" (port 0: any free port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigurationError(f"{SETTING}: must be HOST:PORT, e.g. 127.0.0.1:8081 (got {address!r})")
    return host.strip("[]"), int(port)


def _bind(address: str) -> socket.socket:
    host, port = parse_address(address)
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and without it
    # every response (headers and body written separately) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfrastructureError(f"{SETTING}: cannot listen on {address} ({e.strerror}); pick a free port") from e
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    # No proxy-headers middleware: the model server never uses the client's address, and it costs per request.
    config = uvicorn.Config(
        app, log_level=log_level.lower(), server_header=False, access_log=False, proxy_headers=False
    )
    return uvicorn.Server(config)


def _close_registry(app: FastAPI) -> None:
    registry = getattr(app.state, "registry", None)
    if registry is not None:
        registry.close()


def serve_models(app: FastAPI, address: str, *, log_level: str = "info") -> None:
    """Serves `app` on "HOST:PORT" (e.g. `load_settings().serving_address`) until SIGINT/SIGTERM."""
    sock = _bind(address)
    try:
        _server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
        _close_registry(app)


@contextmanager
def running_server(
    app: FastAPI, address: str = "127.0.0.1:0", *, log_level: str = "warning", start_timeout: float = 10.0
) -> Iterator[str]:
    """Serves `app` in a background thread; yields its base URL once it accepts connections and
    stops it on exit. Port 0 takes a free port. The registry is left open (the caller owns it)."""
    sock = _bind(address)
    host, port = sock.getsockname()[:2]
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="retrainer-serving", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InfrastructureError(f"the model server did not start on {host}:{port} within {start_timeout} s")
            time.sleep(0.01)
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout)
        sock.close()
