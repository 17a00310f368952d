"""The activity channel's frames (docs/protocol.md section 7).

Client → server: `user_activity`, which marks the user active. There is no reply
unless the frame carries a `requestId` (then `data: null`), and nothing is pushed.
"""

from __future__ import annotations

from aetherd.protocol.models import Message

__all__ = ["UserActivity"]


class UserActivity(Message):
    """`user_activity`: the user did something (typed, clicked); no fields."""
