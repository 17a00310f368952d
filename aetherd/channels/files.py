"""The files channel (PROTOCOL.md section 3). Every frame needs a requestId.

Thin handlers over `services.fs` (jailed file operations, disk work in threads) and
`services.watcher` (change events, broadcast to every connection).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Context, Message
from aetherd.services.fs import decode_raw_path

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("files", require_request_id=True)


def _pick(value: str | None, raw: str | None, name: str) -> str:
    """The path from `name`, or from its base64 `raw<Name>` form (non-UTF-8 names)."""
    if raw is not None:
        return decode_raw_path(raw)
    if value is None:
        raise AetherError(ErrorCode.INVALID_MESSAGE, f"missing field '{name}'", field=name)
    return value


class PathRequest(Message):
    path: str | None = None
    raw_path: str | None = None

    @property
    def target(self) -> str:
        return _pick(self.path, self.raw_path, "path")


class ReadRequest(PathRequest):
    offset: int = Field(0, ge=0)
    length: int | None = Field(None, ge=0)


class WriteRequest(PathRequest):
    content: str
    encoding: Literal["utf-8", "utf8", "base64"] = "utf-8"
    append: bool = False
    expected_modified: str | None = None


class DeleteRequest(PathRequest):
    recursive: bool = True


class RenameRequest(Message):
    old_path: str | None = None
    new_path: str | None = None
    raw_old_path: str | None = None
    raw_new_path: str | None = None
    overwrite: bool = False


@channel.handler("list", PathRequest, concurrent=True)
async def list_(ctx: Context, msg: PathRequest) -> Any:
    return await ctx.services.fs.list(msg.target)


@channel.handler("read", ReadRequest, concurrent=True)
async def read(ctx: Context, msg: ReadRequest) -> Any:
    return await ctx.services.fs.read(msg.target, msg.offset, msg.length)


@channel.handler("write", WriteRequest, concurrent=True)
async def write(ctx: Context, msg: WriteRequest) -> Any:
    if msg.encoding == "base64":
        try:
            data = base64.b64decode(msg.content, validate=True)
        except (binascii.Error, ValueError):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'content': not valid base64",
                field="content",
            ) from None
    else:
        try:
            data = msg.content.encode("utf-8")
        except UnicodeEncodeError:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'content': holds a lone surrogate; send binary as base64",
                field="content",
            ) from None
    return await ctx.services.fs.write(
        msg.target, data, append=msg.append, expected_modified=msg.expected_modified
    )


@channel.handler("mkdir", PathRequest, concurrent=True)
async def mkdir(ctx: Context, msg: PathRequest) -> Any:
    return await ctx.services.fs.mkdir(msg.target)


@channel.handler("delete", DeleteRequest, concurrent=True)
async def delete(ctx: Context, msg: DeleteRequest) -> Any:
    return await ctx.services.fs.delete(msg.target, recursive=msg.recursive)


@channel.handler("rename", RenameRequest, concurrent=True)
async def rename(ctx: Context, msg: RenameRequest) -> Any:
    old = _pick(msg.old_path, msg.raw_old_path, "oldPath")
    new = _pick(msg.new_path, msg.raw_new_path, "newPath")
    return await ctx.services.fs.rename(old, new, overwrite=msg.overwrite)


@channel.handler("stat", PathRequest, concurrent=True)
async def stat(ctx: Context, msg: PathRequest) -> Any:
    return await ctx.services.fs.stat(msg.target)


@channel.on_startup
async def wire_watcher(daemon: Daemon) -> None:
    """Broadcast every watcher event (change, resync) to every connection."""
    watcher = getattr(daemon.services, "watcher", None)
    if watcher is None:
        return

    def forward(event: dict[str, Any]) -> None:
        daemon.hub.broadcast({"channel": "files", **event})

    watcher.subscribe(forward)
