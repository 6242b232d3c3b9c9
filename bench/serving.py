"""The built-in model server under load: real HTTP over loopback against a real uvicorn server.

The model is the demo pipeline's (pipelines/digits-classifier.yaml: MLP 64-128-64-10, fp32),
packaged, stored and loaded the way the server loads a registered version (`save_package` →
local artifact store → `load_version`). Every server runs in its own process (this script with
`--serve`), so the load generator never shares a GIL with it. The load generator is one asyncio
loop in this process with N keep-alive connections, each sending one-row OIP v2 requests back to
back (closed loop) for a fixed time per cell; requests that start in the warm-up are not counted.

1. Throughput and p50/p99 latency at 1, 16 and 64 clients, batching ON vs OFF (`BatchingConfig`),
   as shipped (one torch intra-op thread, `RETRAINER_SERVING_TORCH_THREADS=1`) and with two threads,
   with LitServe (same model, body and outputs, with and without its batching) as a peer when it is installed. Our four
   servers stay up and their cells alternate, the order rotating each round. Diagnostics: server
   and load-generator CPU per request, mean rows per forward pass (from /metrics), and the HTTP
   floor (`GET /v2/health/live`: uvicorn + FastAPI with no model and no body).
2. The ceiling: rows/s through `LoadedModel.predict` in-process at batch 1 and at the server's max
   batch size, and where a request's CPU goes.
3. The traffic split: champion only vs 50/50 champion/canary at 64 clients.
4. The server's resident memory (RSS, /proc) with one version, two (champion + canary), after
   removing the canary and after swapping the champion, for a bigger MLP (64-2048-2048-10), with
   the count of loaded-model objects still alive (weak references) to tell a model kept alive from
   freed memory the allocator keeps; as shipped (`tune_process` fixes glibc's mmap threshold) and with
   glibc's default, adaptive threshold.

Targets: batching ON/OFF >= 3x at 64 clients; p99 <= 20 ms at 16 clients (batching ON).
MLServer as a peer on JSON, binary tensors and gRPC, and the request decoder: bench/serving_oip.py.

    .venv/bin/python bench/serving.py [--seconds 2.5] [--rounds 2] [--peer-rounds 1] [--quick] [--no-litserve]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import http.client
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench.support.measures import current_rss_mb, percentile  # noqa: E402
from serving.batching import BatchingConfig  # noqa: E402

PIPELINE = "digits"
INFER_PATH = f"/v2/models/{PIPELINE}/infer"
SPEC = yaml.safe_load((ROOT / "pipelines" / "digits-classifier.yaml").read_text())["model"]
FEATURES = int(SPEC["input_shape"][0])
CLASSES = int(SPEC["output_classes"])
DEMO_PARAMS: dict[str, Any] = dict(SPEC["params"])
BIG_PARAMS: dict[str, Any] = {**DEMO_PARAMS, "hidden_sizes": [2048, 2048]}
BATCHING = BatchingConfig()  # the server's defaults: max batch 64, max wait 2 ms
CLIENTS = (1, 16, 64)
TARGET_BATCHING_RATIO = 3.0  # batching ON / OFF throughput at 64 clients
TARGET_P99_MS = 20.0  # at 16 clients, batching ON
CHILD_TAG = "@@"  # the child servers' answers on stdout start with this
GLIBC_DEFAULT_ENV = "BENCH_GLIBC_DEFAULT_MMAP"  # "1": the server child leaves glibc's mmap threshold adaptive


def tune_threads() -> int:
    from domain.settings import Settings

    return int(Settings.model_fields["serving_torch_threads"].default)


def describe(params: dict[str, Any]) -> str:
    return "-".join(str(n) for n in [FEATURES, *params["hidden_sizes"], CLASSES])


def standardizer() -> Any:
    from ml.data import Standardizer

    # digits pixels are 0..16; the demo's fitted statistics look like this
    return Standardizer(mean=np.full(FEATURES, 5.0, np.float32), std=np.full(FEATURES, 5.5, np.float32))


def module_for(params: dict[str, Any], seed: int) -> torch.nn.Module:
    from ml.zoo import build_model

    torch.manual_seed(seed)
    return build_model(str(SPEC["architecture"]), dict(params), [FEATURES], CLASSES).eval()


# ------------------------------------------------------------------ child: our model server


def serve_retrainer(batching: bool, params: dict[str, Any]) -> None:
    """Runs the model server (`running_server`) and obeys one-line commands on stdin:
    `canary V W`, `champion V`, `remove-canary`, `rss`, `gc`, `trim`, `quit` (or end of input)."""
    with tempfile.TemporaryDirectory(prefix="retrainer-bench-serving-") as folder:
        _serve_retrainer(batching, params, Path(folder))


def _serve_retrainer(batching: bool, params: dict[str, Any], work: Path) -> None:
    from domain.entities import ModelStage, ModelVersion
    from ml.package import MANIFEST_FORMAT, save_package
    from serving.app import create_serving_app
    from serving.grpc_server import SETTING as GRPC_SETTING
    from serving.grpc_server import grpc_beside
    from serving.registry import LoadedModel, ModelRegistry, load_version
    from serving.server import running_server, tune_process
    from storage.artifacts.local import LocalArtifactStore

    # as `retrainer serve` does; the comparison columns change it through the environment
    tune_process(
        int(os.environ.get("RETRAINER_SERVING_TORCH_THREADS", "1")),
        fixed_mmap_threshold=os.environ.get(GLIBC_DEFAULT_ENV) != "1",
    )

    config = BatchingConfig(enabled=batching)
    store = LocalArtifactStore(f"file://{work / 'artifacts'}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "architecture": SPEC["architecture"],
        "params": params,
        "input_shape": [FEATURES],
        "output_classes": CLASSES,
        "variant": "none",
        "standardizer": standardizer().to_dict(),
        "feature_names": [f"pixel_{i}" for i in range(FEATURES)],
    }
    loaded: list[weakref.ref[LoadedModel]] = []

    def load(version: int) -> LoadedModel:
        saved = save_package(module_for(params, seed=version), manifest, work / f"v{version}.pt")
        ref = store.put_file(saved.path)
        now = datetime.now(UTC)
        entity = ModelVersion(
            id=version,
            pipeline=PIPELINE,
            version=version,
            run_id=None,
            artifact_uri=ref.uri,
            sha256=ref.sha256,
            size_bytes=ref.size,
            metrics={},
            stage=ModelStage.CANDIDATE,
            created_at=now,
            stage_changed_at=now,
            manifest=manifest,
        )
        model = load_version(store, entity, batching=config, work_dir=work)
        loaded.append(weakref.ref(model))
        return model

    def handle(command: list[str]) -> dict[str, Any]:  # a function: no local outlives the command
        if command[0] == "canary":
            registry.set_canary(load(int(command[1])), float(command[2]))
        elif command[0] == "champion":
            registry.set_champion(load(int(command[1])))
        elif command[0] == "remove-canary":
            registry.remove_canary(PIPELINE)
        elif command[0] == "gc":
            gc.collect()
        elif command[0] == "trim":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        elif command[0] != "rss":
            raise ValueError(f"unknown command {command}")
        return {"rss_mb": current_rss_mb(), "alive": sum(r() is not None for r in loaded)}

    registry = ModelRegistry([PIPELINE], rng=random.Random(0))  # noqa: S311
    registry.set_champion(load(1))
    app = create_serving_app(registry)
    with running_server(app) as url, grpc_beside(app, os.environ.get(GRPC_SETTING, "")) as grpc_address:
        print(f"{CHILD_TAG}ready {url} {grpc_address or '-'}", flush=True)  # gRPC: bench/serving_oip.py
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            print(f"{CHILD_TAG}{json.dumps(handle(command))}", flush=True)
    registry.close()


# ------------------------------------------------------------------ child: LitServe peer

if importlib.util.find_spec("litserve") is not None:
    import litserve as ls  # type: ignore[import-untyped,import-not-found,unused-ignore]

    class OIPLitAPI(ls.LitAPI):  # type: ignore[misc,unused-ignore]
        """The same model behind LitServe, answering the same OIP v2 body with the same outputs."""

        def setup(self, device: str) -> None:
            self.model = module_for(DEMO_PARAMS, seed=1)
            self.standardizer = standardizer()

        # No annotations here: LitServe reads them to type its endpoint (unannotated: the raw JSON body).
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            tensor = request["inputs"][0]
            return torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])

        def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(inputs)

        def predict(self, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.softmax(self.model(self.standardizer.transform_tensor(x)), dim=-1)

        def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
            return list(torch.split(output, 1))  # one row per request in this benchmark

        def encode_response(self, output):  # type: ignore[no-untyped-def]
            n = int(output.shape[0])
            return {
                "model_name": PIPELINE,
                "model_version": "1",
                "outputs": [
                    {"name": "probabilities", "shape": [n, CLASSES], "datatype": "FP32",
                     "data": output.reshape(-1).tolist()},
                    {"name": "predicted_class", "shape": [n], "datatype": "INT64",
                     "data": output.argmax(dim=1).tolist()},
                ],
            }  # fmt: skip


def serve_litserve(batching: bool, port: int) -> None:
    api = OIPLitAPI(
        max_batch_size=BATCHING.max_batch_size if batching else 1,
        batch_timeout=BATCHING.max_wait_ms / 1000 if batching else 0.0,
        api_path=INFER_PATH,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


# ------------------------------------------------------------------ parent: child processes


class Server:
    """A server child process (its own session, so LitServe's workers stop with it)."""

    def __init__(
        self,
        label: str,
        argv: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        program: list[str] | None = None,  # another program than this script (MLServer's `mlserver start`)
    ) -> None:
        self.label = label
        self.obeys_stdin = "retrainer" in argv  # ours quits on end of input; LitServe and MLServer need SIGINT
        self.log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '-', label)}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*(program or [sys.executable, str(Path(__file__).resolve())]), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.url = ""

    def fail(self, why: str) -> RuntimeError:
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return RuntimeError(f"{self.label}: {why}\n--- server log (tail) ---\n{tail}")

    def answer(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(CHILD_TAG):
                return line[len(CHILD_TAG) :].strip()
        raise self.fail(f"exited with {self.proc.wait()}")

    def command(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.answer())
        return result

    def wait_ready(self, url: str, health_path: str, timeout: float = 120.0) -> None:
        self.url = url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if http_get(url, health_path)[0] == 200:
                    return
            time.sleep(0.2)
        raise self.fail(f"not ready within {timeout:.0f} s")

    def stop(self) -> None:
        """Ours exits cleanly at the end of its input (removing its folder); LitServe gets SIGINT.
        Whatever is left of the session after that gets SIGKILL."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        steps: list[signal.Signals | None] = [None] if self.obeys_stdin else []
        for sig in [*steps, signal.SIGINT, signal.SIGKILL]:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # LitServe's workers, should any outlive their parent
        self._log.close()


def spawn_retrainer(batching: bool, params: dict[str, Any], log_dir: Path, env: dict[str, str], label: str) -> Server:
    """Starts the process; `ready(server)` waits until it serves (several start side by side)."""
    argv = ["--serve", "retrainer", "--batching", "on" if batching else "off", "--params", json.dumps(params)]
    return Server(label, argv, log_dir, env)


def ready(server: Server) -> Server:
    server.wait_ready(server.answer().split()[1], "/v2/health/ready")
    return server


def start_litserve(batching: bool, log_dir: Path) -> Server:
    with socket.socket() as probe:  # a free port: LitServe takes a number, not a bound socket
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    label = f"LitServe batching {'ON' if batching else 'OFF'}"
    server = Server(
        label, ["--serve", "litserve", "--batching", "on" if batching else "off", "--port", str(port)], log_dir
    )
    server.wait_ready(f"http://127.0.0.1:{port}", "/health")
    return server


def http_get(url: str, path: str) -> tuple[int, str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def forward_counters(url: str) -> tuple[float, float]:
    """(forward passes, rows) summed over the loaded models, from the server's /metrics."""
    text = http_get(url, "/metrics")[1]

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE))

    return total("retrainer_serving_forward_passes"), total("retrainer_serving_forward_rows")


# ------------------------------------------------------------------ parent: load generator


@dataclass
class Cell:
    """One measurement: a server, a client count, a fixed time."""

    requests: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    variants: Counter[str] = field(default_factory=Counter)
    answered: int = 0  # warm-up included, for the CPU figures
    server_cpu_s: float = 0.0  # user + system time of the server's processes during the cell
    client_cpu_s: float = 0.0  # the same for this process (the load generator)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def session_cpu_s(session: int) -> float:
    """User + system CPU seconds of every live process in a session (a server and its workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(fields[3]) == session:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def request_bodies(count: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        pixels = rng.integers(0, 17, size=FEATURES).astype(float).tolist()
        payload = {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": pixels}]}
        bodies.append(json.dumps(payload).encode())
    return bodies


def raw_requests(url: str, path: str, bodies: list[bytes] | None) -> list[bytes]:
    host = url.removeprefix("http://")
    if bodies is None:
        return [f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()]
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: "
    return [f"{head}{len(b)}\r\n\r\n".encode() + b for b in bodies]


async def _client(url: str, requests: list[bytes], warm_until: float, stop_at: float, cell: Cell) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))  # asyncio sets TCP_NODELAY
    i = random.randrange(len(requests))  # noqa: S311
    checked = False
    try:
        while (started := time.perf_counter()) < stop_at:
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, variant, json_length = int(head[9:12]), -1, "", 0  # json_length: binary answers
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-retrainer-variant":
                    variant = value.strip().decode()
                elif name == b"inference-header-content-length":
                    json_length = int(value)
            if length < 0:
                raise RuntimeError(f"{url}: answer without Content-Length: {head!r}")
            body = await reader.readexactly(length)
            finished = time.perf_counter()
            cell.answered += 1
            if status != 200:
                cell.errors += 1
                if cell.errors <= 3:
                    print(f"   ! {url}: HTTP {status}: {body[:200]!r}", file=sys.stderr)
                continue
            if not checked and requests[0].startswith(b"POST"):
                answer = json.loads(body[: json_length or length])
                assert answer["outputs"][0]["shape"][-1] == CLASSES, answer
                checked = True
            if started >= warm_until:
                cell.requests += 1
                cell.latencies_ms.append((finished - started) * 1000)
                cell.variants[variant] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _load(url: str, requests: list[bytes], clients: int, warm_up: float, seconds: float) -> Cell:
    cell = Cell()
    warm_until = time.perf_counter() + warm_up
    stop_at = warm_until + seconds
    await asyncio.gather(*(_client(url, requests, warm_until, stop_at, cell) for _ in range(clients)))
    cell.seconds = seconds
    return cell


def load(
    server: Server,
    clients: int,
    warm_up: float,
    seconds: float,
    path: str = INFER_PATH,
    get: bool = False,
    requests: list[bytes] | None = None,  # whole HTTP requests to send instead (bench/serving_oip.py)
) -> Cell:
    requests = requests or raw_requests(server.url, path, None if get else request_bodies())
    server_cpu, client_cpu = session_cpu_s(server.proc.pid), time.process_time()
    cell = asyncio.run(_load(server.url, requests, clients, warm_up, seconds))
    cell.server_cpu_s = session_cpu_s(server.proc.pid) - server_cpu
    cell.client_cpu_s = time.process_time() - client_cpu
    return cell


def cpu_per_request_us(cells: list[Cell]) -> tuple[float, float]:
    """(server, load generator) CPU µs per answered request over the cells."""
    answered = sum(c.answered for c in cells) or 1
    return (
        sum(c.server_cpu_s for c in cells) / answered * 1e6,
        sum(c.client_cpu_s for c in cells) / answered * 1e6,
    )


def merged(cells: list[Cell]) -> tuple[float, float, float, int]:
    """(median req/s over rounds, p50 ms, p99 ms over all requests, errors)."""
    latencies = [v for c in cells for v in c.latencies_ms]
    if not latencies:
        return 0.0, float("nan"), float("nan"), sum(c.errors for c in cells)
    return (
        statistics.median(c.rps for c in cells),
        percentile(latencies, 50),
        percentile(latencies, 99),
        sum(c.errors for c in cells),
    )


# ------------------------------------------------------------------ parent: the parts


def ceiling(seconds: float, thread_counts: list[int], repeats: int = 5) -> dict[int, dict[int, float]]:
    """Rows/s through LoadedModel.predict in this process at batch 1 and at the max batch size, per
    torch intra-op thread count: the best of `repeats` short runs, interleaved (a ceiling, so the best)."""
    from serving.registry import LoadedModel

    model = LoadedModel(
        PIPELINE,
        "1",
        module_for(DEMO_PARAMS, seed=1),
        input_shape=[FEATURES],
        output_classes=CLASSES,
        standardizer=standardizer(),
        batching=BatchingConfig(enabled=False),
    )
    default_threads = torch.get_num_threads()
    result: dict[int, dict[int, float]] = {threads: {} for threads in thread_counts}
    try:
        for _ in range(repeats):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for batch in (1, BATCHING.max_batch_size):
                    rows = torch.randint(0, 17, (batch, FEATURES)).float()
                    for _ in range(20):
                        model.predict(rows)
                    calls, started = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - started) < seconds / repeats:
                        for _ in range(10):
                            model.predict(rows)
                        calls += 10
                    result[threads][batch] = max(result[threads].get(batch, 0.0), calls * batch / elapsed)
    finally:
        torch.set_num_threads(default_threads)
    return result


RSS_STATES = [
    ("one version (champion v1)", ["rss"]),
    ("+ canary v2 at 50 %", ["canary 2 50", "rss"]),
    ("canary removed (rollback)", ["remove-canary", "rss"]),
    ("  after gc.collect()", ["gc"]),
    ("champion swapped v1 → v3", ["champion 3", "rss"]),
    ("  after gc.collect()", ["gc"]),
    ("  after malloc_trim(0)", ["trim"]),
]


def rss_sequence(log_dir: Path, seconds: float, env: dict[str, str], tag: str) -> list[dict[str, Any]]:
    """The server's RSS and live model count after each state in RSS_STATES (traffic before each `rss`)."""
    server = spawn_retrainer(True, BIG_PARAMS, log_dir, env, f"rss {tag}")
    results = []
    try:
        ready(server)
        for _label, commands in RSS_STATES:
            for command in commands:
                if command == "rss":
                    load(server, 16, 0.2, max(0.3, seconds / 4))  # requests reach every loaded version
                    time.sleep(0.3)
                answer = server.command(command)
            results.append(answer)
    finally:
        server.stop()
    return results


def fmt_cell(values: tuple[float, float, float, int] | None, width: int = 26) -> str:
    if values is None:
        return f"{'—':>{width}}"
    rps, p50, p99, errors = values
    text = f"{rps:7.0f} {p50:6.1f} /{p99:6.1f}" + (f" ({errors} err)" if errors else "")
    return f"{text:>{width}}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def http_stack() -> str:
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__} (auto: loop {loop}, http {parser})"


def litserve_status() -> str | None:
    """None when LitServe can run here, else why not."""
    if importlib.util.find_spec("litserve") is None:
        return "not installed (pip install -c constraints.txt -e '.[bench]')"
    return None


@dataclass
class Results:
    http: dict[tuple[str, int], list[Cell]] = field(default_factory=dict)  # (server label, clients)
    split: dict[str, list[Cell]] = field(default_factory=lambda: {"champion only": [], "50/50 champion/canary": []})
    mean_batch: dict[str, float] = field(default_factory=dict)
    floor: Cell = field(default_factory=Cell)
    ceilings: dict[int, dict[int, float]] = field(default_factory=dict)
    weights_mb: float = 0.0
    rss: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


TWO_THREADS = {"RETRAINER_SERVING_TORCH_THREADS": "2"}  # torch's intra-op threads in the server process
# (label, batching, extra environment): the first two are the server as shipped (the targets' subject)
OURS: list[tuple[str, bool, dict[str, str]]] = [
    ("retrainer batching ON", True, {}),
    ("retrainer batching OFF", False, {}),
    ("retrainer ON, 2 torch threads", True, TWO_THREADS),
    ("retrainer OFF, 2 torch threads", False, TWO_THREADS),
]
PEERS = ("LitServe batching ON", "LitServe batching OFF")


def measure_ours(results: Results, log_dir: Path, rounds: int, cell: tuple[float, float]) -> None:
    """All of our servers stay up (idle, they use no CPU) and their cells alternate, the order rotating
    each round, so drift on the machine hits all alike. Then, on the shipped ON server, champion only vs
    50/50 champion/canary, alternating too."""
    servers = [spawn_retrainer(batching, DEMO_PARAMS, log_dir, env, label) for label, batching, env in OURS]
    passes: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    try:
        for server in servers:
            ready(server)
        for round_index in range(rounds):
            order = servers[round_index % len(servers) :] + servers[: round_index % len(servers)]
            for clients in CLIENTS:
                for server in order:
                    before = forward_counters(server.url)
                    results.http.setdefault((server.label, clients), []).append(load(server, clients, *cell))
                    if clients == CLIENTS[-1]:
                        after = forward_counters(server.url)
                        passes[server.label] += int(after[0] - before[0])
                        rows[server.label] += int(after[1] - before[1])
        results.mean_batch = {label: rows[label] / passes[label] for label in passes if passes[label]}
        on = servers[0]
        results.floor = load(on, CLIENTS[-1], *cell, path="/v2/health/live", get=True)
        for round_index in range(rounds):
            for with_canary in [False, True] if round_index % 2 == 0 else [True, False]:
                if with_canary:
                    on.command("canary 2 50")
                    results.split["50/50 champion/canary"].append(load(on, CLIENTS[-1], *cell))
                    on.command("remove-canary")
                else:
                    results.split["champion only"].append(load(on, CLIENTS[-1], *cell))
    finally:
        for server in servers:
            server.stop()


def measure_peer(results: Results, log_dir: Path, rounds: int, cell: tuple[float, float]) -> None:
    """LitServe's worker processes poll their queues while idle: one server at a time, after ours."""
    for batching, label in zip((True, False), PEERS, strict=True):
        server = start_litserve(batching, log_dir)
        assert server.label == label
        try:
            for _ in range(rounds):
                for clients in CLIENTS:
                    results.http.setdefault((label, clients), []).append(load(server, clients, *cell))
        finally:
            server.stop()


def report_http(results: Results, peer_missing: str | None) -> None:
    print("\n## 1. HTTP throughput and latency: req/s  p50 / p99 ms (closed loop, keep-alive, 1 row per request)")
    print(f"{'server':<34}" + "".join(f"{f'{c} client' + ('s' if c > 1 else ''):>26}" for c in CLIENTS))
    for label in [name for name, _, _ in OURS] + list(PEERS):
        cells = [results.http.get((label, clients)) for clients in CLIENTS]
        if all(cells):
            print(f"{label:<34}" + "".join(fmt_cell(merged(c)) for c in cells if c))
    if peer_missing is not None:
        print(f"LitServe: {peer_missing}")
    else:
        print(
            f"LitServe {importlib.metadata.version('litserve')} with its defaults: 1 API server process + 1 inference "
            "worker process (CPU), multiprocessing queues; same model, body, outputs, max batch and wait as ours"
        )
    print(f"\nat {CLIENTS[-1]} clients{'':<22}{'server CPU µs/req':>20}{'load gen. CPU µs/req':>22}{'rows/pass':>11}")
    for label in [name for name, _, _ in OURS] + list(PEERS):
        if (label, CLIENTS[-1]) in results.http:
            server_us, client_us = cpu_per_request_us(results.http[(label, CLIENTS[-1])])
            batch = results.mean_batch.get(label)
            print(f"{label:<34}{server_us:>20.0f}{client_us:>22.0f}{f'{batch:.1f}' if batch else '':>11}")
    floor = results.floor
    print(
        f"HTTP floor, GET /v2/health/live at {CLIENTS[-1]} clients (no model, no body): {floor.rps:.0f} req/s, "
        f"p50 {percentile(floor.latencies_ms, 50):.1f} / p99 {percentile(floor.latencies_ms, 99):.1f} ms"
    )

    def rps(label: str, clients: int = CLIENTS[-1]) -> float:
        return merged(results.http[(label, clients)])[0]

    print(f"\n{'target':<58}{'goal':>10}{'measured':>12}  verdict")
    for on, off in ((OURS[0][0], OURS[1][0]), (OURS[2][0], OURS[3][0])):
        shipped = on == OURS[0][0]
        suffix = "" if shipped else " (2 torch threads)"
        ratio = rps(on) / rps(off) if rps(off) else float("nan")
        p99_16 = merged(results.http[(on, 16)])[2]
        label, goal = f"batching ON / OFF throughput, {CLIENTS[-1]} clients{suffix}", f">= {TARGET_BATCHING_RATIO:g}x"
        print(f"{label:<58}{goal:>10}{ratio:>11.2f}x  {verdict(ratio >= TARGET_BATCHING_RATIO)}")
        label, goal = f"p99 at 16 clients, batching ON{suffix}", f"<= {TARGET_P99_MS:g} ms"
        print(f"{label:<58}{goal:>10}{p99_16:>9.1f} ms  {verdict(p99_16 <= TARGET_P99_MS)}")
    for (ours_label, _, _), peer_label in zip(OURS, PEERS, strict=False):
        if (peer_label, CLIENTS[-1]) in results.http and rps(peer_label):
            label = f"ours / LitServe, {peer_label.removeprefix('LitServe ')}, {CLIENTS[-1]} clients"
            print(f"{label:<58}{'':>10}{rps(ours_label) / rps(peer_label):>11.2f}x")


def report_ceiling(results: Results) -> None:
    print(
        f"\n## 2. ceiling: LoadedModel.predict in-process (MLP {describe(DEMO_PARAMS)}, standardizer, softmax), "
        "best of 5 interleaved runs"
    )
    for threads, rates in results.ceilings.items():
        note = " (shipped server)" if threads == 1 else ""
        text = "   ".join(
            f"batch {batch}: {rate:>8.0f} rows/s ({batch / rate * 1e6:6.0f} µs/pass)" for batch, rate in rates.items()
        )
        print(f"torch threads {threads}{note:<22}{text}")
    best = max(merged(results.http[(label, CLIENTS[-1])])[0] for label, _, _ in OURS[:2])
    top = results.ceilings[1]
    print(
        f"best shipped server at {CLIENTS[-1]} clients: {best / top[BATCHING.max_batch_size]:.1%} of the batch-"
        f"{BATCHING.max_batch_size} ceiling, {best / top[1]:.0%} of the batch-1 ceiling"
    )
    # Where a request's CPU goes: batching only shrinks the forward pass; the rest is paid per request.
    floor_us = cpu_per_request_us([results.floor])[0]
    print(f"server CPU per request at {CLIENTS[-1]} clients: HTTP floor (no model, no body) {floor_us:.0f} µs")
    for (on, _, env), (off, _, _) in ((OURS[0], OURS[1]), (OURS[2], OURS[3])):
        threads = int(env.get("RETRAINER_SERVING_TORCH_THREADS", "1"))
        if threads not in results.ceilings:
            continue
        on_us, off_us = (cpu_per_request_us(results.http[(label, CLIENTS[-1])])[0] for label in (on, off))
        forward_1 = 1e6 / results.ceilings[threads][1]
        forward_row = 1e6 / results.ceilings[threads][BATCHING.max_batch_size]
        print(
            f"  {threads} torch thread(s): OFF {off_us:.0f} µs, ON {on_us:.0f} µs; the forward pass itself is "
            f"{forward_1:.0f} µs at batch 1, {forward_row:.1f} µs per row at batch {BATCHING.max_batch_size}; "
            f"{TARGET_BATCHING_RATIO:g}x while CPU-bound needs ON <= {off_us / TARGET_BATCHING_RATIO:.0f} µs"
        )


def report_split(results: Results) -> None:
    print(f"\n## 3. traffic split at {CLIENTS[-1]} clients, batching ON: req/s  p50 / p99 ms, ratio to champion only")
    base = merged(results.split["champion only"])[0]
    for label, cells in results.split.items():
        values = merged(cells)
        shares = sum((c.variants for c in cells), Counter[str]())
        total = sum(shares.values()) or 1
        mix = ", ".join(f"{k or '?'} {v / total:.0%}" for k, v in sorted(shares.items()))
        server_us = cpu_per_request_us(cells)[0]
        print(
            f"{label:<24}{fmt_cell(values)}  {values[0] / base:.2f}x  server CPU {server_us:.0f} µs/req  served: {mix}"
        )


def report_rss(results: Results) -> None:
    print(f"\n## 4. server RSS, MLP {describe(BIG_PARAMS)} ({results.weights_mb:.1f} MB of fp32 weights per version)")
    print(f"{'':<30}" + "".join(f"{name:>36}" for name in results.rss))
    print(f"{'state':<30}" + f"{'RSS MB':>12}{'Δ vs one':>12}{'alive':>12}" * len(results.rss))
    for index, (label, _commands) in enumerate(RSS_STATES):
        line = ""
        for states in results.rss.values():
            now, one = states[index], states[0]
            line += f"{now['rss_mb']:>12.1f}{now['rss_mb'] - one['rss_mb']:>+12.1f}{now['alive']:>12}"
        print(f"{label:<30}{line}")
    print("alive: loaded-model objects not yet freed (weak references); requests go out before each plain reading")
    for name, states in results.rss.items():
        one, removed, swapped = states[0], states[2], states[4]
        freed = removed["alive"] == 1 and swapped["alive"] == 1
        grew = max(removed["rss_mb"], swapped["rss_mb"]) - one["rss_mb"]
        print(
            f"{name}: rollback and swap free the old version without an explicit gc: {verdict(freed)} "
            f"(alive {removed['alive']} / {swapped['alive']}); RSS over one version {grew:+.1f} MB: "
            f"{verdict(grew < results.weights_mb / 2)} (< half a version)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.5, help="measured time per cell")
    parser.add_argument("--warm-up", type=float, default=0.5, help="unmeasured time at the start of each cell")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of our cells (interleaved)")
    parser.add_argument("--peer-rounds", type=int, default=1, help="rounds of LitServe's cells")
    parser.add_argument("--quick", action="store_true", help="smoke run: short cells, one round")
    parser.add_argument("--no-litserve", action="store_true", help="skip the LitServe peer")
    parser.add_argument("--serve", choices=["retrainer", "litserve"], help=argparse.SUPPRESS)
    parser.add_argument("--batching", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--params", default=json.dumps(DEMO_PARAMS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "retrainer":
        serve_retrainer(args.batching == "on", json.loads(args.params))
        return
    if args.serve == "litserve":
        serve_litserve(args.batching == "on", args.port)
        return
    if args.quick:
        args.seconds, args.warm_up, args.rounds, args.peer_rounds = 0.6, 0.2, 1, 1
    cell = (args.warm_up, args.seconds)

    started = time.perf_counter()
    log_dir = Path(tempfile.mkdtemp(prefix="retrainer-bench-serving-logs-"))
    peer_missing = "skipped (--no-litserve)" if args.no_litserve else litserve_status()
    print(
        f"# Model server on this machine: {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"(server: {tune_threads()} intra-op thread as shipped), {http_stack()}; "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )
    print(
        f"# model MLP {describe(DEMO_PARAMS)} fp32 (pipelines/digits-classifier.yaml), 1 row per request; "
        f"batching max {BATCHING.max_batch_size} rows / {BATCHING.max_wait_ms:g} ms; cells {args.seconds:g} s "
        f"(+{args.warm_up:g} s warm-up), {args.rounds} round(s); load generator: asyncio in this process"
    )

    results = Results()
    measure_ours(results, log_dir, args.rounds, cell)
    if peer_missing is None:
        measure_peer(results, log_dir, args.peer_rounds, cell)
    # no server is running now
    results.ceilings = ceiling(max(0.5, args.seconds / 2), [1, 2])
    results.weights_mb = sum(p.numel() * p.element_size() for p in module_for(BIG_PARAMS, 0).parameters()) / 2**20
    allocators = {"shipped (mmap threshold 128 KiB)": {}, "glibc default (adaptive)": {GLIBC_DEFAULT_ENV: "1"}}
    results.rss = {name: rss_sequence(log_dir, args.seconds, env, name) for name, env in allocators.items()}

    report_http(results, peer_missing)
    report_ceiling(results)
    report_split(results)
    report_rss(results)
    print(f"\n# total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
