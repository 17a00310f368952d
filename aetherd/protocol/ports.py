"""The ports channel's frames (docs/protocol.md section 5), in both directions.

Client → server: `list`, `kill`. Server → client: `open` and `close` pushes; the
replies of `list` (the objects of `open`, without `channel`/`type`) and `kill`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aetherd.protocol.models import Frame, Message, Model

__all__ = ["PortEntry", "PortsClose", "PortsKill", "PortsKillResult", "PortsOpen"]

# -- client → server --------------------------------------------------------------------


class PortsKill(Message):
    """`kill`: end the processes listening on `port` (an integer: `"80"` and `true` are refused)."""

    port: int = Field(strict=True, ge=1, le=65535)


# -- server → client --------------------------------------------------------------------


class PortEntry(Model):
    """One listening port: an item of the `list` reply (the fields of `open`)."""

    port: int = Field(ge=1, le=65535)
    pid: int | None = Field(description="null when the process cannot be identified")
    process: str | None = Field(description="The process name")
    command: str | None = Field(description="The command line, joined with spaces")
    address: str = Field(description="The widest bind address")
    addresses: list[str] = Field(description="Every bind address, widest first")
    local_only: bool = Field(description="Every bind address is loopback")
    url: str = Field(description="The preview URL")
    label: str | None = Field(description="From the workspace config, else null")


class PortsOpen(Frame):
    """`open`: a port is listening, or its fields changed (clients upsert by `port`)."""

    channel: Literal["ports"] = "ports"
    type: Literal["open"] = "open"
    port: int = Field(ge=1, le=65535)
    pid: int | None = Field(description="null when the process cannot be identified")
    process: str | None = Field(description="The process name")
    command: str | None = Field(description="The command line, joined with spaces")
    address: str = Field(description="The widest bind address")
    addresses: list[str] = Field(description="Every bind address, widest first")
    local_only: bool = Field(description="Every bind address is loopback")
    url: str = Field(description="The preview URL")
    label: str | None = Field(description="From the workspace config, else null")


class PortsClose(Frame):
    """`close`: the port's last listening socket is gone (or it is now ignored)."""

    channel: Literal["ports"] = "ports"
    type: Literal["close"] = "close"
    port: int = Field(ge=1, le=65535)


class PortsKillResult(Model):
    """The reply of `kill`: the pids sent SIGTERM (SIGKILL follows after the grace)."""

    port: int = Field(ge=1, le=65535)
    pids: list[int]
