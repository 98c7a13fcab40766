"""Concurrent requests gathered into one model call.

Each request `submit`s its item and awaits the result; one task in the server's event loop takes
the first waiting item, optionally waits `max_wait_ms` for company, takes whatever else is queued
(up to `max_batch`), and runs `run_batch(key, items)` in a single dedicated thread. While that
call runs, new requests queue up and form the next batch, so under load batches grow by
themselves and at concurrency 1 nothing waits when `max_wait_ms` is 0. Items are grouped by
`key` (the searcher in force), so a bundle swapped mid-flight never mixes two models in a batch.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import Callable

log = logging.getLogger("embedlab.serve")


class MicroBatcher:
    """`run_batch(key, items) -> results`, one result (a value or an Exception instance) per item."""

    def __init__(self, run_batch: Callable[[Any, list], list], *, max_batch: int = 16, max_wait_ms: float = 0.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"micro-batching needs max_batch >= 1 and max_wait_ms >= 0, "
                             f"got {max_batch} and {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: deque[int] = deque(maxlen=10_000)   # the latest batches run, for tests
        self.batches = 0   # model calls made, and the items they took (both for /metrics)
        self.items = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="microbatch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, key: Any, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # One queue and one collector per event loop (a test client may start several loops).
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue), name="microbatch-collector")
        future = loop.create_future()
        self._queue.put_nowait((key, item, future))
        return await future

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _collect(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            if self.max_wait_s and self.max_batch > 1 and queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.max_wait_s)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            waiting = [entry for entry in batch if not entry[2].done()]   # a client that hung up is skipped
            for key, entries in _group_by_key(waiting):
                await self._run(key, entries)

    async def _run(self, key: Any, entries: list) -> None:
        self.batch_sizes.append(len(entries))
        self.batches += 1
        self.items += len(entries)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.run_batch, key, [item for _, item, _ in entries])
            if len(results) != len(entries):
                raise RuntimeError(f"a batch of {len(entries)} items gave {len(results)} results")
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the collector lives on
            results = [exc] * len(entries)
        for (_, _, future), result in zip(entries, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def _group_by_key(entries: list) -> list[tuple[Any, list]]:
    groups: dict[int, tuple[Any, list]] = {}
    for entry in entries:
        groups.setdefault(id(entry[0]), (entry[0], []))[1].append(entry)
    return list(groups.values())
