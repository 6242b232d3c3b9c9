"""Prefect really runs a flow with the pinned FastAPI/Starlette (its server imports and serves)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FLOW = textwrap.dedent(
    """
    from prefect import flow, task
    from prefect.context import get_run_context

    @task(retries=1)
    def add(a: int, b: int) -> int:
        return a + b

    @flow(name="retrainer-smoke")
    def smoke(x: int) -> int:
        assert get_run_context().flow_run is not None
        return add(x, 1)

    state = smoke(41, return_state=True)
    print("STATE", state.type.value, "RESULT", state.result())
    """
)


def test_a_flow_runs_against_a_real_prefect_server(tmp_path: Path) -> None:
    script = tmp_path / "smoke.py"
    script.write_text(FLOW)
    # No PREFECT_API_URL: Prefect starts its own local server (SQLite under PREFECT_HOME).
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STATE COMPLETED RESULT 42" in result.stdout
    assert "Starting temporary server" in result.stderr or "temporary server" in result.stderr.lower()
