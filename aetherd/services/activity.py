"""User activity and idleness, for `GET /workspaces/{id}/info` and the control plane."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from aetherd.metrics import Sample


class ActivityTracker:
    """Counts connections and remembers when the workspace was last in use.

    The workspace is busy while a client is connected or a task runs. `idle_seconds`
    counts from the latest of: the last client frame, the moment the last connection
    closed, and the moment the last running task ended (reported via `mark_busy`).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.connections = 0
        self.last_activity_at = clock()
        self._last_busy_at = self.last_activity_at

    def touch(self) -> None:
        """The user did something (any client frame, or `activity/user_activity`)."""
        self.last_activity_at = self._clock()

    def mark_busy(self) -> None:
        """Something that keeps the workspace busy (a task) is running or just ended."""
        self._last_busy_at = self._clock()

    def connection_opened(self) -> None:
        """A client connected."""
        self.connections += 1
        self.touch()

    def connection_closed(self) -> None:
        """A client disconnected."""
        self.connections = max(0, self.connections - 1)
        self._last_busy_at = self._clock()

    def idle_seconds(self, running_tasks: int = 0) -> float:
        """Seconds the workspace has been idle; 0 while connected or working."""
        if self.connections > 0 or running_tasks > 0:
            return 0.0
        since = max(self.last_activity_at, self._last_busy_at)
        return max(0.0, self._clock() - since)

    def metrics(self) -> Iterator[Sample]:
        """Connections and idleness, read at scrape time."""
        yield Sample("aetherd_connections", "Open WebSocket connections", self.connections)
        yield Sample("aetherd_idle_seconds", "Seconds without user activity", self.idle_seconds())
