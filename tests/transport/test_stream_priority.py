"""The writer's choice among pull streams: queued frames, then urgent streams, then round-robin."""

from __future__ import annotations

from aetherd.metrics import Metrics
from aetherd.transport.connection import Connection


class FakeStream:
    """A pull stream with scripted frames; `urgent` when told so."""

    def __init__(self, name: str, frames: int, urgent: bool | None = None) -> None:
        self.name = name
        self.left = frames
        if urgent is not None:
            self.urgent = lambda: urgent and self.left > 0

    def pull(self) -> str | None:
        if self.left == 0:
            return None
        self.left -= 1
        return self.name


def test_urgent_streams_go_before_the_round_robin(make_settings):
    conn = Connection(None, make_settings(), "c-test", Metrics())  # type: ignore[arg-type]
    bulk = [FakeStream(f"bulk{i}", 3, urgent=False) for i in range(3)]
    plain = FakeStream("plain", 3)
    echo = FakeStream("echo", 0, urgent=True)
    for stream in [*bulk, plain, echo]:
        conn.add_stream(stream)
    order = [conn._next_frame() for _ in range(3)]
    assert order == ["bulk0", "bulk1", "bulk2"]
    echo.left = 2  # a keystroke's echo arrives while the bulk streams are busy
    conn.send("queued")
    assert [conn._next_frame() for _ in range(4)] == ["queued", "echo", "echo", "plain"]
    rest = [conn._next_frame() for _ in range(9)]
    assert sorted(f for f in rest if f) == sorted(["bulk0", "bulk1", "bulk2"] * 2 + ["plain"] * 2)
    assert conn._next_frame() is None
