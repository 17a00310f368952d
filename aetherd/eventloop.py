"""The daemon's event loop: asyncio's own by default, uvloop when asked for.

`settings.event_loop` (`--event-loop`, `AETHERD_EVENT_LOOP`) chooses: `asyncio` (the
default) runs the standard library's loop, `uvloop` insists on uvloop (a settings error
without it), `auto` takes uvloop if it can be imported. Both loops are supported: the
terminal suite runs on each (tests/conftest.py). asyncio's stays the default because
uvloop measured no faster on the terminal benchmark here, and because libuv handles
EMFILE on accept() by itself (it accepts and closes), so the connection guard's
accept-error count and log (aetherd/transport/guard.py) see nothing under uvloop:
docs/performance.md ("Terminal").
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aetherd.errors import SettingsError

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> tuple[LoopFactory, str]:
    """The factory of the loop `choice` asks for, and the name of the loop it makes."""
    if choice not in ("auto", "uvloop", "asyncio"):
        raise SettingsError(f"event_loop: unknown loop {choice!r} (auto, uvloop or asyncio)")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SettingsError(
                    "event_loop: uvloop is not installed (pip install uvloop, or choose asyncio)"
                ) from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: which implementation `loop` is."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the loop `choice` asks for."""
    try:
        factory, _ = loop_factory(choice)
    except BaseException:
        main.close()
        raise
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:  # novermin (3.11 branch)
            return runner.run(main)
    # Python 3.10 has no Runner: asyncio.run with a policy that makes our loop.
    policy = asyncio.get_event_loop_policy()

    class _Policy(type(policy)):  # type: ignore[misc]  # the running policy's own class
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return factory()

    asyncio.set_event_loop_policy(_Policy())
    try:
        return asyncio.run(main)
    finally:
        asyncio.set_event_loop_policy(policy)
