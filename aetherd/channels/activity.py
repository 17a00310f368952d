"""The activity channel (PROTOCOL.md section 7): `user_activity` marks the user active."""

from __future__ import annotations

from aetherd.protocol import Channel, Context
from aetherd.protocol.activity import UserActivity

channel = Channel("activity")


@channel.handler("user_activity", UserActivity, reply=None)
async def user_activity(ctx: Context, msg: UserActivity) -> None:
    """Mark the user active. No reply unless the frame carried a requestId."""
    ctx.services.activity.touch()
