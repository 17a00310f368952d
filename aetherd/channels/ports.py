"""The ports channel (PROTOCOL.md section 5): `open`/`close` pushes, `list`, `kill`.

The scanner (`services.ports`) does the work; this module turns its events into
frames. Each connection holds scanning demand for as long as it lives, so the
daemon scans only while someone is connected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aetherd.errors import ErrorCode
from aetherd.protocol import Channel, Context, Empty
from aetherd.protocol.ports import PortEntry, PortsClose, PortsKill, PortsKillResult, PortsOpen
from aetherd.services.ports import PortEvent, PortInfo

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("ports", pushes=(PortsOpen, PortsClose))


def _fields(info: PortInfo) -> dict[str, object]:
    return {
        "port": info.port,
        "pid": info.pid,
        "process": info.process,
        "command": info.command,
        "address": info.address,
        "addresses": list(info.addresses),
        "local_only": info.local_only,
        "url": info.url,
        "label": info.label,
    }


def port_entry(info: PortInfo) -> PortEntry:
    """One port as the `list` reply carries it."""
    return PortEntry.model_validate(_fields(info))


def open_frame(info: PortInfo) -> PortsOpen:
    """The `ports/open` frame of one port."""
    return PortsOpen.model_validate(_fields(info))


def event_frame(event: PortEvent) -> PortsOpen | PortsClose:
    """The frame of one scanner event."""
    if event.kind == "open" and event.info is not None:
        return open_frame(event.info)
    return PortsClose(port=event.port)


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


@channel.handler("list", Empty, reply=list[PortEntry])
async def list_ports(ctx: Context, msg: Empty) -> list[PortEntry]:
    """Every listening port, as the `open` frames carry them, by port number."""
    return [port_entry(info) for info in await ctx.services.ports.snapshot()]


@channel.handler(
    "kill",
    PortsKill,
    reply=PortsKillResult,
    errors=(ErrorCode.NOT_FOUND, ErrorCode.PERMISSION_DENIED),
    concurrent=True,
)
async def kill(ctx: Context, msg: PortsKill) -> PortsKillResult:
    """SIGTERM the listening processes (SIGKILL after the grace period); `close` follows."""
    result = await ctx.services.ports.kill(msg.port)
    return PortsKillResult.model_validate(result)
