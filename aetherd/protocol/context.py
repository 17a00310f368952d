"""What handlers see: the daemon (settings, services, hub) and the peer that sent the frame."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aetherd.daemon import Daemon, Services
    from aetherd.protocol.hub import Hub
    from aetherd.settings import Settings


class OutboundStream(Protocol):
    """A pull source of frames for a peer's writer (used for flow-controlled output).

    The writer calls `pull()` when it can send; the stream returns one serialized
    frame, or None when it has nothing. The stream calls `peer.wake()` when it has
    something new.
    """

    def pull(self) -> str | None: ...


class Peer(Protocol):
    """One connected client, as the protocol layer sees it (no aiohttp here)."""

    id: str

    @property
    def closed(self) -> bool: ...

    def send(self, frame: dict[str, Any] | str) -> None:
        """Queue a frame; never blocks. A client too slow to drain its queue is dropped."""

    def add_cleanup(self, func: Callable[[], Any]) -> None:
        """Run `func` (sync or async) when the connection ends."""

    def add_stream(self, stream: OutboundStream) -> Callable[[], None]:
        """Let the writer pull frames from `stream`; returns a function that removes it."""

    def wake(self) -> None:
        """Tell the writer that a stream has something to send."""

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the send queue."""


@dataclass
class Context:
    """One frame's view of the world."""

    daemon: Daemon
    peer: Peer
    request_id: str | None = None

    @property
    def services(self) -> Services:
        """The daemon's services."""
        return self.daemon.services

    @property
    def settings(self) -> Settings:
        """The daemon's settings."""
        return self.daemon.settings

    @property
    def hub(self) -> Hub:
        """Every live connection, for broadcasts."""
        return self.daemon.hub
