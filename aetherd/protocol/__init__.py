"""The wire protocol: registry, envelope dispatch, frames, hub. No aiohttp in here."""

from aetherd.protocol.context import Context, OutboundStream, Peer, Slot
from aetherd.protocol.frames import dumps
from aetherd.protocol.hub import Hub
from aetherd.protocol.models import Empty, Frame, Message, Model, encode, omitted
from aetherd.protocol.registry import Channel, Registry

__all__ = [
    "Channel",
    "Context",
    "Empty",
    "Frame",
    "Hub",
    "Message",
    "Model",
    "OutboundStream",
    "Peer",
    "Registry",
    "Slot",
    "dumps",
    "encode",
    "omitted",
]
