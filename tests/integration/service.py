"""`retrainer serve` as a subprocess for integration tests: started with the current environment,
healthy before the body runs, stopped with SIGTERM and required to exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 240.0


@contextmanager
def retrainer_serve(api_address: str, log_path: Path) -> Iterator[dict[str, dict[str, str]]]:
    """Runs `retrainer serve` (RETRAINER_* from os.environ) and yields its /healthz checks."""
    retrainer = str(Path(sys.executable).parent / "retrainer")
    with log_path.open("wb") as out:
        service = subprocess.Popen([retrainer, "serve"], env={**os.environ}, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield _wait_healthy(f"http://{api_address}/healthz", service, log_path)
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                code = service.wait(timeout=60)
            except subprocess.TimeoutExpired as hung:
                service.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
                time.sleep(1)
                service.kill()
                service.wait(timeout=10)
                raise AssertionError(
                    f"retrainer serve did not stop within 60 s:\n{log_path.read_text()[-6000:]}"
                ) from hung
    assert code == 0, log_path.read_text()[-3000:]


def _wait_healthy(url: str, service: subprocess.Popen[bytes], log: Path) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert service.poll() is None, log.read_text()[-3000:]
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                body: dict[str, dict[str, str]] = answer.json()["checks"]
                return body
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
