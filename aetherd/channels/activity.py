"""The activity channel (docs/protocol.md section 7): `user_activity` marks the user
active; `subscribe_resources` / `unsubscribe_resources` start and stop this socket's
`resources` pushes.

The pushes come from the resource monitor's one shared timer (`services.resources`),
which runs only while some socket is subscribed. A socket's subscription lives in its
`Slot`, so closing the socket removes it: no timer or callback outlives its sockets.
"""

from __future__ import annotations

from collections.abc import Callable

from aetherd.protocol import Channel, Context, encode
from aetherd.protocol.activity import (
    PUSHES,
    CpuFigures,
    DiskFigures,
    MemoryFigures,
    ResourceFigures,
    ResourcesFrame,
    SubscribeResources,
    UnsubscribeResources,
    UserActivity,
)
from aetherd.protocol.context import Slot
from aetherd.services.resources import Resources

channel = Channel("activity", pushes=PUSHES)

FRAME_KEY = "activity.frame"  # where a reading keeps its encoded frame


def figures(now: Resources) -> ResourceFigures:
    """A reading as the wire object (`resources` of `/info`, body of the push)."""
    return ResourceFigures(
        cpu=CpuFigures(
            used_percent=now.cpu_used_percent,
            used_cores=now.cpu_used_cores,
            limit_cores=now.cpu_limit_cores,
        ),
        memory=MemoryFigures(used=now.memory_used, limit=now.memory_limit),
        disk=DiskFigures(used=now.disk_used, total=now.disk_total),
        source="cgroup" if now.source == "cgroup" else "psutil",
    )


def frame_text(now: Resources) -> str:
    """The `resources` frame of a reading, encoded once for every subscriber."""
    text = now.cache.get(FRAME_KEY)
    if text is None:
        body = figures(now)
        text = now.cache[FRAME_KEY] = encode(
            ResourcesFrame(cpu=body.cpu, memory=body.memory, disk=body.disk, source=body.source)
        )
    return str(text)


class ResourceSubscription:
    """A socket's subscription to the resource timer; closed with the socket."""

    __slots__ = ("remove",)

    def __init__(self) -> None:
        self.remove: Callable[[], None] | None = None

    def close(self) -> None:
        """Leave the timer (the last subscriber to leave stops it)."""
        remove, self.remove = self.remove, None
        if remove is not None:
            remove()


SUBSCRIPTION: Slot[ResourceSubscription] = Slot("activity.resources", ResourceSubscription)


@channel.handler("user_activity", UserActivity, reply=None)
async def user_activity(ctx: Context, msg: UserActivity) -> None:
    """Mark the user active. No reply unless the frame carried a requestId."""
    ctx.services.activity.touch()


@channel.handler("subscribe_resources", SubscribeResources, reply=None)
async def subscribe_resources(ctx: Context, msg: SubscribeResources) -> None:
    """Push `resources` now, then every `resources_interval` seconds."""
    monitor = ctx.services.resources
    now = await monitor.read()
    peer = ctx.peer
    if peer.closed:  # gone while reading: its slots are closed already
        return
    peer.send(frame_text(now))
    subscription = peer.slot(SUBSCRIPTION)
    if subscription.remove is None:
        subscription.remove = monitor.subscribe(lambda reading: peer.send(frame_text(reading)))


@channel.handler("unsubscribe_resources", UnsubscribeResources, reply=None)
async def unsubscribe_resources(ctx: Context, msg: UnsubscribeResources) -> None:
    """Stop this socket's `resources` pushes (a socket not subscribed: nothing to do)."""
    ctx.peer.slot(SUBSCRIPTION).close()
