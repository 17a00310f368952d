"""The set of live connections, for pushing one event to all of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aetherd.protocol.context import Peer
from aetherd.protocol.frames import dumps
from aetherd.protocol.models import Frame, encode


class Hub:
    """Live peers. `broadcast` serializes once and queues the same string to each."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def add(self, peer: Peer) -> None:
        """Start delivering broadcasts to `peer`."""
        self._peers[peer.id] = peer

    def discard(self, peer: Peer) -> None:
        """Stop delivering broadcasts to `peer`."""
        self._peers.pop(peer.id, None)

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def broadcast(self, frame: Frame | str | dict[str, Any]) -> None:
        """Queue `frame` on every live connection."""
        if isinstance(frame, str):
            text = frame
        elif isinstance(frame, Frame):
            text = encode(frame)
        else:  # transitional: a hand-built dict from a channel not yet converted
            text = dumps(frame)
        for peer in list(self._peers.values()):
            peer.send(text)
