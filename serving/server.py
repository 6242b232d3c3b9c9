"""Running the model server under uvicorn (through `web/server.py`): in the foreground on
`Settings.serving_address` (`serve_models`) or in a background thread for tests and embedding
(`running_server`), and the process-wide tuning it wants first (`tune_process`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from web import server

SETTING = "RETRAINER_SERVING_ADDRESS"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024
# collections of the youngest generation every 10,000 allocations, not Python's 700 (see tune_process)
GC_THRESHOLDS = (10_000, 10, 10)

log = logging.getLogger(__name__)


def tune_process(torch_threads: int, *, fixed_mmap_threshold: bool = True) -> None:
    """Process-wide settings for serving, called once before the server starts:
    - torch's intra-op threads (`RETRAINER_SERVING_TORCH_THREADS`, 1 by default);
    - glibc's mmap threshold fixed at 128 KiB. By default glibc raises it after the first large
      free, so later weight tensors come from the heap and a swapped-out model's memory stays in
      the process; with it fixed, every tensor over 128 KiB is its own mapping, returned to the
      system when the model is freed (`bench/serving.py`, section 4);
    - the cyclic garbage collector: what is allocated so far (the imported modules: torch, FastAPI,
      ... some 300,000 objects) is frozen, so that no collection walks it again, and collections run
      every `GC_THRESHOLDS[0]` allocations. A request allocates dozens of objects, so with Python's
      defaults the server ran a collection every few requests and a full one (~170 ms holding the GIL,
      a stall of every request in flight) every few thousand (`bench/serving_oip.py` at 64 clients:
      ~11 µs of CPU per request, now ~2). Models are freed by reference counting, not by the collector.
    """
    import torch

    gc.collect()  # what is garbage now would be frozen with the rest and never collected
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
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


# No proxy-headers middleware: the model server never uses the client's address, and it costs per request.
_OPTIONS = {"access_log": False, "proxy_headers": False}


def _close_registry(app: FastAPI) -> None:
    registry = getattr(app.state, "registry", None)
    if registry is not None:
        registry.close()


def _announce(app: FastAPI, address: str) -> None:
    """The address the replica reports to the metadata database (`serving/reports.py`), when it reports."""
    reporter = getattr(app.state, "reporter", None)
    if reporter is not None:
        reporter.address = address


def serve_models(app: FastAPI, address: str, *, log_level: str = "info") -> None:
    """Serves `app` on "HOST:PORT" (e.g. `load_settings().serving_address`) until SIGINT/SIGTERM."""
    _announce(app, address)
    try:
        server.serve(app, address, SETTING, log_level=log_level, **_OPTIONS)
    finally:
        _close_registry(app)


@contextmanager
def running_server(
    app: FastAPI, address: str = "127.0.0.1:0", *, log_level: str = "warning", start_timeout: float = 10.0
) -> Iterator[str]:
    """Serves `app` in a background thread; yields its base URL once it accepts connections and
    stops it on exit. Port 0 takes a free port. The registry is left open (the caller owns it)."""
    with server.running(
        app, address, SETTING, name="the model server", log_level=log_level, start_timeout=start_timeout, **_OPTIONS
    ) as url:
        _announce(app, url)
        yield url
