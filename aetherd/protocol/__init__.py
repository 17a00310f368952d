"""The wire protocol: registry, envelope dispatch, frames, hub. No aiohttp in here."""

from aetherd.protocol.context import Context, OutboundStream, Peer
from aetherd.protocol.frames import dumps
from aetherd.protocol.hub import Hub
from aetherd.protocol.registry import Channel, Empty, Message, Registry

__all__ = [
    "Channel",
    "Context",
    "Empty",
    "Hub",
    "Message",
    "OutboundStream",
    "Peer",
    "Registry",
    "dumps",
]
