"""Dynamic batching: concurrent requests to one loaded model share one forward pass.

Each `DynamicBatcher` owns a queue and one worker thread. `await run(rows)` (from an event loop)
or `submit(rows)` (a `concurrent.futures.Future`, from any thread) queues an NxF tensor; the
worker takes the oldest request, then keeps adding queued requests until the batch holds
`max_batch_size` rows or `max_wait_ms` has passed since it took the first one, runs one forward
pass over the concatenation and hands each request its own slice of the result (`forward` returns
one item per row: a tensor, or a list). A request larger than `max_batch_size` rows runs alone
(never split). While it fills a batch the worker is woken only when it can act (the batch full,
every request in flight queued, or its deadline), not on every arrival.

A thread, not an asyncio task, so that the forward pass never blocks the event loop. The answers
of one batch go back to an event loop in one `call_soon_threadsafe`, not one wake-up per request.
The worker starts with the first request and exits after `idle_exit_s` without work (and
`close()` ends it at once), so a model that is swapped out leaves no thread behind and its
memory is freed with its last reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

Forward = Callable[[torch.Tensor], Any]  # [rows, F] → one answer per row, sliceable (a tensor or a list)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How one loaded model batches. `enabled=False` runs every request on its own forward pass."""

    enabled: bool = True
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    idle_exit_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"BatchingConfig.max_batch_size must be >= 1 (got {self.max_batch_size})")
        if self.max_wait_ms < 0:
            raise ValueError(f"BatchingConfig.max_wait_ms must be >= 0 (got {self.max_wait_ms})")
        if self.idle_exit_s <= 0:
            raise ValueError(f"BatchingConfig.idle_exit_s must be > 0 (got {self.idle_exit_s})")


@dataclass(slots=True)
class _Pending:
    rows: torch.Tensor
    future: Future[Any] | None = None  # submit(): thread-safe
    waiter: asyncio.Future[Any] | None = None  # run(): belongs to the caller's event loop

    def wanted(self) -> bool:
        """False if the caller gave up (cancelled) before the forward pass."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return self.waiter is not None and not self.waiter.done()


def _deliver(answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the event loop: one call per batch sets every waiting request's result."""
    for waiter, result, error in answers:
        if not waiter.done():
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)


class DynamicBatcher:
    """Queues row tensors and answers them from shared forward passes (see the module docstring)."""

    def __init__(
        self,
        forward: Forward,
        config: BatchingConfig,
        *,
        name: str = "model",
        on_batch: Callable[[int, int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`forward` maps a [rows, F] tensor to a [rows, C] tensor; `on_batch(requests, rows)` is
        called after every forward pass (metrics). `in_flight()` counts the requests that may still
        join a batch (queued or on their way); when the batch already holds them all the worker does
        not wait, so a lone request pays no batching delay."""
        self._forward = forward
        self.config = config
        self.name = name
        self._on_batch = on_batch
        self._in_flight = in_flight
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0  # rows in `_pending`
        # (requests, rows) of the batch the worker holds while it waits for more; None otherwise
        self._filling: tuple[int, int] | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, rows: torch.Tensor) -> Future[Any]:
        future: Future[Any] = Future()
        self._enqueue(_Pending(rows, future=future))
        return future

    async def run(self, rows: torch.Tensor) -> Any:
        waiter = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(rows, waiter=waiter))
        return await waiter

    def _enqueue(self, pending: _Pending) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher of {self.name} is closed; route the request to the current model")
            self._pending.append(pending)
            self._queued_rows += int(pending.rows.shape[0])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
                self._thread.start()
            if self._worth_waking():
                self._cond.notify()

    def _worth_waking(self) -> bool:
        """Whether the worker can act on the queue now (the lock is held). While it fills a batch it
        waits for the batch to be full, for every request in flight to be queued, or for its deadline:
        waking it for each arrival would cost a thread switch and a GIL handoff per request, about as
        much CPU as the forward pass itself at a few dozen rows."""
        filling = self._filling
        if filling is None:  # waiting for a first request (or busy: then notify finds no waiter)
            return True
        requests, rows = filling
        if rows + self._queued_rows >= self.config.max_batch_size:
            return True
        return self._in_flight is not None and self._in_flight() <= requests + len(self._pending)

    def close(self) -> None:
        """Lets the worker finish what is queued, then exit; later submits are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def worker_alive(self) -> bool:
        with self._cond:
            return self._thread is not None

    def _next_batch(self) -> list[_Pending] | None:
        """Blocks for the next batch; None when the worker should exit (idle or closed, queue empty)."""
        config = self.config
        with self._cond:
            while not self._pending:
                idle = self._closed or not self._cond.wait(timeout=config.idle_exit_s)
                if idle and not self._pending:
                    self._thread = None  # under the lock: a concurrent submit starts a new worker
                    return None
            batch = [self._pending.popleft()]
            rows = int(batch[0].rows.shape[0])
            self._queued_rows -= rows
            deadline = time.monotonic() + config.max_wait_ms / 1000.0
            while rows < config.max_batch_size:
                if self._pending:
                    following = int(self._pending[0].rows.shape[0])
                    if rows + following > config.max_batch_size:
                        break
                    batch.append(self._pending.popleft())
                    self._queued_rows -= following
                    rows += following
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or (self._in_flight is not None and self._in_flight() <= len(batch)):
                    break
                self._filling = (len(batch), rows)
                self._cond.wait(timeout=remaining)
                self._filling = None
        return batch

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._process(batch)
                del batch
        finally:  # should the worker ever die, the next request starts a new one
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _process(self, batch: list[_Pending]) -> None:
        live = [item for item in batch if item.wanted()]
        if not live:
            return
        try:
            inputs = live[0].rows if len(live) == 1 else torch.cat([item.rows for item in live])
            outputs = self._forward(inputs)
            parts, start = [], 0
            for item in live:
                end = start + int(item.rows.shape[0])
                parts.append(outputs[start:end])
                start = end
        except BaseException as e:  # every waiting request must hear about the failure
            self._answer(live, [None] * len(live), e)
            return
        self._answer(live, parts, None)
        if self._on_batch is not None:
            with contextlib.suppress(Exception):  # metrics never cost an answer
                self._on_batch(len(live), int(inputs.shape[0]))

    @staticmethod
    def _answer(items: list[_Pending], results: list[Any], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for item, result in zip(items, results, strict=True):
            if item.future is not None:
                if error is not None:
                    item.future.set_exception(error)
                else:
                    item.future.set_result(result)
            elif item.waiter is not None:
                by_loop.setdefault(item.waiter.get_loop(), []).append((item.waiter, result, error))
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, answers)
