"""The set of live connections, for pushing one event to all of them."""

from __future__ import annotations

from collections.abc import Iterator

from aetherd.protocol.context import Peer
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

    def broadcast(self, frame: Frame | str) -> None:
        """Queue `frame` (a model, or text already encoded) on every live connection."""
        if isinstance(frame, str):
            text = frame
        elif isinstance(frame, Frame):
            text = encode(frame)
        else:
            raise TypeError(f"broadcast takes a Frame model, not {type(frame).__name__}")
        for peer in list(self._peers.values()):
            peer.send(text)
