"""A thin synchronous facade: `SyncClient` runs a `Client` on an event loop in a thread.

    with SyncClient(url, token) as client:
        client.files.write("/a.txt", "hi")
        for event in client.files.changes():
            ...

Attribute access is forwarded to the async client: a coroutine method becomes a
blocking call, an async iterator becomes a plain iterator, an API object (`files`,
`terminal`, a `Terminal`) is wrapped the same way. Nothing else is added.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from aetherd.client.core import Client

__all__ = ["SyncClient"]

_PLAIN = (str, bytes, int, float, bool, type(None), list, dict, tuple)


class _Proxy:
    """Forwards to `target`, running coroutines on `loop` and blocking for the result."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def _run(self, awaitable: Any) -> Any:
        return _wrap(asyncio.run_coroutine_threadsafe(awaitable, self._loop).result(), self._loop)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self._run(value(*args, **kwargs))
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: _wrap(self._call(value, *args, **kwargs), self._loop)
        return _wrap(value, self._loop)

    def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return func(*args, **kwargs)  # on the loop: streams are made there

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def __iter__(self) -> Iterator[Any]:
        iterator = self._target.__aiter__()
        while True:
            try:
                yield self._run(iterator.__anext__())
            except StopAsyncIteration:
                return

    def __repr__(self) -> str:
        return f"SyncProxy({self._target!r})"


def _wrap(value: Any, loop: asyncio.AbstractEventLoop) -> Any:
    if isinstance(value, _PLAIN) or not type(value).__module__.startswith("aetherd.client"):
        return value
    return _Proxy(value, loop)


class SyncClient(_Proxy):
    """A blocking `Client`; use as a context manager or call `close()`."""

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="aetherd-sync", daemon=True)
        self._thread.start()

        async def make() -> Client:
            client = Client(url, token, **options)
            await client.connect()
            return client

        try:
            client = asyncio.run_coroutine_threadsafe(make(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)
            loop.close()
            raise
        super().__init__(client, loop)

    def close(self) -> None:
        """Close the client and stop its thread."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._target.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
