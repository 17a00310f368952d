"""The optional idle action: run a command once the workspace has been idle long enough.

For images without a control plane (the control plane reads `idleSeconds` from
`/workspaces/{id}/info` instead). The command runs through `sh -c` in the workspace
root, once per idle period: activity (or a connection) re-arms it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aetherd.services.activity import ActivityTracker

log = logging.getLogger("aetherd.idle")


class IdleAction:
    """Watches idleness and runs `command` when it exceeds `after` seconds."""

    def __init__(
        self,
        activity: ActivityTracker,
        command: str,
        after: float,
        cwd: str,
        running_tasks: Callable[[], int] = lambda: 0,
        timeout: float = 300.0,
    ) -> None:
        self._activity = activity
        self._command = command
        self._after = after
        self._cwd = cwd
        self._running_tasks = running_tasks
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.fired = 0
        self.checks = 0

    async def start(self) -> None:
        """Begin watching."""
        self._task = asyncio.create_task(self._watch(), name="idle-action")

    async def stop(self) -> None:
        """Stop watching (a command already running is left to finish)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        tick = max(0.05, min(self._after / 10, 30.0))
        armed = True
        while True:
            await asyncio.sleep(tick)
            idle = self._activity.idle_seconds(self._running_tasks())
            self.checks += 1
            if idle < self._after:
                armed = True
            elif armed:
                armed = False
                await self._run(idle)

    async def _run(self, idle: float) -> None:
        self.fired += 1
        log.info("idle for %.0f s; running the idle action", idle)
        try:
            proc = await asyncio.create_subprocess_shell(
                self._command,
                cwd=self._cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            code = await asyncio.wait_for(proc.wait(), self._timeout)
            log.info("idle action exited with %s", code)
        except asyncio.TimeoutError:
            log.warning("idle action still running after %s s; killing it", self._timeout)
            proc.kill()
            await proc.wait()
        except OSError as exc:
            log.warning("idle action failed to start: %s", exc)
