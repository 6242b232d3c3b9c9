"""`retrainer demo` on embedded defaults in an empty folder: the real flow, three decisions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_tells_the_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRAINER_", "PREFECT_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "retrainer"), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("v1 (") and "passed: first model" in line for line in lines), result.stdout
    assert any(line.startswith("v2 (") and "passed: every check" in line for line in lines), result.stdout
    assert any(line.startswith("v3 (") and line.split(": ", 1)[1].startswith("rejected") for line in lines)
    assert (tmp_path / ".retrainer" / "retrainer.db").exists()
