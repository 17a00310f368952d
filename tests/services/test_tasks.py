"""The helpers the terminal and process services share to end things, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal

from aetherd.services.tasks import TaskSet, end_all


class Child:
    """A real child process as the services see one: `alive` and `exited_event`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.exited_event = asyncio.Event()
        self.signals: list[int] = []
        self._waiter = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        await self.proc.wait()
        self.exited_event.set()

    @property
    def alive(self) -> bool:
        return not self.exited_event.is_set()


async def spawn(script: str) -> Child:
    proc = await asyncio.create_subprocess_exec("sh", "-c", script, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"  # its trap is set
    return Child(proc)


async def send(child: Child, sig: int) -> None:
    child.signals.append(sig)
    os.kill(child.proc.pid, sig)


async def test_end_all_signals_first_then_kills_only_those_left():
    polite = await spawn("trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done")
    stubborn = await spawn("trap '' TERM; echo ready; while :; do sleep 0.05; done")
    stuck = await end_all([polite, stubborn], send, signal.SIGTERM, grace=0.5, kill_wait=5)
    assert stuck == []
    assert polite.signals == [signal.SIGTERM] and polite.proc.returncode == 0
    assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL]
    assert stubborn.proc.returncode == -signal.SIGKILL
    # Nothing alive: nothing signalled.
    assert await end_all([polite], send, signal.SIGTERM, grace=0.5, kill_wait=5) == []
    assert polite.signals == [signal.SIGTERM]


async def test_a_task_set_holds_tasks_until_done_then_drains_or_cancels():
    tasks = TaskSet()
    gate = asyncio.Event()
    quick = tasks.track(gate.wait())
    forever = tasks.track(asyncio.sleep(3600))
    assert len(tasks) == 2
    gate.set()
    await quick
    await asyncio.sleep(0)
    assert len(tasks) == 1
    await tasks.drain(0.05)  # the sleeper does not finish in time: cancelled
    await asyncio.gather(forever, return_exceptions=True)
    await asyncio.sleep(0)  # its done callback
    assert forever.cancelled() and len(tasks) == 0
    more = tasks.track(asyncio.sleep(3600))
    tasks.cancel()
    await asyncio.gather(more, return_exceptions=True)
    await asyncio.sleep(0)
    assert more.cancelled() and len(tasks) == 0
