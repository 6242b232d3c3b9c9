"""Registry, batching and package loading without HTTP."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from domain.entities import ModelStage, ModelVersion
from domain.errors import ArtifactIntegrityError, InvalidInputError, NotFoundError
from domain.settings import load_settings
from ml.package import MANIFEST_FORMAT, save_package
from ml.zoo import build_model
from serving.batching import BatchingConfig, DynamicBatcher
from serving.metrics import FeedbackStore, Prediction, ServingMetrics
from serving.registry import ModelNotReadyError, ModelRegistry, load_version, sticky_fraction
from storage.artifacts import open_artifact_store
from storage.artifacts.local import path_from_file_uri
from tests.serving.conftest import CLASSES, FEATURES, STANDARDIZER, expected_probabilities, tiny_model


def _wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_batcher_shares_forward_passes_and_splits_results() -> None:
    calls: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        return x * 2

    batcher = DynamicBatcher(forward, BatchingConfig(max_batch_size=16, max_wait_ms=50), name="t")
    futures = [batcher.submit(torch.full((2, 3), float(i))) for i in range(6)]
    results = [f.result(timeout=5) for f in futures]
    for i, result in enumerate(results):
        assert torch.equal(result, torch.full((2, 3), 2.0 * i))
    assert sum(calls) == 12 and len(calls) < 6 and max(calls) <= 16
    batcher.close()
    _wait_until(lambda: not batcher.worker_alive)
    with pytest.raises(RuntimeError):
        batcher.submit(torch.zeros(1, 3))


def test_batcher_reports_a_failed_forward_to_every_request_and_keeps_working() -> None:
    fail = threading.Event()
    fail.set()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if fail.is_set():
            raise ValueError("boom")
        return x

    batcher = DynamicBatcher(forward, BatchingConfig(max_wait_ms=20), name="t")
    futures = [batcher.submit(torch.zeros(1, 2)) for _ in range(3)]
    for f in futures:
        with pytest.raises(ValueError, match="boom"):
            f.result(timeout=5)
    fail.clear()
    assert batcher.submit(torch.ones(1, 2)).result(timeout=5).tolist() == [[1.0, 1.0]]
    batcher.close()


def _batch_sizes_of(in_flight: int, max_batch_size: int, *rows: int) -> list[int]:
    """The forward passes' sizes for requests of `rows` rows, the first alone then the others, with
    `in_flight` requests counted in flight; the deadline (5 s) must not be what ends a batch."""
    calls: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        return x

    config = BatchingConfig(max_batch_size=max_batch_size, max_wait_ms=5_000)
    batcher = DynamicBatcher(forward, config, name="t", in_flight=lambda: in_flight)
    started = time.monotonic()
    futures = [batcher.submit(torch.full((rows[0], 2), 0.0))]
    time.sleep(0.05)  # the worker holds the first request and waits for more
    futures += [batcher.submit(torch.full((n, 2), float(i))) for i, n in enumerate(rows) if i]
    answers = [f.result(timeout=4) for f in futures]
    assert time.monotonic() - started < 2.5, "the batch waited for its deadline"
    assert all(torch.equal(a, torch.full((n, 2), float(i))) for i, (a, n) in enumerate(zip(answers, rows, strict=True)))
    batcher.close()
    return calls


def test_a_batch_runs_once_every_request_in_flight_is_queued_not_at_its_deadline() -> None:
    # the worker is not woken for each arrival while it fills a batch, only when it can act
    assert _batch_sizes_of(3, 64, 1, 1, 1) == [3]


def test_a_full_batch_runs_at_once_before_its_deadline() -> None:
    assert _batch_sizes_of(9, 4, 1, 1, 2) == [4]


def test_idle_worker_exits_and_restarts_on_demand() -> None:
    batcher = DynamicBatcher(lambda x: x, BatchingConfig(max_wait_ms=0, idle_exit_s=0.05), name="t")
    batcher.submit(torch.zeros(1, 1)).result(timeout=5)
    _wait_until(lambda: not batcher.worker_alive)
    assert batcher.submit(torch.ones(1, 1)).result(timeout=5).item() == 1.0


def test_batching_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)


def test_loaded_model_predicts_like_the_module_itself() -> None:
    model = tiny_model("1", batching=BatchingConfig(enabled=False))
    rows = np.random.default_rng(0).normal(size=(5, FEATURES)).astype(np.float32)
    got = asyncio.run(model.infer(torch.from_numpy(rows)))
    expected = expected_probabilities(model, rows)
    np.testing.assert_allclose(np.array([a.values for a in got]), expected, rtol=1e-5, atol=1e-6)
    assert [a.predicted_class for a in got] == expected.argmax(axis=1).tolist() and all(a.finite for a in got)


def test_routing_needs_a_known_pipeline_and_a_champion() -> None:
    registry = ModelRegistry(["digits"])
    assert not registry.is_ready()
    with pytest.raises(ModelNotReadyError), registry.route("digits"):
        pass
    with pytest.raises(NotFoundError) as info, registry.route("nope"):
        pass
    assert info.value.code == "not_found" and "digits" in str(info.value)
    registry.set_champion(tiny_model("1"))
    assert registry.is_ready() and registry.is_ready("digits")
    with pytest.raises(NotFoundError, match="no version '9'"), registry.route("digits", version="9"):
        pass
    with pytest.raises(InvalidInputError, match=r"0\.\.100"):
        registry.set_canary(tiny_model("2"), 150)
    registry.close()


def test_split_follows_the_weight_and_sticky_keys_are_stable() -> None:
    registry = ModelRegistry(rng=random.Random(7))  # noqa: S311
    registry.set_champion(tiny_model("1"))
    registry.set_canary(tiny_model("2"), 30)
    picks = []
    for _ in range(2000):
        with registry.route("digits") as routed:
            picks.append(routed.variant)
    assert 0.26 < picks.count("canary") / len(picks) < 0.34
    for user in ("alice", "bob", "carol"):
        with registry.route("digits", sticky_key=user) as first:
            pass
        for _ in range(20):
            with registry.route("digits", sticky_key=user) as again:
                assert again.variant == first.variant
        expected = "canary" if sticky_fraction("digits", user) < 30 else "champion"
        assert first.variant == expected
    registry.promote_canary("digits")
    with registry.route("digits") as routed:
        assert (routed.variant, routed.model.version) == ("champion", "2")
    registry.close()


def test_swap_keeps_the_in_flight_request_and_frees_the_old_model() -> None:
    registry = ModelRegistry()
    old = tiny_model("1", batching=BatchingConfig(max_wait_ms=0, idle_exit_s=30))
    module_ref = weakref.ref(old.model)
    registry.set_champion(old)
    rows = torch.zeros(2, FEATURES)
    with registry.route("digits") as routed:
        registry.set_champion(tiny_model("2"))  # swap while this request holds the old model
        assert routed.model is old
        batcher = old.batcher
        assert batcher is not None
        result = batcher.submit(rows).result(timeout=5)  # the old model still answers it
        assert len(result) == 2 and len(result[0].values) == CLASSES
    _wait_until(lambda: not batcher.worker_alive)  # closed after its last lease
    with registry.route("digits") as routed:
        assert routed.model.version == "2"
    del old, routed, result
    batcher = None  # drop every reference the test holds
    # freed by reference counting, no gc.collect(): a retired model drops its batcher, which held it
    assert module_ref() is None, "the swapped-out model is still referenced"
    registry.close()


def test_metrics_snapshot_and_feedback() -> None:
    now = [1000.0]
    metrics = ServingMetrics(clock=lambda: now[0])
    for latency in (0.001, 0.002, 0.100):
        metrics.observe("digits", "champion", "1", latency, [0, 2])
    metrics.failed("digits", "canary", "2", 0.5)
    metrics.rejected("digits", "canary", "2")
    metrics.labelled("digits", "champion", "1", labels=2, correct=1)
    champion, canary = metrics.snapshot("digits", window_s=60)
    assert (champion.variant, champion.requests, champion.errors, champion.class_counts) == (
        "champion",
        3,
        0,
        {"0": 3, "2": 3},
    )
    assert champion.latency_p99_ms is not None and 90 < champion.latency_p99_ms <= 100
    assert champion.accuracy == 0.5
    assert (canary.requests, canary.errors, canary.rejected, canary.error_rate) == (1, 1, 1, 1.0)
    now[0] += 120
    assert metrics.snapshot("digits", window_s=60) == []

    store = FeedbackStore(capacity=2)
    for i in range(3):
        store.remember(f"r{i}", Prediction("digits", "champion", "1", (1,), CLASSES))
    assert len(store) == 2
    with pytest.raises(NotFoundError):
        store.label("digits", "r0", 1)  # evicted
    with pytest.raises(InvalidInputError, match="one integer label per row"):
        store.label("digits", "r1", [1, 2])
    assert store.label("digits", "r1", 1).correct == 1
    with pytest.raises(NotFoundError):
        store.label("digits", "r1", 1)  # consumed


def _package(tmp_path: Path) -> tuple[ModelVersion, torch.nn.Module, object]:
    torch.manual_seed(3)
    module = build_model("mlp", {"hidden_sizes": [16]}, [FEATURES], CLASSES).eval()
    manifest = {
        "format": MANIFEST_FORMAT,
        "architecture": "mlp",
        "params": {"hidden_sizes": [16]},
        "input_shape": [FEATURES],
        "output_classes": CLASSES,
        "variant": "none",
        "standardizer": STANDARDIZER.to_dict(),
        "feature_names": [f"f{i}" for i in range(FEATURES)],
    }
    saved = save_package(module, manifest, tmp_path / "build" / "model.pt")
    store = open_artifact_store(f"file://{tmp_path / 'artifacts'}", load_settings())
    ref = store.put_file(saved.path, key="models/digits/3/model.pt")
    now = datetime.now(UTC)
    version = ModelVersion(
        id=42, pipeline="digits", version=3, run_id=None, artifact_uri=ref.uri, sha256=ref.sha256,
        size_bytes=ref.size, metrics={}, stage=ModelStage.CHAMPION, created_at=now, stage_changed_at=now,
        manifest=manifest,
    )  # fmt: skip
    return version, module, store


def test_load_version_from_an_artifact_store_and_refuse_a_tampered_one(tmp_path: Path) -> None:
    version, module, store = _package(tmp_path)
    loaded = load_version(store, version)  # type: ignore[arg-type]
    assert (loaded.version, loaded.version_id, loaded.input_shape, loaded.output_classes) == ("3", 42, (8,), 3)
    rows = torch.randn(4, FEATURES)
    with torch.inference_mode():
        expected = torch.softmax(module(STANDARDIZER.transform_tensor(rows)), dim=-1)
    torch.testing.assert_close(loaded.predict(rows), expected)

    stored = path_from_file_uri(version.artifact_uri)
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError) as info:
        load_version(store, version)  # type: ignore[arg-type]
    assert info.value.code == "artifact_integrity"
