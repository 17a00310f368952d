"""The ports channel (PROTOCOL.md section 5): `open`/`close` pushes, `list`, `kill`.

The scanner (`services.ports`) does the work; this module turns its events into
frames. Each connection holds scanning demand for as long as it lives, so the
daemon scans only while someone is connected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from aetherd.protocol import Channel, Context, Empty, Message
from aetherd.services.ports import PortEvent, PortInfo

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("ports")


class PortsKill(Message):
    """`kill`: end the processes listening on `port`."""

    port: int = Field(ge=1, le=65535)


def open_frame(info: PortInfo) -> dict[str, Any]:
    """The `ports/open` frame of one port."""
    return {"channel": "ports", "type": "open", **info.to_wire()}


def event_frame(event: PortEvent) -> dict[str, Any]:
    """The frame of one scanner event."""
    if event.kind == "open" and event.info is not None:
        return open_frame(event.info)
    return {"channel": "ports", "type": "close", "port": event.port}


@channel.on_startup
async def wire(daemon: Daemon) -> None:
    """Broadcast every scanner event to every connection."""
    daemon.services.ports.subscribe(lambda event: daemon.hub.broadcast(event_frame(event)))


@channel.on_connect
async def announce(ctx: Context) -> None:
    """Hold scanning demand for this connection, and push one `open` per listening port."""
    scanner = ctx.services.ports
    ctx.peer.add_cleanup(scanner.hold())
    for info in await scanner.snapshot():
        ctx.peer.send(open_frame(info))


@channel.handler("list", Empty)
async def list_ports(ctx: Context, msg: Empty) -> list[dict[str, Any]]:
    """Every listening port, as the `open` frames carry them."""
    return [info.to_wire() for info in await ctx.services.ports.snapshot()]


@channel.handler("kill", PortsKill, concurrent=True)
async def kill(ctx: Context, msg: PortsKill) -> dict[str, Any]:
    """SIGTERM the listening processes (SIGKILL after the grace period); `close` follows."""
    return await ctx.services.ports.kill(msg.port)
