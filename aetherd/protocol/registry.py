"""The registry: `(channel, type)` → handler + pydantic model, plus per-channel hooks.

A channel module declares itself once:

    channel = Channel("terminal", pushes=(TerminalOutput, TerminalClose))

    @channel.handler("create", TerminalCreate, reply=TerminalSession)
    async def create(ctx: Context, msg: TerminalCreate) -> TerminalSession: ...

    @channel.on_connect          # pushed to each new connection, in channel order
    async def push_sessions(ctx: Context) -> None: ...

    @channel.on_startup          # wiring once per daemon (service events → hub)
    async def wire(daemon: Daemon) -> None: ...

and is listed in `aetherd.channels.CHANNELS`. Nothing else is needed to add a channel.
A channel an idle daemon need not load is listed as `LazyChannel(name, module)`: its
module (and what that imports: the agent runner, the git service) is imported at the
first frame on it, the first schema build, or, with `connect=True`, the first
connection (whose hooks it has). A lazy channel has no `on_startup` hooks.

The models themselves live in `aetherd.protocol.<channel>`: `Message` subclasses for
what the client sends, `Frame` subclasses for what the daemon pushes, `Model`
subclasses for reply data. `reply=` is the type of a handler's result (a model, a
list of models, or None for a bare acknowledgement); the dispatcher serialises the
result through it, so a handler cannot send a shape its declaration does not name.
`errors=` lists the codes a handler may answer with, for the generated schema.

A handler whose answer comes much later, but whose first steps must happen in frame
order (a `process/start` with `wait: true` must have spawned the process before the
next frame, an `input` to it, is handled), returns `Deferred(awaitable)`: the
dispatcher then awaits the rest in its own task, bounded like concurrent handlers, and
replies with its result.

A handler on a hot path may return `Wire(data)`: its reply data already in wire form
(plain dicts, lists, str, int, bool, None, keys camelCase, in the model's field order),
encoded with orjson without building and serialising the reply model (a 4 KiB `read`:
about 1 µs instead of 15 µs). The bytes must equal what the declared model gives: a
test holds each such handler to that, and with `AETHERD_CHECK_WIRE=1` (or
`CHECK_WIRE` set, as tests/conftest.py does for the daemons the suite runs in its own
process) every `Wire` reply is checked against its model as it is sent.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter

from aetherd.errors import ErrorCode
from aetherd.protocol.models import Empty, Frame, Message

if TYPE_CHECKING:
    from aetherd.daemon import Daemon
    from aetherd.protocol.context import Context

__all__ = [
    "Channel",
    "Deferred",
    "Empty",
    "Handler",
    "LazyChannel",
    "Message",
    "Registry",
    "Wire",
]

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
ModelType = type[BaseModel]  # named here: `Handler.type` shadows the builtin in its body
HandlerFunc = Callable[["Context", Any], Awaitable[Any]]
ConnectHook = Callable[["Context"], Awaitable[None]]
StartupHook = Callable[["Daemon"], Awaitable[None]]


class Deferred:
    """A handler's result that is not ready yet: the reply is `await awaitable`.

    The dispatcher awaits it in a task of its own (counted against the connection's
    `max_inflight_requests`, cancelled when the socket closes), so the frames behind
    the request are handled meanwhile, after the handler's own first steps.
    """

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


class Wire(Generic[R]):
    """A reply's data in wire form, encoded with orjson as it is (see the module doc).

    Annotated with the reply model it stands for: `-> Wire[FileContent]`.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


# Tests set this (tests/conftest.py), so that every Wire reply is compared with its model.
CHECK_WIRE = os.environ.get("AETHERD_CHECK_WIRE") == "1"


def _deferred_adapter(reply: Any) -> TypeAdapter[Any]:
    """The adapter of a reply type, built on first use as the models are (`defer_build`):
    an idle daemon never pays for the schemas of replies it has not sent."""
    if isinstance(reply, type) and issubclass(reply, BaseModel):
        return TypeAdapter(reply)  # defers by the model's own config
    return TypeAdapter(reply, config=ConfigDict(defer_build=True))


@dataclass(frozen=True)
class Handler:
    """One registered `(channel, type)`."""

    channel: str
    type: str
    model: ModelType
    func: HandlerFunc
    concurrent: bool = False
    reply: Any = None
    errors: tuple[ErrorCode, ...] = ()
    adapter: TypeAdapter[Any] | None = None
    key: tuple[str] = field(init=False, repr=False, compare=False)  # metrics' labels

    def __post_init__(self) -> None:
        # The request metrics' label values, `(channel,)`, built once, not per request.
        object.__setattr__(self, "key", (self.channel,))

    def encode_data(self, data: Any) -> str:
        """A handler's result as JSON, checked against its declared `reply` type.

        Raises `pydantic.PydanticSerializationError` when the result does not match, and
        TypeError when a handler that declares no reply returns something.
        """
        if isinstance(data, Wire) and self.adapter is not None:
            encoded = orjson.dumps(data.value)
            if CHECK_WIRE:
                declared = self.adapter.dump_json(
                    self.adapter.validate_python(data.value), warnings="error"
                )
                if declared != encoded:
                    raise TypeError(
                        f"{self.channel}/{self.type}: Wire data {encoded[:200]!r} differs "
                        f"from its reply model's {declared[:200]!r}"
                    )
            return encoded.decode("utf-8")
        if self.adapter is None:
            if data is None:
                return "null"
            raise TypeError(
                f"{self.channel}/{self.type} returned {type(data).__name__} "
                "but declares no reply type"
            )
        return self.adapter.dump_json(data, warnings="error").decode("utf-8")


@dataclass
class Channel:
    """A channel's handlers and hooks. `require_request_id` enforces `requestId` on every frame."""

    name: str
    require_request_id: bool = False
    pushes: tuple[type[Frame], ...] = ()
    handlers: dict[str, Handler] = field(default_factory=dict)
    connect_hooks: list[ConnectHook] = field(default_factory=list)
    startup_hooks: list[StartupHook] = field(default_factory=list)

    def __post_init__(self) -> None:
        for frame in self.pushes:
            if frame.CHANNEL != self.name:
                raise ValueError(f"{frame.__name__} is not a frame of channel {self.name!r}")

    def handler(
        self,
        type_: str,
        model: type[M],
        *,
        reply: Any = None,
        errors: tuple[ErrorCode, ...] = (),
        concurrent: bool = False,
    ) -> Callable[[Callable[[Context, M], Awaitable[Any]]], Callable[[Context, M], Awaitable[Any]]]:
        """Register `func(ctx, msg)` for frames of `type_`, validated by `model`.

        `reply` is the type of the result (`data` of the success reply); None means the
        handler returns None and the reply carries `data: null`.

        `concurrent=True` runs the handler in its own task (bounded per connection), so a
        slow request does not hold up the frames behind it; replies may then arrive out
        of order, which the protocol allows.
        """

        def register(
            func: Callable[[Context, M], Awaitable[Any]],
        ) -> Callable[[Context, M], Awaitable[Any]]:
            if type_ in self.handlers:
                raise ValueError(f"{self.name}/{type_} is registered twice")
            returns = getattr(func, "__annotations__", {}).get("return", None)
            if reply is None and returns not in (None, "None"):
                raise ValueError(
                    f"{self.name}/{type_} returns {returns} but declares no reply= type"
                )
            adapter = _deferred_adapter(reply) if reply is not None else None
            self.handlers[type_] = Handler(
                self.name, type_, model, func, concurrent, reply, tuple(errors), adapter
            )
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


class LazyChannel(Channel):
    """A channel whose module `module` (holding `channel = Channel(name, ...)`) is
    imported on first use, then takes that channel's state: from then on it is that
    channel, attribute for attribute, at the same cost per frame.

    Before the import it answers only `name`, `startup_hooks` (none: a lazy channel
    cannot have any) and, unless `connect` is true, `connect_hooks` (none). Any other
    attribute (`handlers`, `pushes`, `require_request_id`...) imports the module.
    """

    def __init__(self, name: str, module: str, *, connect: bool = False) -> None:
        # Channel's own __init__ is not called: its fields come from the module.
        self.name = name
        self.module = module
        self.connect = connect
        self.startup_hooks = []
        if not connect:
            self.connect_hooks = []

    @property
    def loaded(self) -> bool:
        """True once the module is imported."""
        return "handlers" in self.__dict__

    def load(self) -> None:
        """Import the module and take its channel's state (once)."""
        if self.loaded:
            return
        real = importlib.import_module(self.module).channel
        if not isinstance(real, Channel) or real.name != self.name:
            raise ValueError(f"{self.module}.channel is not the channel {self.name!r}")
        if real.startup_hooks:
            raise ValueError(f"lazy channel {self.name!r} cannot have on_startup hooks")
        if real.connect_hooks and not self.connect:
            raise ValueError(f"lazy channel {self.name!r} has connect hooks: declare connect=True")
        self.__dict__.update(real.__dict__)

    def __getattr__(self, attr: str) -> Any:
        # Only for attributes not set yet: the channel's fields before the import.
        if attr.startswith("__") or attr in ("module", "connect"):
            raise AttributeError(attr)
        self.load()
        return object.__getattribute__(self, attr)


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
