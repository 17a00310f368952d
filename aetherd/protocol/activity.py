"""The activity channel's frames (docs/protocol.md section 7).

Client → server: `user_activity`, which marks the user active (no reply unless the
frame carries a `requestId`, then `data: null`); `subscribe_resources` and
`unsubscribe_resources`, which start and stop this socket's `resources` pushes.

Server → client: `resources`, the workspace's CPU, memory and disk figures, pushed at
once on `subscribe_resources` and then every `resources_interval` seconds. The same
object (`ResourceFigures`) is the `resources` field of `GET /workspaces/{id}/info`.
"""

from __future__ import annotations

from typing import Literal

from aetherd.protocol.models import Frame, Message, Model

__all__ = [
    "CpuFigures",
    "DiskFigures",
    "MemoryFigures",
    "ResourceFigures",
    "ResourcesFrame",
    "SubscribeResources",
    "UnsubscribeResources",
    "UserActivity",
]


class UserActivity(Message):
    """`user_activity`: the user did something (typed, clicked); no fields."""


class SubscribeResources(Message):
    """`subscribe_resources`: push `resources` to this socket now and every interval."""


class UnsubscribeResources(Message):
    """`unsubscribe_resources`: stop this socket's `resources` pushes."""


class CpuFigures(Model):
    """CPU over the interval since the previous reading."""

    used_percent: float  # of the limit, 0 to 100
    used_cores: float  # 0.5 = half of one core busy
    limit_cores: float  # the cgroup's cpu.max quota, or the CPUs available


class MemoryFigures(Model):
    """Bytes of memory used now and the most the workspace may use."""

    used: int
    limit: int


class DiskFigures(Model):
    """Bytes used and total of the file system holding the workspace root."""

    used: int
    total: int


class ResourceFigures(Model):
    """One reading of the workspace's resources."""

    cpu: CpuFigures
    memory: MemoryFigures
    disk: DiskFigures
    source: Literal["cgroup", "psutil"]


class ResourcesFrame(Frame):
    """`resources`: pushed to sockets that sent `subscribe_resources`."""

    channel: Literal["activity"] = "activity"
    type: Literal["resources"] = "resources"
    cpu: CpuFigures
    memory: MemoryFigures
    disk: DiskFigures
    source: Literal["cgroup", "psutil"]


PUSHES: tuple[type[Frame], ...] = (ResourcesFrame,)
