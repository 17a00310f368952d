"""The config channel (PROTOCOL.md section 6): get, set, validate; `changed` is pushed.

Every frame needs a requestId. The logic lives in `aetherd.services.config.ConfigStore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Context, Empty, Message
from aetherd.services.config import ConfigEvent

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("config", require_request_id=True)


class ConfigSet(Message):
    """`set`: exactly one of `raw` (YAML text) or `config` (object); optional `version`."""

    raw: str | None = None
    config: dict[str, Any] | None = None
    version: str | None = None


class ConfigValidate(Message):
    """`validate`: `raw` YAML text (or, as an extension, a `config` object)."""

    raw: str | None = None
    config: dict[str, Any] | None = None


def changed_frame(event: ConfigEvent) -> dict[str, Any]:
    """The `changed` push for one config event."""
    return {
        "channel": "config",
        "type": "changed",
        "config": event.config.model_dump(mode="json"),
        "version": event.version,
        "valid": event.valid,
        "errors": event.errors,
        "source": event.source,
        "path": event.path,
    }


@channel.handler("get", Empty)
async def get(ctx: Context, msg: Empty) -> dict[str, Any]:
    """The effective config, the file's text, its version and validity."""
    return ctx.services.config.snapshot()


@channel.handler("set", ConfigSet, concurrent=True)
async def set_(ctx: Context, msg: ConfigSet) -> dict[str, Any]:
    """Validate and write the config atomically; CONFLICT on a stale version."""
    return await ctx.services.config.set(raw=msg.raw, config=msg.config, version=msg.version)


@channel.handler("validate", ConfigValidate, concurrent=True)
async def validate(ctx: Context, msg: ConfigValidate) -> dict[str, Any]:
    """`{valid, errors}` for the given text; nothing is written."""
    if (msg.raw is None) == (msg.config is None):
        raise AetherError(
            ErrorCode.INVALID_MESSAGE, "give exactly one of 'raw' or 'config'", field="raw"
        )
    if msg.raw is not None:
        return await ctx.services.config.validate(msg.raw)
    assert msg.config is not None
    return await ctx.services.config.validate_object(msg.config)


@channel.on_startup
async def wire(daemon: Daemon) -> None:
    """Push `changed` to every connection whenever the file changes."""
    daemon.services.config.listen(lambda event: daemon.hub.broadcast(changed_frame(event)))
