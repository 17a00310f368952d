"""What a followed stream shares, a terminal session's or a process's output.

Both are bounded `Stream`s that stay continuous across reconnects: when the reader
falls behind, the follower detaches and, once the queue has drained, attaches again
from its own offsets (`attach`, which each kind implements); when the consumer closes
the stream, the follower detaches and the daemon-side session or process runs on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from aetherd.client.errors import AetherdError
from aetherd.client.stream import Stream

if TYPE_CHECKING:
    from aetherd.client.core import Client

__all__ = ["Follower"]

T = TypeVar("T")


class _API(Protocol):
    client: Client

    def forget(self, follower: Any) -> None: ...


class Follower(Generic[T]):
    """Pause, resume, detach and end of one followed stream of `T` items.

    A subclass names its `channel` and the frame field of its id (`id_field`), gives
    its id as `follow_id`, and implements `attach(internal=...)` to attach from where
    its output stands.
    """

    channel: ClassVar[str]
    id_field: ClassVar[str]

    def __init__(self, api: _API) -> None:
        self._api = api
        self._client = api.client
        self.lost: AetherdError | None = None  # why the stream ended without an exit
        self.output: Stream[T] = Stream(
            self._client.options.stream_limit, on_drain=self._drained, on_close=self._closed
        )
        self._paused = False
        self._attaching: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def follow_id(self) -> str:
        raise NotImplementedError

    async def attach(self, *, internal: bool = False) -> Any:
        raise NotImplementedError

    def _finish(self, error: AetherdError | None = None) -> None:
        """End the stream: with its exit (no error), or with why it was lost."""
        self._api.forget(self)
        if error is not None:
            self.lost = error
            self.output.fail(error)
        else:
            self.output.finish()
        if not self._exited.done():
            self._exited.set_result(None)

    def _send_detach(self) -> None:
        if self._client.connected:
            self._client.spawn(
                self._client.send(
                    self.channel, "detach", {self.id_field: self.follow_id}, internal=True
                )
            )

    def _pause(self) -> None:
        """The consumer is behind: stop the stream, resume from the offset later."""
        self._paused = True
        self._send_detach()

    def _drained(self) -> None:
        if self._paused and self._client.connected and self._attaching is None:
            self._attaching = asyncio.ensure_future(self._resume())

    async def _resume(self) -> None:
        try:
            await self.attach(internal=True)
        except AetherdError as err:
            if err.code != "CONNECTION_LOST":
                self._finish(err)
        finally:
            self._attaching = None

    def _closed(self) -> None:
        """The consumer closed the output stream: detach (the daemon's side runs on)."""
        self._api.forget(self)
        self._send_detach()
