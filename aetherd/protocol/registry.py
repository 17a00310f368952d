"""The registry: `(channel, type)` → handler + pydantic model, plus per-channel hooks.

A channel module declares itself once:

    channel = Channel("terminal")

    @channel.handler("resize", TerminalResize)
    async def resize(ctx: Context, msg: TerminalResize) -> None: ...

    @channel.on_connect          # pushed to each new connection, in channel order
    async def push_sessions(ctx: Context) -> None: ...

    @channel.on_startup          # wiring once per daemon (service events → hub)
    async def wire(daemon: Daemon) -> None: ...

and is listed in `aetherd.channels.CHANNELS`. Nothing else is needed to add a channel.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from aetherd.daemon import Daemon
    from aetherd.protocol.context import Context

M = TypeVar("M", bound=BaseModel)
HandlerFunc = Callable[["Context", Any], Awaitable[Any]]
ConnectHook = Callable[["Context"], Awaitable[None]]
StartupHook = Callable[["Daemon"], Awaitable[None]]


class Message(BaseModel):
    """Base of every client frame model: camelCase on the wire, unknown fields ignored."""

    model_config = ConfigDict(
        extra="ignore",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


class Empty(Message):
    """A frame with no fields beyond the envelope."""


@dataclass(frozen=True)
class Handler:
    """One registered `(channel, type)`."""

    channel: str
    type: str
    model: type[BaseModel]
    func: HandlerFunc
    concurrent: bool = False


@dataclass
class Channel:
    """A channel's handlers and hooks. `require_request_id` enforces `requestId` on every frame."""

    name: str
    require_request_id: bool = False
    handlers: dict[str, Handler] = field(default_factory=dict)
    connect_hooks: list[ConnectHook] = field(default_factory=list)
    startup_hooks: list[StartupHook] = field(default_factory=list)

    def handler(
        self, type_: str, model: type[M], *, concurrent: bool = False
    ) -> Callable[[Callable[[Context, M], Awaitable[Any]]], Callable[[Context, M], Awaitable[Any]]]:
        """Register `func(ctx, msg)` for frames of `type_`, validated by `model`.

        `concurrent=True` runs the handler in its own task (bounded per connection), so a
        slow request does not hold up the frames behind it; replies may then arrive out
        of order, which the protocol allows.
        """

        def register(
            func: Callable[[Context, M], Awaitable[Any]],
        ) -> Callable[[Context, M], Awaitable[Any]]:
            if type_ in self.handlers:
                raise ValueError(f"{self.name}/{type_} is registered twice")
            self.handlers[type_] = Handler(self.name, type_, model, func, concurrent)
            return func

        return register

    def on_connect(self, func: ConnectHook) -> ConnectHook:
        """Run `func(ctx)` for every new connection, after the upgrade."""
        self.connect_hooks.append(func)
        return func

    def on_startup(self, func: StartupHook) -> StartupHook:
        """Run `func(daemon)` once, after the services have started."""
        self.startup_hooks.append(func)
        return func


class Registry:
    """All channels of the daemon, in the order their connect hooks run."""

    def __init__(self, channels: Iterable[Channel]) -> None:
        self.channels: dict[str, Channel] = {}
        for channel in channels:
            if channel.name in self.channels:
                raise ValueError(f"channel {channel.name!r} is registered twice")
            self.channels[channel.name] = channel

    def channel(self, name: str) -> Channel | None:
        """The channel called `name`, if any."""
        return self.channels.get(name)
