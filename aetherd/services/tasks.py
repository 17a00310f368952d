"""What the terminal and process services share about ending things.

- `TaskSet`: the small background tasks a service starts (a SIGKILL due after a grace
  period, ending what is left of a process group). Each is referenced until it is done
  (asyncio keeps only weak references to tasks), counted for tests and metrics, and
  drained or cancelled when the service stops or hands over.
- `end_all`: the stop of every child the same way: a first signal to each, a grace
  period, SIGKILL to those still alive, then a bounded wait for them; returns the ones
  that did not end (a process stuck in the kernel), for the caller to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar


class TaskSet:
    """Background tasks of one service, kept until they finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task held until it is done; returns the task."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        """Cancel every task now (a hand-over: the next process re-arms what it needs)."""
        for task in list(self._tasks):
            task.cancel()

    async def drain(self, timeout: float) -> None:
        """Let the tasks finish for at most `timeout` seconds, then cancel the rest."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            task.cancel()


class Ending(Protocol):
    """A child that can be waited for: a terminal session, a process."""

    @property
    def alive(self) -> bool:
        """False once its end has been recorded."""

    @property
    def exited_event(self) -> asyncio.Event:
        """Set when its end is recorded."""


C = TypeVar("C", bound=Ending)


async def end_all(
    children: Sequence[C],
    send: Callable[[C, int], Awaitable[None]],
    first: int,
    grace: float,
    kill_wait: float,
) -> list[C]:
    """End every live child: `first` (SIGHUP, SIGTERM) now, SIGKILL after `grace`.

    `send(child, signal)` delivers a signal (to its session or group). Waits at most
    `grace` and then `kill_wait` seconds in all; returns the children still alive.
    """
    live = [child for child in children if child.alive]
    for child in live:
        await send(child, first)
    if live:
        waiters = [asyncio.ensure_future(child.exited_event.wait()) for child in live]
        await asyncio.wait(waiters, timeout=grace)
        for waiter in waiters:
            waiter.cancel()
    for child in live:
        if child.alive:
            await send(child, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait
    for child in live:
        if child.alive:
            # SIGKILL cannot be ignored: the end is imminent; the wait is bounded anyway.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    child.exited_event.wait(), max(0.01, deadline - time.monotonic())
                )
    return [child for child in live if child.alive]
