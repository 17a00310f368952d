"""The activity channel (PROTOCOL.md section 7): `user_activity` marks the user active."""

from __future__ import annotations

from aetherd.protocol import Channel, Context, Empty

channel = Channel("activity")


@channel.handler("user_activity", Empty)
async def user_activity(ctx: Context, msg: Empty) -> None:
    """Mark the user active. No reply unless the frame carried a requestId."""
    ctx.services.activity.touch()
