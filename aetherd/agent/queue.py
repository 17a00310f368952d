"""The task queue: a FIFO of jobs, one running at a time.

`TaskQueue` knows jobs, not models or tools: a worker pops the next job and awaits
`run(job)` (the turn loop) in its own task, so that job can be cancelled alone. It
answers "is this id taken", "how many wait", and removes or cancels a job on abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aetherd.errors import AetherError, ErrorCode

log = logging.getLogger("aetherd.agent")


@dataclass
class Job:
    """One task in the queue or running, with the settings it was queued under."""

    task_id: str
    prompt: str
    provider: str
    model: str
    permission_mode: str
    backend: str = "builtin"
    runner: asyncio.Task[None] | None = None
    aborted: bool = False
    finishing: bool = False  # its end is being recorded: cancelling now would lose it
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    input_tokens: int = 0
    output_tokens: int = 0


class TaskQueue:
    """Jobs waiting in order, and the one running; `run(job)` runs each in turn."""

    def __init__(self, run: Callable[[Job], Coroutine[Any, Any, None]], max_queued: int) -> None:
        self.run = run
        self.max_queued = max_queued
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self.current: Job | None = None
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._jobs

    def get(self, task_id: str) -> Job | None:
        """The queued or running job with this id."""
        return self._jobs.get(task_id)

    def running_count(self) -> int:
        """Jobs running now (0 or 1)."""
        return 1 if self.current is not None else 0

    def queued_count(self) -> int:
        """Jobs waiting behind the running one."""
        return len(self._queue)

    def check_room(self, task_id: str) -> None:
        """CONFLICT if the id is taken, LIMIT_EXCEEDED if the queue is full."""
        if task_id in self._jobs:
            raise AetherError(
                ErrorCode.CONFLICT, f"task {task_id!r} already exists", taskId=task_id
            )
        if len(self._queue) >= self.max_queued:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{len(self._queue)} tasks are queued already (the limit)",
                taskId=task_id,
            )

    def put(self, job: Job) -> None:
        """Queue `job` behind the others (call `check_room` first)."""
        self._jobs[job.task_id] = job
        self._queue.append(job)
        self._wake.set()

    def remove_queued(self, job: Job) -> bool:
        """Take a job that has not started out of the queue; False if it is not queued."""
        if job not in self._queue:
            return False
        self._queue.remove(job)
        self._jobs.pop(job.task_id, None)
        return True

    async def cancel_running(self, job: Job, timeout: float) -> None:
        """Cancel a started job and wait (up to `timeout`) until it has ended."""
        if job.runner is not None and not job.finishing:
            job.runner.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.finished.wait(), timeout)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker."""
        self._worker = asyncio.create_task(self._work(), name="agent-worker")

    async def stop(self, timeout: float = 5) -> None:
        """Cancel the running job (waiting up to `timeout` for its end), then the worker."""
        job = self.current
        if job is not None and job.runner is not None:
            await self.cancel_running(job, timeout)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.popleft()
            self.current = job
            job.runner = asyncio.create_task(self.run(job), name=f"agent-task-{job.task_id}")
            try:
                await asyncio.shield(job.runner)
            except asyncio.CancelledError:
                if not job.runner.done():
                    job.runner.cancel()
                    await asyncio.gather(job.runner, return_exceptions=True)
                raise
            except Exception:
                log.exception("agent task %s crashed", job.task_id)
            finally:
                self.current = None
                self._jobs.pop(job.task_id, None)
                job.finished.set()
