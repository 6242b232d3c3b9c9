"""Bad configuration gives one clear line naming the setting and the address, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RETRAINER = str(Path(sys.executable).parent / "retrainer")


def run_cli(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RETRAINER_")}
    return subprocess.run(
        [RETRAINER, *args], cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_unreachable_database(tmp_path: Path) -> None:
    result = run_cli(
        "db", "upgrade", tmp_path=tmp_path, RETRAINER_DATABASE_URL="postgresql+psycopg://u:hunter2@127.0.0.1:1/x"
    )
    assert_one_clear_line(result, "RETRAINER_DATABASE_URL", "127.0.0.1:1", "not reachable")
    assert "hunter2" not in result.stderr


def test_malformed_setting(tmp_path: Path) -> None:
    result = run_cli("db", "upgrade", tmp_path=tmp_path, RETRAINER_DATABASE_URL="mysql://x")
    assert_one_clear_line(result, "RETRAINER_DATABASE_URL", "sqlite:///")


def test_check_names_each_unreachable_dependency(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        tmp_path=tmp_path,
        RETRAINER_ARTIFACT_ROOT="s3://retrainer/x",
        RETRAINER_S3_ENDPOINT_URL="http://127.0.0.1:9",
        RETRAINER_S3_ACCESS_KEY_ID="k",
        RETRAINER_S3_SECRET_ACCESS_KEY="s",
        RETRAINER_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
        RETRAINER_CONNECT_TIMEOUT_SECONDS="1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert "ok     database" in result.stdout
    assert "failed artifacts  RETRAINER_S3_ENDPOINT_URL=http://127.0.0.1:9" in result.stdout
    assert "failed kafka      RETRAINER_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9" in result.stdout


def test_embedded_defaults_work_in_an_empty_folder(tmp_path: Path) -> None:
    result = run_cli("db", "upgrade", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".retrainer" / "retrainer.db").exists()


def test_apikey_create_prints_the_key_once(tmp_path: Path) -> None:
    assert run_cli("db", "upgrade", tmp_path=tmp_path).returncode == 0
    created = run_cli("apikey", "create", "ci-bot", tmp_path=tmp_path)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("rt_")
    again = run_cli("apikey", "create", "ci-bot", tmp_path=tmp_path)
    assert_one_clear_line(again, "ci-bot", "already exists")


def test_input_the_user_can_fix_exits_2_and_a_failing_service_exits_1(tmp_path: Path) -> None:
    bad_uri = run_cli(
        "publish", "data-changed", "--dataset", "digits", "--uri", "ftp://x/y.csv", tmp_path=tmp_path,
        RETRAINER_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
    )  # fmt: skip
    assert_one_clear_line(bad_uri, "ftp://x/y.csv")
    assert bad_uri.returncode == 2
    unreachable = run_cli(
        "db", "upgrade", tmp_path=tmp_path, RETRAINER_DATABASE_URL="postgresql+psycopg://u:p@127.0.0.1:1/x"
    )
    assert unreachable.returncode == 1
