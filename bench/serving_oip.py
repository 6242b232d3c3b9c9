"""Our model server side by side with MLServer (Seldon's OIP v2 server) on the same protocol: JSON,
binary tensors and gRPC, at 64 clients, plus the request decoder on a 64x784 FP32 batch.

Both servers serve the demo model (pipelines/digits-classifier.yaml: MLP 64-128-64-10 fp32, the same
weights: `bench.serving.module_for(DEMO_PARAMS, seed=1)` and its standardizer) with the same dynamic
batching limits (max 64 rows / 2 ms), one torch intra-op thread each; the bench checks that both
answer the same probabilities for the same rows before it measures.

- Ours: the shipped server (`bench/serving.py --serve retrainer`, batching on) with its gRPC service
  beside it (`RETRAINER_SERVING_GRPC_ADDRESS`), in its own process.
- MLServer 1.7.1 in a scratch virtualenv under the temporary folder, made by this script on first use
  (`pip install mlserver==1.7.1 uvloop==0.21.0`: its FastAPI, Starlette and protobuf pins conflict with ours). torch is
  not installed there: a .pth file appends the project venv's site-packages after the scratch venv's
  own, so MLServer's pins win and the model runs on the very torch build ours runs on. The model is a
  custom runtime (bench/support/mlserver_runtime.py, an `MLModel`) with MLServer's adaptive batching
  (`max_batch_size` 64, `max_batch_time` 2 ms); MLServer's defaults otherwise (one parallel inference
  worker process, its REST and gRPC servers), `debug` off as in production.

Cells, measured in one run with the servers up side by side, in an order that rotates each round: per
server, one-row requests over JSON (`bench.serving`'s keep-alive load generator), over binary tensors
(the same load generator; the input and both outputs as raw little-endian bytes after the JSON header,
`Inference-Header-Content-Length`), and over gRPC (a grpc.aio load generator: one channel per client,
`ModelInfer` with the input in `raw_input_contents`, messages pre-serialized with the classes
`tritonclient.grpc.service_pb2` ships); and ours' HTTP floor (`GET /v2/health/live`). MLServer's REST
API has no binary tensor extension: when its probe answer is not a binary answer, its binary cell is
"not supported" and the binary row's ratio is against its JSON cell (what a client of MLServer sends).
The load generator runs in this process (asyncio); on a small machine it competes with the servers for
CPU, alike for both, so the ratios mean more than the absolute rates.

Decode: `serving.protocol.parse_body` (the parser the HTTP and gRPC transports call) on the same
64x784 FP32 batch as JSON and as binary tensor data, ns per request, best of 5.

Targets: >= 3x MLServer's throughput at 64 clients on JSON, binary and gRPC, at an equal or lower p99;
ours >= 85 % of the HTTP floor and p99 <= 5 ms (JSON); binary decode >= 3x faster than JSON. The bench
prints PASS/MISS and never fails on a timing.

    .venv/bin/python bench/serving_oip.py [--seconds 2.5] [--warm-up 0.5] [--rounds 3] [--quick]
        [--transports JSON,binary,gRPC]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402

from bench.serving import (  # noqa: E402
    BATCHING,
    CLASSES,
    DEMO_PARAMS,
    FEATURES,
    INFER_PATH,
    PIPELINE,
    SPEC,
    Cell,
    Server,
    cpu_per_request_us,
    describe,
    fmt_cell,
    load,
    merged,
    module_for,
    spawn_retrainer,
    standardizer,
    verdict,
)
from serving.grpc_server import SETTING as GRPC_SETTING  # noqa: E402
from serving.protocol import HEADER_LENGTH_HEADER, parse_body  # noqa: E402

MLSERVER = "1.7.1"
VENV = Path(tempfile.gettempdir()) / f"retrainer-bench-mlserver-{MLSERVER}"
# MLServer 1.7.1 leaves uvloop unpinned, and its inference workers die at start with uvloop >= 0.22
# (`asyncio.get_event_loop()` in a fresh process: "There is no current event loop").
PACKAGES = (f"mlserver=={MLSERVER}", "uvloop==0.21.0")
READY_MARK = ".retrainer-bench-ready"  # written last: a venv without it is half made and made again
PROJECT_PTH = "zz_retrainer_project_venv.pth"  # "zz": read after the scratch venv's own packages
CLIENTS = 64
TRANSPORTS = ("JSON", "binary", "gRPC")
OURS, PEER = "retrainer (as shipped)", f"MLServer {MLSERVER}"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
TARGET_RATIO = 3.0  # ours / MLServer throughput, each transport
TARGET_FLOOR = 0.85  # ours (JSON) / HTTP floor
TARGET_P99_MS = 5.0  # ours, JSON, 64 clients
TARGET_DECODE = 3.0  # JSON / binary decode time, 64x784 FP32
DECODE_SHAPE = (64, 784)


# ------------------------------------------------------------------ MLServer in its scratch virtualenv


def mlserver_venv() -> Path:
    """The scratch virtualenv with MLServer, made once (a few minutes) and reused while /tmp keeps it."""
    if (VENV / READY_MARK).exists():
        return VENV
    shutil.rmtree(VENV, ignore_errors=True)
    print(f"# making {VENV} (python -m venv; pip install {' '.join(PACKAGES)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    python = str(VENV / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True, check=False)
    if pip.returncode:
        raise RuntimeError(
            f"pip install {' '.join(PACKAGES)} into {VENV} failed (exit {pip.returncode}); the scratch venv needs them "
            f"from the package index. pip's output ends:\n{(pip.stdout + pip.stderr)[-3000:]}"
        )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # After the install, so pip never sees (nor tries to replace) the project's packages.
    (Path(purelib) / PROJECT_PTH).write_text(sysconfig.get_paths()["purelib"] + "\n")
    (VENV / READY_MARK).write_text(MLSERVER + "\n")
    return VENV


def free_ports(count: int) -> list[int]:
    """Ports free now (MLServer takes numbers, not bound sockets); held together so that they differ."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def spawn_mlserver(venv: Path, work: Path, log_dir: Path) -> tuple[Server, str, str]:
    """MLServer serving the same weights as our server's version 1; (server, base URL, gRPC target).
    `wait_ready` is left to the caller, so that both servers start side by side."""
    module, scaler = module_for(DEMO_PARAMS, seed=1), standardizer()
    weights = work / "digits.pt"
    torch.save(
        {
            "architecture": SPEC["architecture"],
            "params": DEMO_PARAMS,
            "features": FEATURES,
            "classes": CLASSES,
            "state_dict": module.state_dict(),
            "mean": torch.from_numpy(np.asarray(scaler.mean, np.float32)),
            "std": torch.from_numpy(np.asarray(scaler.std, np.float32)),
        },
        weights,
    )
    http_port, grpc_port, metrics_port = free_ports(3)
    repository = work / "mlserver"
    (repository / PIPELINE).mkdir(parents=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "metrics_dir": str(work / "metrics"),
        "environments_dir": str(work / "envs"),
    }
    (repository / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": PIPELINE,
        "implementation": "bench.support.mlserver_runtime.DigitsRuntime",
        "max_batch_size": BATCHING.max_batch_size,
        "max_batch_time": BATCHING.max_wait_ms / 1000,
        "parameters": {"uri": str(weights), "version": "1"},
    }
    (repository / PIPELINE / "model-settings.json").write_text(json.dumps(model))
    env = {"PYTHONPATH": str(ROOT)}  # the runtime module and ml.zoo
    server = Server(PEER, ["start", str(repository)], log_dir, env, program=[str(venv / "bin" / "mlserver")])
    return server, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


# ------------------------------------------------------------------ requests


def rows(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 17, size=(1, FEATURES)).astype("<f4") for _ in range(count)]


def binary_body(row: np.ndarray) -> tuple[bytes, int]:
    """A request body with the input, and both outputs asked for, as binary tensor data; its JSON header's length."""
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(row.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": row.nbytes}},
            ],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    return header + row.tobytes(), len(header)


def binary_request(url: str, row: np.ndarray) -> bytes:
    """The whole HTTP request of `binary_body`, for the load generator."""
    body, header_length = binary_body(row)
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {url.removeprefix('http://')}\r\n"
        f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH_HEADER}: {header_length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def grpc_requests(service_pb2: Any) -> list[bytes]:
    """Serialized ModelInferRequests, the input in `raw_input_contents` (as tritonclient.grpc sends it)."""
    requests = []
    for row in rows(32):
        request = service_pb2.ModelInferRequest(model_name=PIPELINE, raw_input_contents=[row.tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=list(row.shape))
        requests.append(request.SerializeToString())
    return requests


def grpc_probabilities(service_pb2: Any, answer: bytes) -> np.ndarray:
    """The `probabilities` output of a serialized ModelInferResponse, raw or typed contents alike."""
    response = service_pb2.ModelInferResponse.FromString(answer)
    index = [output.name for output in response.outputs].index("probabilities")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[index], "<f4")
    return np.asarray(response.outputs[index].contents.fp32_contents, np.float32)


# ------------------------------------------------------------------ probes: same model, what each side takes


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", INFER_PATH, body, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def json_probabilities(url: str, batch: np.ndarray) -> np.ndarray:
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.reshape(-1).tolist()}
    status, _, body = post(url, orjson.dumps({"inputs": [tensor]}), {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"{url}: JSON probe answered HTTP {status}: {body[:300]!r}")
    outputs = {output["name"]: output for output in json.loads(body)["outputs"]}
    return np.asarray(outputs["probabilities"]["data"], np.float32).reshape(batch.shape[0], CLASSES)


def binary_supported(url: str) -> str | None:
    """None when the server answers a binary request with binary outputs, else what it did."""
    body, header_length = binary_body(rows(1)[0])
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH_HEADER: str(header_length)}
    status, answer_headers, answer = post(url, body, headers)
    if status == 200 and HEADER_LENGTH_HEADER.lower() in answer_headers:
        return None
    return f"not supported (HTTP {status} {answer[:80].decode(errors='replace')!r})"


async def _grpc_once(target: str, request: bytes) -> bytes:
    import grpc  # type: ignore[import-untyped,unused-ignore]

    async with grpc.aio.insecure_channel(target) as channel:
        answer: bytes = await channel.unary_unary(GRPC_INFER)(request, timeout=30)
        return answer


# ------------------------------------------------------------------ the gRPC load generator


async def _grpc_client(target: str, requests: list[bytes], warm_until: float, stop_at: float, cell: Cell) -> None:
    import grpc

    # a channel (one HTTP/2 connection, not shared: local subchannel pool) per client, like HTTP keep-alive
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        infer = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out: no (de)serialization in the loop
        i = random.randrange(len(requests))  # noqa: S311
        while (started := time.perf_counter()) < stop_at:
            try:
                await infer(requests[i % len(requests)])
            except grpc.aio.AioRpcError as e:
                cell.answered += 1
                cell.errors += 1
                if cell.errors <= 3:
                    print(f"   ! {target}: gRPC {e.code().name}: {e.details()}", file=sys.stderr)
                continue
            finished = time.perf_counter()
            i += 1
            cell.answered += 1
            if started >= warm_until:
                cell.requests += 1
                cell.latencies_ms.append((finished - started) * 1000)


async def _load_grpc(target: str, requests: list[bytes], clients: int, warm_up: float, seconds: float) -> Cell:
    cell = Cell(seconds=seconds)
    warm_until = time.perf_counter() + warm_up
    await asyncio.gather(
        *(_grpc_client(target, requests, warm_until, warm_until + seconds, cell) for _ in range(clients))
    )
    return cell


def load_grpc(server: Server, target: str, requests: list[bytes], clients: int, warm_up: float, seconds: float) -> Cell:
    from bench.serving import session_cpu_s

    server_cpu, client_cpu = session_cpu_s(server.proc.pid), time.process_time()
    cell = asyncio.run(_load_grpc(target, requests, clients, warm_up, seconds))
    cell.server_cpu_s = session_cpu_s(server.proc.pid) - server_cpu
    cell.client_cpu_s = time.process_time() - client_cpu
    return cell


# ------------------------------------------------------------------ decode micro-bench


def decode_bench(repeats: int = 5, budget_s: float = 1.0) -> tuple[float, float, int, int]:
    """(JSON ns, binary ns per parse, JSON bytes, binary bytes) for one 64x784 FP32 request through
    `serving.protocol.parse_body`; best of `repeats` timed loops."""
    batch = np.random.default_rng(0).random(DECODE_SHAPE, dtype=np.float32)
    tensor: dict[str, Any] = {"name": "input", "shape": list(DECODE_SHAPE), "datatype": "FP32"}
    json_body = orjson.dumps({"inputs": [{**tensor, "data": batch.reshape(-1).tolist()}]})
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": batch.nbytes}}]})
    binary_body = header + batch.astype("<f4").tobytes()
    parsers: dict[str, Callable[[], Any]] = {
        "json": lambda: parse_body(json_body),
        "binary": lambda: parse_body(binary_body, str(len(header))),
    }
    if not np.array_equal(parsers["json"]().values, parsers["binary"]().values):
        raise RuntimeError("decode bench: the JSON and binary forms of the batch parse to different values")
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, parse in parsers.items():
            calls, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < budget_s / repeats / 2:
                parse()
                calls += 1
            best[name] = min(best.get(name, float("inf")), elapsed / calls * 1e9)
    return best["json"], best["binary"], len(json_body), len(binary_body)


# ------------------------------------------------------------------ the run


def start_both(log_dir: Path, work: Path) -> tuple[dict[str, Server], dict[str, str]]:
    """Both servers, started side by side; (servers by label, gRPC target by label)."""
    venv = mlserver_venv()
    ours = spawn_retrainer(True, DEMO_PARAMS, log_dir, {GRPC_SETTING: "127.0.0.1:0"}, OURS)
    peer, peer_url, peer_grpc = spawn_mlserver(venv, work, log_dir)
    servers = {OURS: ours, PEER: peer}
    try:
        _, url, grpc_target = ours.answer().split()
        ours.wait_ready(url, "/v2/health/ready")
        peer.wait_ready(peer_url, f"/v2/models/{PIPELINE}/ready", timeout=300)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers, {OURS: grpc_target, PEER: peer_grpc}


def check_same_model(servers: dict[str, Server], targets: dict[str, str], service_pb2: Any) -> str:
    """Both answer the same probabilities for the same rows, over JSON and over gRPC; a line saying so."""
    batch = np.concatenate(rows(4))
    ours, peer = (json_probabilities(servers[label].url, batch) for label in (OURS, PEER))
    request = grpc_requests(service_pb2)[0]
    by_grpc = [grpc_probabilities(service_pb2, asyncio.run(_grpc_once(targets[label], request))) for label in targets]
    gap = max(float(np.abs(ours - peer).max()), float(np.abs(by_grpc[0] - by_grpc[1]).max()))
    if gap > 1e-5:
        raise RuntimeError(f"the servers do not answer the same probabilities (max |Δp| {gap:.2e}): not the same model")
    return f"same model: both answer the same probabilities over JSON and gRPC (max |Δp| {gap:.1e})"


def measure(args: argparse.Namespace, log_dir: Path, work: Path) -> dict[tuple[str, str], list[Cell]]:
    from tritonclient.grpc import service_pb2  # type: ignore[import-untyped,unused-ignore]

    servers, targets = start_both(log_dir, work)
    results: dict[tuple[str, str], list[Cell]] = {}
    try:
        print(f"# {check_same_model(servers, targets, service_pb2)}")
        unsupported = {
            label: binary_supported(server.url) if "binary" in args.transports else None
            for label, server in servers.items()
        }
        grpc_bodies = grpc_requests(service_pb2)
        http_bodies = {label: [binary_request(s.url, row) for row in rows(32)] for label, s in servers.items()}
        cells: list[tuple[str, str]] = [(label, transport) for transport in args.transports for label in servers]
        cells = [cell for cell in cells if not (cell[1] == "binary" and unsupported[cell[0]])] + [(OURS, "floor")]
        timing = (args.warm_up, args.seconds)
        for round_index in range(args.rounds):
            shift = round_index % len(cells)
            for label, transport in cells[shift:] + cells[:shift]:
                server = servers[label]
                if transport == "gRPC":
                    cell = load_grpc(server, targets[label], grpc_bodies, CLIENTS, *timing)
                elif transport == "floor":
                    cell = load(server, CLIENTS, *timing, path="/v2/health/live", get=True)
                else:
                    cell = load(
                        server, CLIENTS, *timing, requests=http_bodies[label] if transport == "binary" else None
                    )
                results.setdefault((label, transport), []).append(cell)
    finally:
        for server in servers.values():
            server.stop()
    for label, why in unsupported.items():
        if why:
            print(f"# {label}, binary tensors over HTTP: {why}")
    return results


def report(
    results: dict[tuple[str, str], list[Cell]], decode: tuple[float, float, int, int], transports: list[str]
) -> None:
    print(f"\n## OIP v2 at {CLIENTS} clients, 1 row per request, closed loop: req/s  p50 / p99 ms")
    print(f"{'transport':<16}{OURS:>30}{PEER:>30}{'ours/MLServer':>15}{'p99 <= peer':>13}{'% of floor':>12}")
    floor = merged(results[(OURS, "floor")])
    outcomes: list[tuple[str, bool]] = []
    for transport in transports:
        ours = merged(results[(OURS, transport)])
        peer_cells = results.get((PEER, transport))
        note = "" if peer_cells else " *"
        peer = merged(peer_cells or results[(PEER, "JSON")])
        ratio = ours[0] / peer[0] if peer[0] else float("nan")
        p99_ok = ours[2] <= peer[2]
        print(
            f"{transport:<16}{fmt_cell(ours, 30)}{fmt_cell(peer, 28)}{note:<2}{ratio:>14.2f}x"
            f"{'yes' if p99_ok else 'no':>13}{ours[0] / floor[0]:>12.0%}"
        )
        outcomes.append((f"ours / MLServer, {transport}: >= {TARGET_RATIO:g}x at an equal or lower p99",
                         ratio >= TARGET_RATIO and p99_ok))  # fmt: skip
    if "binary" in transports and not results.get((PEER, "binary")):
        print("* MLServer's REST API takes no binary tensors: its JSON cell (what its clients send) stands in")
    print(f"{'HTTP floor':<16}{fmt_cell(floor, 30)}   (ours, GET /v2/health/live: no model, no body)")
    # Little's law: with CLIENTS requests always in flight, mean latency = CLIENTS / throughput, and p99 >= mean
    needed = CLIENTS / (TARGET_P99_MS / 1000)
    print(
        f"p99 <= {TARGET_P99_MS:g} ms with {CLIENTS} clients in a closed loop needs >= {needed:,.0f} req/s (Little's "
        f"law: mean latency = clients / throughput); the HTTP floor's mean here is {CLIENTS / floor[0] * 1000:.1f} ms"
    )
    print("\nCPU µs per request, server / load generator" + "".join(f"{t:>16}" for t in transports))
    for label in (OURS, PEER):
        texts = [
            "{:.0f} / {:.0f}".format(*cpu_per_request_us(results[(label, t)])) if (label, t) in results else "—"
            for t in transports
        ]
        print(f"{label:<43}" + "".join(f"{text:>16}" for text in texts))
    json_ns, binary_ns, json_bytes, binary_bytes = decode
    print(
        f"\n## decode: serving.protocol.parse_body, one {DECODE_SHAPE[0]}x{DECODE_SHAPE[1]} FP32 request, best of 5\n"
        f"JSON   {json_bytes / 1024:8.0f} KiB {json_ns:14,.0f} ns/request\n"
        f"binary {binary_bytes / 1024:8.0f} KiB {binary_ns:14,.0f} ns/request   JSON / binary "
        f"{json_ns / binary_ns:.1f}x"
    )
    if "JSON" in transports:
        ours_json = merged(results[(OURS, "JSON")])
        outcomes += [
            (f"ours JSON >= {TARGET_FLOOR:.0%} of the HTTP floor", ours_json[0] >= TARGET_FLOOR * floor[0]),
            (f"ours JSON p99 <= {TARGET_P99_MS:g} ms", ours_json[2] <= TARGET_P99_MS),
        ]
    outcomes.append((f"binary decode >= {TARGET_DECODE:g}x faster than JSON", json_ns / binary_ns >= TARGET_DECODE))
    print("\ntargets (issue 16)")
    for text, ok in outcomes:
        print(f"  {text:<66}{verdict(ok)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.5, help="measured time per cell")
    parser.add_argument("--warm-up", type=float, default=0.5, help="unmeasured time at the start of each cell")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all cells, the order rotating each round")
    parser.add_argument("--quick", action="store_true", help="smoke run: short cells, one round")
    parser.add_argument(
        "--transports",
        type=lambda text: text.split(","),
        default=list(TRANSPORTS),
        help=f"comma-separated subset of {','.join(TRANSPORTS)} (default: all); the HTTP floor is always measured",
    )
    args = parser.parse_args()
    unknown = [t for t in args.transports if t not in TRANSPORTS]
    if unknown or not args.transports:
        parser.error(f"--transports: {','.join(unknown) or 'none given'}; pick from {','.join(TRANSPORTS)}")
    if args.quick:
        args.seconds, args.warm_up, args.rounds = 1.0, 0.3, 1
    started = time.perf_counter()
    print(
        f"# OIP v2 side by side on this machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.2f} at the start; model MLP {describe(DEMO_PARAMS)} fp32, batching max "
        f"{BATCHING.max_batch_size} rows / {BATCHING.max_wait_ms:g} ms on both; cells {args.seconds:g} s "
        f"(+{args.warm_up:g} s warm-up), {args.rounds} round(s)"
    )
    decode = decode_bench(budget_s=0.5 if args.quick else 2.0)  # before the servers: a quiet machine
    log_dir = Path(tempfile.mkdtemp(prefix="retrainer-bench-oip-logs-"))
    try:  # a server that fails to start raises with its log's tail
        with tempfile.TemporaryDirectory(prefix="retrainer-bench-oip-") as work:
            results = measure(args, log_dir, Path(work))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    report(results, decode, args.transports)
    print(f"\n# total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
