"""Services: plain asyncio classes with the daemon's real logic. No aiohttp, no frames.

Each service may define `async start()` and `async stop()`; `Services` starts them in
the order they were added and stops them in reverse. A channel reaches its service
through `ctx.services.<name>`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from aetherd.services.activity import ActivityTracker
from aetherd.services.jail import Jail
from aetherd.settings import Settings

log = logging.getLogger("aetherd.services")
S = TypeVar("S")


class Services:
    """The daemon's services, built from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lifecycle: list[Any] = []
        self._started: list[Any] = []
        self.activity = ActivityTracker()
        self.jail = Jail(settings.root)

    def add(self, service: S) -> S:
        """Register `service` for start/stop, and return it."""
        self._lifecycle.append(service)
        return service

    async def start(self) -> None:
        """Start every service in order; on failure, stop the ones already started."""
        for service in self._lifecycle:
            start = getattr(service, "start", None)
            if start is not None:
                try:
                    await start()
                except BaseException:
                    await self.stop()
                    raise
            self._started.append(service)

    async def stop(self) -> None:
        """Stop the started services in reverse order; one failing does not stop the rest."""
        while self._started:
            service = self._started.pop()
            stop = getattr(service, "stop", None)
            if stop is None:
                continue
            try:
                await asyncio.wait_for(stop(), timeout=self.settings.shutdown_timeout)
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)

    def terminal_count(self) -> int:
        """Live terminal sessions (0 until the terminal service exists)."""
        terminals = getattr(self, "terminals", None)
        return terminals.count() if terminals is not None else 0

    def running_tasks(self) -> int:
        """Agent tasks running now (0 until the agent service exists)."""
        agent = getattr(self, "agent", None)
        return agent.running_count() if agent is not None else 0


def build_services(settings: Settings) -> Services:
    """Create every service for `settings` (not started yet)."""
    services = Services(settings)
    # Start order matters: later services may read earlier ones; stop runs in reverse.

    # -- config (the workspace config store) --

    # -- files (file system operations, watcher) --

    # -- terminal (PTY sessions) --
    from aetherd.services.terminal import TerminalManager

    services.terminals = services.add(TerminalManager(settings, services.jail))

    # -- ports (port scanner) --

    # -- agent (transcript store, agent runner) --

    # -- operations (metrics, notify) --

    return services
