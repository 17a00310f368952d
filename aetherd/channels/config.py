"""The config channel (PROTOCOL.md section 6): get, set, validate; `changed` is pushed.

Every frame needs a requestId. The logic lives in `aetherd.services.config.ConfigStore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Context, Empty
from aetherd.protocol.config import (
    ConfigChanged,
    ConfigError,
    ConfigSet,
    ConfigSnapshot,
    ConfigValidate,
    ConfigValidation,
)
from aetherd.services.config import ConfigEvent

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("config", require_request_id=True, pushes=(ConfigChanged,))


def changed_frame(event: ConfigEvent) -> ConfigChanged:
    """The `changed` push for one config event."""
    return ConfigChanged(
        config=event.config,
        version=event.version,
        valid=event.valid,
        errors=[ConfigError.model_validate(error) for error in event.errors],
        source=event.source,
        path=event.path,
    )


@channel.handler("get", Empty, reply=ConfigSnapshot)
async def get(ctx: Context, msg: Empty) -> ConfigSnapshot:
    """The effective config, the file's text, its version and validity."""
    return ConfigSnapshot.model_validate(ctx.services.config.snapshot())


@channel.handler(
    "set",
    ConfigSet,
    reply=ConfigSnapshot,
    errors=(
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.INVALID_CONFIG,
        ErrorCode.CONFLICT,
        ErrorCode.FILE_TOO_LARGE,
        ErrorCode.INVALID_PATH,
        ErrorCode.IS_DIRECTORY,
        ErrorCode.NOT_DIRECTORY,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.NO_SPACE,
    ),
    concurrent=True,
)
async def set_(ctx: Context, msg: ConfigSet) -> ConfigSnapshot:
    """Validate and write the config atomically; CONFLICT on a stale version."""
    snapshot = await ctx.services.config.set(raw=msg.raw, config=msg.config, version=msg.version)
    return ConfigSnapshot.model_validate(snapshot)


@channel.handler(
    "validate",
    ConfigValidate,
    reply=ConfigValidation,
    errors=(ErrorCode.INVALID_MESSAGE,),
    concurrent=True,
)
async def validate(ctx: Context, msg: ConfigValidate) -> ConfigValidation:
    """`{valid, errors}` for the given text; nothing is written."""
    if (msg.raw is None) == (msg.config is None):
        raise AetherError(
            ErrorCode.INVALID_MESSAGE, "give exactly one of 'raw' or 'config'", field="raw"
        )
    if msg.raw is not None:
        result = await ctx.services.config.validate(msg.raw)
    else:
        assert msg.config is not None
        result = await ctx.services.config.validate_object(msg.config)
    return ConfigValidation.model_validate(result)


@channel.on_startup
async def wire(daemon: Daemon) -> None:
    """Push `changed` to every connection whenever the file changes."""
    daemon.services.config.listen(lambda event: daemon.hub.broadcast(changed_frame(event)))
