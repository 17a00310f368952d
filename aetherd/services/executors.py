"""Bounded thread pools, one per kind of blocking work.

The event loop never does blocking I/O itself; it hands it to a thread. Using the
loop's default executor for everything means one kind of stuck work (a read that
never returns) can use up every thread and stall unrelated requests, and that
`asyncio.run` then waits for those threads at exit. So each kind of work gets its
own `BoundedExecutor`:

- a fixed number of threads (a setting), so one kind cannot starve another;
- daemon threads, not registered with `concurrent.futures`' exit hook, so a thread
  stuck in a system call never keeps the process alive;
- `shutdown(timeout)` cancels what has not started and waits for running work at most
  `timeout` seconds, then gives up on it (and says so in the log).

`Executors` holds the daemon's pools: `file` (all workspace file I/O: the files
channel, HTTP transfers, the agent's file tools, the config store) and `search` (the
Python search engine's walks and reads, so a long search never takes the file threads). To add
another kind (for example `git` or `search`): add a setting for its size, create the
pool in `Executors.__init__`, list it in `_pools()`, and run that work with
`await executors.<kind>.run(func, *args)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from aetherd.metrics import Sample

log = logging.getLogger("aetherd.executors")
T = TypeVar("T")

_STOP = object()


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class BoundedExecutor:
    """At most `max_workers` daemon threads; threads start on demand and stay."""

    def __init__(self, name: str, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.name = name
        self.max_workers = max_workers
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False
        self.submitted = 0
        self.busy = 0

    def submit(self, func: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue `func(*args)`; a RuntimeError once the executor is shut down."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} executor is shut down")
            self.submitted += 1
            self._queue.put((future, func, args))
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"aetherd-{self.name}-{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        return future

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` in this pool and await its result."""
        return await asyncio.wrap_future(self.submit(func, *args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, func, args = item
            if future.set_running_or_notify_cancel():
                with self._lock:
                    self.busy += 1
                try:
                    result = func(*args)
                except BaseException as exc:  # handed to the awaiting task
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                finally:
                    with self._lock:
                        self.busy -= 1
            del item, future, func, args
            with self._lock:
                self._idle += 1

    def shutdown(self, timeout: float) -> list[str]:
        """Cancel queued work, stop the threads, wait for running work at most `timeout`.

        Returns the names of the threads that were still busy (they are daemon
        threads and do not keep the process alive).
        """
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:  # cancel what has not started
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()
        for _ in threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + max(0.0, timeout)
        stuck = []
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            log.warning(
                "%d %s thread(s) still blocked after %.1fs; not waiting for them: %s",
                len(stuck),
                self.name,
                timeout,
                ", ".join(stuck),
            )
        return stuck

    def stats(self) -> dict[str, Any]:
        """Threads, busy threads and submitted calls."""
        with self._lock:
            return {
                "threads": len(self._threads),
                "busy": self.busy,
                "max": self.max_workers,
                "submitted": self.submitted,
            }


class Executors:
    """The daemon's executors, one per kind of blocking work."""

    def __init__(
        self, *, file_threads: int = 16, search_threads: int = 2, shutdown_timeout: float = 5.0
    ) -> None:
        self.file = BoundedExecutor("file", file_threads)
        self.search = BoundedExecutor("search", search_threads)
        self.shutdown_timeout = shutdown_timeout

    def _pools(self) -> list[BoundedExecutor]:
        return [self.file, self.search]

    def metrics(self) -> Iterator[Sample]:
        """Threads, busy threads, the cap and calls of each pool, read at scrape time."""
        for pool in self._pools():
            stats = pool.stats()
            labels = {"pool": pool.name}
            yield Sample("aetherd_executor_threads", "Threads started", stats["threads"], labels)
            yield Sample("aetherd_executor_busy", "Threads running a call", stats["busy"], labels)
            yield Sample("aetherd_executor_max_threads", "The pool's cap", stats["max"], labels)
            yield Sample(
                "aetherd_executor_calls",
                "Calls submitted",
                stats["submitted"],
                labels,
                kind="counter",
            )

    async def stop(self) -> None:
        """Shut every pool down; never waits on a blocked thread beyond the timeout."""
        loop = asyncio.get_running_loop()
        for pool in self._pools():
            # The joins run in a daemon thread of their own: the loop is never blocked.
            done: asyncio.Future[None] = loop.create_future()

            def shut(pool: BoundedExecutor = pool, done: asyncio.Future[None] = done) -> None:
                pool.shutdown(self.shutdown_timeout)
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_settle, done)

            threading.Thread(target=shut, name=f"aetherd-{pool.name}-shutdown", daemon=True).start()
            await asyncio.wait({done}, timeout=self.shutdown_timeout + 1.0)
