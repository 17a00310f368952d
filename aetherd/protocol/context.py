"""What handlers see: the daemon (settings, services, hub) and the peer that sent the frame."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from aetherd.protocol.models import Frame

if TYPE_CHECKING:
    from aetherd.daemon import Daemon, Services
    from aetherd.protocol.hub import Hub
    from aetherd.settings import Settings


class OutboundStream(Protocol):
    """A pull source of frames for a peer's writer (used for flow-controlled output).

    The writer calls `pull()` when it can send; the stream returns one serialized
    frame (text, or its UTF-8 bytes: sent as a text frame without re-encoding), or
    None when it has nothing. The stream calls `peer.wake()` when it has something new.
    """

    def pull(self) -> str | bytes | None: ...


T = TypeVar("T")


class Slot(Generic[T]):
    """A key for one piece of per-connection state (Home Assistant's `subscriptions`).

    A channel declares its slot once, at module level (the key is immutable; the
    state lives on each connection):

        STREAMS = Slot("terminal.streams", dict)

    and reads it with `peer.slot(STREAMS)`, which creates the value on first use with
    `factory()`. When the connection closes, a value that has a `close()` method (sync
    or async) is closed; then the value is dropped with the connection.
    """

    __slots__ = ("factory", "name")

    def __init__(self, name: str, factory: Callable[[], T]) -> None:
        self.name = name
        self.factory = factory

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


class Peer(Protocol):
    """One connected client, as the protocol layer sees it (no aiohttp here)."""

    id: str
    # The upgrade request's query parameters (first value of each; `token` left out),
    # for connect hooks that take options (`?agentHistory=`).
    query: Mapping[str, str]

    @property
    def closed(self) -> bool: ...

    def send(self, frame: Frame | str) -> None:
        """Queue a frame (a model, or text already encoded); never blocks."""

    def slot(self, key: Slot[T]) -> T:
        """This connection's value for `key`, created on first use."""

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
