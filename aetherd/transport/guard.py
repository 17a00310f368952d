"""Connection hygiene below HTTP: unauthenticated connections are bounded, accept errors quiet.

- **Header timeout.** aiohttp starts its keep-alive timer when a connection is made and
  closes it if no complete request head arrived by then; `serve()` sets that timer to
  `header_timeout`. A client that sends half a request line and stops is closed after it.
- **Unauthenticated connections are bounded.** A connection counts as pending from
  accept until one of its requests passes `check_access`. Beyond
  `max_pending_connections`, the oldest pending connection is closed, so a flood of
  half-open sockets cannot hold every file descriptor, and a quick client (a health
  check) still gets through.
- **accept() errors are logged at most once per interval, with a count.** When the
  process runs out of file descriptors, asyncio logs a traceback for every failed
  `accept()` (hundreds per second); the loop's exception handler folds them into one
  warning per `accept_error_log_interval`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from aetherd.metrics import Sample

log = logging.getLogger("aetherd.guard")

ACCEPT_ERROR = "socket.accept() out of system resource"
# File descriptors kept free for everything that is not a client connection (files,
# git, PTYs, the database) when the pending limit is fitted to a low `ulimit -n`.
FD_RESERVE = 16
# Seconds between a burst of accepts and the check of the pending limit.
ENFORCE_DELAY = 0.01


def fit_pending_limit(limit: int) -> int:
    """`limit`, lowered to half the file descriptors still free when `ulimit -n` is low.

    Otherwise unauthenticated connections could use every descriptor before the limit
    is reached: accept() would fail and nothing could evict them before their timeout.
    """
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return limit
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, (soft - in_use - FD_RESERVE) // 2))


class RateLimited:
    """Counts events and logs at most once per `interval`, with the count since the last line."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.total = 0
        self._clock = clock
        self._since = 0
        self._last: float | None = None

    def hit(self) -> int | None:
        """Count one event; return how many to report now, or None to stay quiet."""
        self.total += 1
        self._since += 1
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return None
        self._last = now
        count, self._since = self._since, 0
        return count


class ConnectionGuard:
    """Bounds the connections that have not authenticated; folds repeated accept() errors."""

    def __init__(self, max_pending: int, log_interval: float) -> None:
        self.max_pending = fit_pending_limit(max_pending)
        if self.max_pending < max_pending:
            log.info(
                "max_pending_connections lowered to %d to fit the file descriptor limit",
                self.max_pending,
            )
        self._trusted: set[object] = set()
        self._accept_errors = RateLimited(log_interval)
        self._evictions = RateLimited(log_interval)
        self._check: asyncio.TimerHandle | None = None
        self._server: web.Server | None = None

    @property
    def accept_errors(self) -> int:
        """accept() failures since start."""
        return self._accept_errors.total

    @property
    def evicted(self) -> int:
        """Unauthenticated connections closed for being over the limit."""
        return self._evictions.total

    def pending(self) -> int:
        """Connections open now that have not authenticated (0 before serving)."""
        if self._server is None:
            return 0
        return sum(1 for conn in self._server.connections if conn not in self._trusted)

    def metrics(self) -> Iterator[Sample]:
        """Pending connections, evictions and accept() failures, read at scrape time."""
        yield Sample(
            "aetherd_pending_connections", "Connections not yet authenticated", self.pending()
        )
        yield Sample(
            "aetherd_pending_connections_closed",
            "Unauthenticated connections closed over max_pending_connections",
            self.evicted,
            kind="counter",
        )
        yield Sample(
            "aetherd_accept_errors",
            "Failed accept() calls (out of file descriptors)",
            self.accept_errors,
            kind="counter",
        )

    def trust(self, protocol: object) -> None:
        """Mark the connection of an authenticated request: it no longer counts as pending."""
        self._trusted.add(protocol)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory: after accepts, close the oldest pending beyond the limit.

        The check runs a moment after a burst of accepts, once aiohttp has registered
        the new connections (a protocol closed before its connection is made would leak).
        """

        self._server = server

        def make() -> asyncio.Protocol:
            self._schedule_check()
            return server()

        return make

    def _schedule_check(self) -> None:
        if self._check is None and self._server is not None:
            loop = asyncio.get_running_loop()
            self._check = loop.call_later(ENFORCE_DELAY, self._enforce, self._server)

    def _enforce(self, server: web.Server) -> None:
        self._check = None
        connections = server.connections  # in accept order (oldest first)
        self._trusted.intersection_update(connections)
        pending = [conn for conn in connections if conn not in self._trusted]
        excess = len(pending) - self.max_pending
        for conn in pending[: max(0, excess)]:
            conn.force_close()
            count = self._evictions.hit()
            if count is not None:
                log.warning(
                    "closed %d unauthenticated connection(s) over the limit",
                    count,
                    extra={"maxPendingConnections": self.max_pending},
                )

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler: one warning per interval for accept() failures."""
        if context.get("message") != ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        # Out of descriptors: close pending connections over the limit now, not at the
        # next successful accept (there may be none).
        self._schedule_check()
        count = self._accept_errors.hit()
        if count is not None:
            exc = context.get("exception")
            log.warning(
                "accept() failed %d time(s) since the last report: %s",
                count,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                extra={"acceptErrorsTotal": self._accept_errors.total},
            )


class GuardedSite(web.SockSite):
    """aiohttp's `SockSite`, with accepts going through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, sock: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(runner, sock, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server), sock=self._sock, backlog=self._backlog
        )
