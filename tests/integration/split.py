"""Processes for the split-deployment story (`test_split_deployment.py`): each `retrainer` command,
the Prefect server and workers, and nginx as a subprocess of its own with a log file in tmp,
waited healthy, SIGKILLed on purpose by the story and stopped (SIGTERM, then SIGKILL) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from retrainer.service import free_port

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


def bin_path(name: str) -> str:
    """A console script of this virtualenv (`retrainer`, `prefect`)."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str | None = None  # where it serves /healthz (or its own health route), if anywhere

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} ({self.log}) ---\n{self.log.read_text(errors='replace')[-chars:]}"

    def kill(self) -> None:
        """SIGKILL, as a crashed machine or an OOM kill would end it."""
        self.popen.kill()
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Fleet:
    """Starts processes with `env` (plus per-process extras), each logging to `logs`/NAME.log;
    `close` stops them newest first."""

    logs: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(
        self, name: str, argv: Sequence[str], *, extra: dict[str, str] | None = None, health: str | None = None
    ) -> Process:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv), env={**self.env, **(extra or {})}, stdout=out, stderr=subprocess.STDOUT
            )  # fmt: skip
        process = Process(name, popen, log, health)
        self.processes.append(process)
        if health is not None:
            wait_healthy(process)
        return process

    def retrainer(
        self, name: str, *args: str, extra: dict[str, str] | None = None, health: str | None = None
    ) -> Process:
        return self.start(name, [bin_path("retrainer"), *args], extra=extra, health=health)

    def with_health(self, name: str, *args: str) -> Process:
        """A `retrainer` command that serves /healthz on RETRAINER_HEALTH_ADDRESS (a free port)."""
        address = f"127.0.0.1:{free_port()}"
        return self.retrainer(
            name, *args, extra={"RETRAINER_HEALTH_ADDRESS": address}, health=f"http://{address}/healthz"
        )

    def once(self, name: str, *args: str) -> str:
        """Runs a one-shot `retrainer` command to its end; its output (it must exit 0)."""
        done = subprocess.run(
            [bin_path("retrainer"), *args], env=self.env, capture_output=True, text=True, timeout=300, check=False
        )  # fmt: skip
        (self.logs / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"retrainer {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done.stdout

    def logs_tail(self) -> str:
        return "\n".join(p.tail(1500) for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def wait_healthy(process: Process, timeout_s: float = START_TIMEOUT_S) -> None:
    assert process.url is not None
    wait_for(lambda: _answers(process), timeout_s, lambda: process.tail())


def _answers(process: Process) -> bool:
    assert process.alive, process.tail()
    try:
        return httpx.get(str(process.url), timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check: Callable[[], object], timeout_s: float, explain: Callable[[], str], every_s: float = 0.5) -> object:
    """`check()` until it returns something truthy (returned), or AssertionError with `explain()`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s:\n{explain()}"
        time.sleep(every_s)


NGINX_CONF = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
  log_format upstreams '$upstream_addr $status $request_uri';
  access_log {prefix}/access.log upstreams;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream models {{
{servers}
    keepalive 32;
  }}
  server {{
    listen {address};
    location / {{
      proxy_pass http://models;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 1s;
      # a refused connection never reached the replica: the request goes to the next one
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    assert found, "nginx is missing: infra/local/test.sh installs it (apt-get install -y nginx)"
    return found


def start_nginx(fleet: Fleet, upstreams: Sequence[str]) -> tuple[Process, str]:
    """nginx in the foreground balancing (round robin) over `upstreams` (host:port); its base URL."""
    prefix = fleet.logs / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    servers = "\n".join(f"    server {u} max_fails=1 fail_timeout=60s;" for u in upstreams)
    # as root, nginx's workers would otherwise switch to `nobody`, who cannot write the temp folders
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, servers=servers, address=address))
    argv = [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    process = fleet.start("nginx", argv)
    url = f"http://{address}"
    wait_for(lambda: _listening(process, url), 30, process.tail)
    return process, url


def answered_by_upstream(fleet: Fleet, path_suffix: str) -> Counter[str]:
    """From nginx's access log: per replica (host:port), the requests ending in `path_suffix` that
    it answered 200 (a request nginx retried on the next replica counts for the last one)."""
    counts: Counter[str] = Counter()
    for line in (fleet.logs / "nginx" / "access.log").read_text().splitlines():
        upstreams, status, uri = line.rsplit(" ", 2)
        if status == "200" and uri.endswith(path_suffix):
            counts[upstreams.split(",")[-1].strip()] += 1
    return counts


def _listening(process: Process, url: str) -> bool:
    assert process.alive, process.tail() + (Path(process.log.parent / "nginx" / "error.log").read_text())
    try:
        httpx.get(f"{url}/healthz", timeout=2)
        return True
    except httpx.HTTPError:
        return False
