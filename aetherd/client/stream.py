"""Bounded push streams, consumed as async iterators.

The client's reader task must never block (it also delivers replies), so a stream
never makes it wait: `feed()` returns False when the queue is full and the owner
decides what that means (a terminal detaches and resumes later from its offset, so
nothing is lost; a file-change stream drops the oldest event and reports a resync).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from aetherd.client.errors import AetherdError

__all__ = ["Stream", "Subscribers"]

T = TypeVar("T")


class Stream(Generic[T]):
    """A bounded queue read with `async for`; ended by `finish()` or `fail(error)`."""

    def __init__(
        self,
        limit: int,
        on_drain: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: AetherdError | None = None
        self._on_drain = on_drain
        self._on_close = on_close
        self.dropped = 0

    @property
    def ended(self) -> bool:
        """True once `finish` or `fail` was called (items may still be queued)."""
        return self._ended

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def feed(self, item: T) -> bool:
        """Queue `item`; False (and nothing queued) when the stream is full or ended."""
        if self._ended or len(self._items) >= self.limit:
            return False
        self._items.append(item)
        self._wake()
        return True

    def feed_dropping_oldest(self, item: T) -> bool:
        """Queue `item`, dropping the oldest when full; True when something was dropped."""
        if self._ended:
            return False
        dropped = len(self._items) >= self.limit
        if dropped:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._wake()
        return dropped

    def finish(self) -> None:
        """End the stream once its queued items are read."""
        self._ended = True
        self._wake()

    def fail(self, error: AetherdError) -> None:
        """End the stream; iterating raises `error` after the queued items."""
        if not self._ended:
            self._error = error
        self.finish()

    def close(self) -> None:
        """The consumer is done: drop what is queued and tell the owner."""
        self._items.clear()
        was_ended = self._ended
        self.finish()
        if not was_ended and self._on_close is not None:
            self._on_close()

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if self._on_drain is not None and len(self._items) <= self.limit // 2:
            self._on_drain()
        return item

    async def get(self, timeout: float | None = None) -> T:
        """The next item, within `timeout` seconds (`TIMEOUT` beyond it)."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except asyncio.TimeoutError:
            raise AetherdError("TIMEOUT", f"no item within {timeout}s") from None


class Subscribers(Generic[T]):
    """The streams of one kind of pushed event, one per subscriber.

    Each stream is bounded and drops its oldest item when full (a subscriber that
    reads slowly loses old events, never holds the reader task); a stream leaves the
    set when its consumer closes it, and all end together with the connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streams: list[Stream[T]] = []

    def add(self) -> Stream[T]:
        """A new subscriber's stream: every item fed from now on."""
        stream: Stream[T] = Stream(self.limit)
        stream._on_close = lambda: self._streams.remove(stream) if stream in self._streams else None
        self._streams.append(stream)
        return stream

    def __len__(self) -> int:
        return len(self._streams)

    def feed(self, item: T, overflow: Callable[[], T] | None = None) -> None:
        """Give `item` to every subscriber; where that dropped an old item, `overflow()`
        too (for example a "resync" that tells the subscriber it missed something)."""
        for stream in self._streams:
            if stream.feed_dropping_oldest(item) and overflow is not None:
                stream.feed_dropping_oldest(overflow())

    def end(self, error: AetherdError | None) -> None:
        """End every stream: finished, or failed with `error`."""
        for stream in self._streams:
            if error is None:
                stream.finish()
            else:
                stream.fail(error)
        self._streams.clear()
