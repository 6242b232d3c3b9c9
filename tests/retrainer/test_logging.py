from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.logcontext import current_log_context, log_context
from retrainer.logs import setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    setup_logging("INFO", "json", stream=buffer)
    yield buffer
    setup_logging("WARNING", "console")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_with_the_context_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("retrainer.test")
    log.info("outside")
    with log_context(pipeline="digits", run_id="run-1"):
        with log_context(event_id="evt-9"):
            log.info("inside", extra={"step": 3})
        log.warning("after inner")
    first, inner, after = lines(stream)
    assert first["message"] == "outside"
    assert (first["pipeline"], first["run_id"], first["event_id"]) == (None, None, None)
    assert inner["pipeline"] == "digits" and inner["run_id"] == "run-1" and inner["event_id"] == "evt-9"
    assert inner["step"] == 3 and inner["level"] == "info" and inner["logger"] == "retrainer.test"
    assert after["event_id"] is None and after["run_id"] == "run-1"


def test_exceptions_are_one_json_line(stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (entry,) = lines(stream)
    assert "ValueError: boom" in str(entry["exception"])


def test_context_does_not_leak_between_threads() -> None:
    seen: dict[str, object] = {}

    def other() -> None:
        seen.update(current_log_context())

    with log_context(run_id="main-run"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["run_id"] is None


LOGS_TO_FILE_SCRIPT = """
import logging, os, sys
from pathlib import Path
from retrainer.logs import logs_to_file, setup_logging

setup_logging("INFO", "json")
with logs_to_file(Path(sys.argv[1]), "INFO", "json"):
    logging.getLogger("retrainer.demo").info("inside")
    # what uvicorn does when a server starts: a handler of its own on stderr, not propagating
    server = logging.getLogger("uvicorn.error")
    server.propagate = False
    server.addHandler(logging.StreamHandler(sys.stderr))
    server.warning("server line")
    os.write(2, b"native stderr line\\n")
    print("progress view", flush=True)
logging.getLogger("retrainer.demo").warning("after")
"""


def test_logs_to_file_keeps_every_log_line_off_the_terminal_while_it_runs(tmp_path: Path) -> None:
    """`retrainer demo` shows a progress view; the service's log lines, its own and those of the
    libraries it starts, go to the log file instead of interleaving with it."""
    log_file = tmp_path / "logs" / "service.log"
    done = subprocess.run(
        [sys.executable, "-c", LOGS_TO_FILE_SCRIPT, str(log_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "progress view\n"
    (after,) = (json.loads(line) for line in done.stderr.splitlines())
    assert after["message"] == "after" and after["level"] == "warning"
    written = log_file.read_text().splitlines()
    inside = json.loads(written[0])
    assert inside["message"] == "inside" and inside["logger"] == "retrainer.demo"
    assert written[1:] == ["server line", "native stderr line"]
