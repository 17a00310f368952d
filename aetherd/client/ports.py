"""Ports: list, kill, and a stream of `open`/`close` that stays true across reconnects.

The client keeps the listening ports it has been told about. After a reconnect the
daemon pushes `open` for every port again (repeats of a known state are not passed
on) and the client lists the ports, so a port that closed while the socket was down
still gets its `close`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aetherd.client.stream import Stream, Subscribers
from aetherd.protocol.ports import PortEntry, PortsClose, PortsKillResult, PortsOpen

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["PortEvent", "PortsAPI"]

PortEvent = PortsOpen | PortsClose


class PortsAPI:
    """`client.ports`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.known: dict[int, PortsOpen] = {}
        self._subscribers: Subscribers[PortEvent] = Subscribers(client.options.stream_limit)
        client.on_push("ports", "open", self._on_open)
        client.on_push("ports", "close", self._on_close)
        client.on_restore(self._restore)
        client.on_end(self._subscribers.end)

    async def list(self) -> list[PortEntry]:
        """Every listening port, by number."""
        result: list[PortEntry] = await self.client.request("ports", "list", reply=list[PortEntry])
        return result

    async def kill(self, port: int) -> PortsKillResult:
        """End the processes listening on `port` (SIGTERM, then SIGKILL)."""
        result: PortsKillResult = await self.client.request(
            "ports", "kill", {"port": port}, reply=PortsKillResult
        )
        return result

    def watch(self) -> Stream[PortEvent]:
        """`open` and `close` events from now on (the ports known so far are in `known`)."""
        return self._subscribers.add()

    def _on_open(self, frame: Frame) -> None:
        event = PortsOpen.model_validate(frame, extra="ignore")
        if self.known.get(event.port) == event:
            return
        self.known[event.port] = event
        self._subscribers.feed(event)

    def _on_close(self, frame: Frame) -> None:
        event = PortsClose.model_validate(frame, extra="ignore")
        if self.known.pop(event.port, None) is not None:
            self._subscribers.feed(event)

    async def _restore(self, first: bool) -> None:
        if first:
            return
        listening = {
            entry.port
            for entry in await self.client.request(
                "ports", "list", reply=list[PortEntry], internal=True
            )
        }
        for port in sorted(set(self.known) - listening):
            del self.known[port]
            self._subscribers.feed(PortsClose(port=port))
