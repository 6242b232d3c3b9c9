"""gRPC requests and the dynamic batcher (`serving.grpc_server.Arrivals`): gRPC clients between two calls
count as requests on their way, so the batcher waits for them, while a lone client is never waited
for; the gRPC service hands that count to the models it serves, a canary loaded later included."""

from __future__ import annotations

import threading
import time

import numpy as np
import tritonclient.grpc as triton  # type: ignore[import-untyped]
from fastapi import FastAPI

from serving.grpc_server import Arrivals, running_grpc_server
from serving.registry import ModelRegistry
from tests.serving.conftest import expected_probabilities, tiny_model
from tests.serving.test_grpc import tensor_of
from tests.serving.test_server import app, registry, rows_of

__all__ = ["app", "registry"]  # the server tests' fixtures


def test_clients_between_calls_are_expected_a_lone_client_is_not() -> None:
    arrivals = Arrivals(window_s=5.0)
    arrivals.started("ipv4:127.0.0.1:5001")
    assert arrivals.expected() == 0  # a lone client: its only request is already in flight

    arrivals.finished("ipv4:127.0.0.1:5001")
    arrivals.started("ipv4:127.0.0.1:5002")
    assert arrivals.expected() == 1  # the first client, answered, sends again soon
    arrivals.started("ipv4:127.0.0.1:5001")
    assert arrivals.expected() == 0  # both have a call in progress


def test_clients_gone_quiet_are_not_waited_for() -> None:
    arrivals = Arrivals(window_s=0.05, max_peers=2)
    for port in (5001, 5002, 5003):
        arrivals.started(f"ipv4:127.0.0.1:{port}")
        arrivals.finished(f"ipv4:127.0.0.1:{port}")
    assert arrivals.expected() == 3
    time.sleep(0.06)
    assert arrivals.expected() == 0
    arrivals.started("ipv4:127.0.0.1:5004")
    arrivals.finished("ipv4:127.0.0.1:5004")  # over max_peers: the quiet ones are forgotten
    assert arrivals.expected() == 1


def test_a_client_calling_again_counts_once_among_quiet_ones() -> None:
    arrivals = Arrivals(window_s=0.05)
    for port in (5001, 5002, 5003):
        arrivals.started(f"ipv4:127.0.0.1:{port}")
        arrivals.finished(f"ipv4:127.0.0.1:{port}")
    time.sleep(0.06)
    arrivals.started("ipv4:127.0.0.1:5001")  # the oldest peer calls again: now the most recent
    arrivals.finished("ipv4:127.0.0.1:5001")
    assert arrivals.expected() == 1  # 5002 and 5003 have gone quiet


def test_concurrent_grpc_clients_get_their_own_answers_and_the_models_their_arrivals(
    registry: ModelRegistry, app: FastAPI
) -> None:
    registry.set_champion(champion := tiny_model("1"))  # batching on: 64 rows / 2 ms
    assert champion.arrivals is None
    answers: dict[int, list[bool]] = {}

    def client(index: int, url: str) -> None:
        with triton.InferenceServerClient(url=url) as connection:  # a channel, so a peer, each
            for call in range(10):
                rows = rows_of(1 + (index + call) % 3, seed=100 * index + call)
                result = connection.infer("digits", [tensor_of(rows)])
                got = result.as_numpy("probabilities")
                answers.setdefault(index, []).append(bool(np.allclose(got, expected_probabilities(champion, rows))))

    with running_grpc_server(app.state.inference) as url:
        threads = [threading.Thread(target=client, args=(index, url)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert answers == {index: [True] * 10 for index in range(6)}
        assert champion.arrivals is not None and champion.arrivals() >= 0

        registry.set_canary(canary := tiny_model("2"), 0.5)
        with triton.InferenceServerClient(url=url) as connection:
            connection.infer("digits", [tensor_of(rows_of(1))])
        assert canary.arrivals is not None  # a model loaded later gets it after the next gRPC answer
