"""The writer's choice among pull streams: queued frames, then urgent streams, then round-robin."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from aetherd.metrics import Metrics
from aetherd.transport.connection import Connection
from tests.conftest import TOKEN
from tests.support import RawWebSocket, wait_for


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


def test_busy_streams_sharing_a_paced_socket_get_smaller_frames(make_settings):
    conn = Connection(None, make_settings(), "c-test", Metrics())  # type: ignore[arg-type]
    one, two = FakeStream("one", 100), FakeStream("two", 0)
    for stream in (one, two):
        conn.add_stream(stream)
    for _ in range(6):  # one busy stream: full frames
        assert conn._next_frame() == "one"
        conn._acked = conn._streamed  # the client keeps up: the window never fills
    assert conn.bulk_frame_bytes is None
    two.left = 100  # a second one gets busy: both are asked for small frames
    for _ in range(6):
        assert conn._next_frame() in ("one", "two")
        conn._acked = conn._streamed
    assert conn.bulk_frame_bytes == 16 * 1024
    two.left = 0  # alone again: full frames after four rounds
    for _ in range(9):
        conn._next_frame()
        conn._acked = conn._streamed
    assert conn.bulk_frame_bytes is None
    unpaced = Connection(
        None,
        make_settings(stream_window_bytes=0),
        "c-test",
        Metrics(),  # type: ignore[arg-type]
    )
    for name in ("a", "b"):
        unpaced.add_stream(FakeStream(name, 100))
    for _ in range(6):
        unpaced._next_frame()
    assert unpaced.bulk_frame_bytes is None  # unpaced sockets keep full frames


async def test_two_floods_on_one_socket_come_in_small_frames(start_daemon, tmp_path):
    daemon = await start_daemon()
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    env = {"HOME": str(tmp_path)}
    reply = await client.request("terminal", "create", sessionId="a", command="exec yes", env=env)
    assert reply["success"] is True, reply

    async def sizes(count: int, sessions: set[str]) -> list[int]:
        seen: list[int] = []
        while len(seen) < count:
            msg = await client.ws.receive(timeout=20)
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            if frame.get("type") == "output" and frame.get("sessionId") in sessions:
                seen.append(len(frame["data"].encode()))
        return seen

    alone = await sizes(100, {"a"})
    assert max(alone) > 16 * 1024  # one flood: frames larger than the shared size
    reply = await client.request("terminal", "create", sessionId="b", command="exec yes", env=env)
    assert reply["success"] is True, reply
    shared = await sizes(300, {"a", "b"})
    # Two floods: small frames (a lone frame may be large if one program was not
    # scheduled for four rounds; unpaced or without the rule, nearly all are large).
    small = sum(size <= 16 * 1024 for size in shared[-200:])
    assert small >= 180, shared[-200:]


def _connection(daemon) -> Connection:
    [peer] = list(daemon.daemon.hub)
    assert isinstance(peer, Connection)
    return peer


async def _read_output(ws, sid: str, want: int, timeout: float = 20.0) -> tuple[int, int]:
    """Read `sid`'s output frames until `want` bytes arrived contiguously; (bytes, pings)."""
    got = 0
    pings = 0
    offset = None
    deadline = asyncio.get_running_loop().time() + timeout
    while got < want:
        msg = await ws.receive(timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
        if msg.type is aiohttp.WSMsgType.PING:
            pings += 1
            continue
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        if frame.get("type") == "output" and frame.get("sessionId") == sid:
            assert offset is None or frame["offset"] == offset, "gap in the output"
            offset = frame["offset"] + len(frame["data"].encode())
            got += len(frame["data"].encode())
    return got, pings


async def test_bulk_output_is_paced_by_pongs_and_an_echo_is_not(start_daemon, tmp_path):
    """A flood is sent at most a window ahead of the client's pongs (aiohttp's client
    answers pings as it reads), nothing is lost, and a keystroke's echo still comes."""
    daemon = await start_daemon(stream_window_bytes=64 * 1024)
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    env = {"HOME": str(tmp_path)}
    for sid, command in (("flood", "exec yes"), ("echo", "exec cat")):
        reply = await client.request("terminal", "create", sessionId=sid, command=command, env=env)
        assert reply["success"] is True, reply
    conn = _connection(daemon)
    start = conn._streamed
    await _read_output(client.ws, "flood", 2 * 1024 * 1024)
    assert conn.window_waits > 0  # the window filled and bulk output waited for pongs
    # At most one frame past the window: 64 KiB of `yes` output ("y\r\n") is up to
    # 65536 * 5 / 3 bytes of JSON ("y\\r\\n"), plus the envelope. Unpaced, megabytes
    # would be ahead (the kernel's socket buffers alone hold 4 MiB here).
    assert conn._streamed - conn._acked <= 64 * 1024 + 65536 * 5 // 3 + 256
    assert conn._streamed - start >= 2 * 1024 * 1024
    await client.send(
        {"channel": "terminal", "type": "input", "sessionId": "echo", "data": "ping-me\r"}
    )
    await client.expect(
        lambda f: f.get("sessionId") == "echo" and "ping-me" in f.get("data", ""), timeout=20
    )


async def test_a_client_that_never_pongs_is_unpaced(start_daemon, tmp_path, caplog):
    """Pings go unanswered (autoping off and no pong): after the window timeout the
    output flows again, unpaced."""
    caplog.set_level(logging.INFO, "aetherd.connection")
    daemon = await start_daemon(stream_window_bytes=64 * 1024, stream_window_timeout=0.5)
    client = await daemon.connect(autoping=False)
    await client.expect_type("terminal", "sessions")
    reply = await client.request(
        "terminal", "create", sessionId="flood", command="exec yes", env={"HOME": str(tmp_path)}
    )
    assert reply["success"] is True, reply
    got, pings = await _read_output(client.ws, "flood", 1024 * 1024)
    assert got >= 1024 * 1024 and pings >= 1
    assert _connection(daemon)._window == 0
    assert "output no longer paced" in caplog.text


def _dropped(daemon, reason: str) -> float:
    return daemon.daemon.services.metrics.connections_dropped.values.get((reason,), 0.0)


async def test_a_paced_client_that_stops_reading_is_dropped_alone(start_daemon, tmp_path):
    """Pacing on (the default): a client that answered window pings, then stops reading,
    is held by the window, never blocked in a write; after the write timeout it is
    dropped as a blocked write would drop it. Another client and the session go on."""
    daemon = await start_daemon(write_timeout=1.0, stream_window_timeout=600)
    assert daemon.settings.stream_window_bytes == 64 * 1024  # the default
    other = await daemon.connect()
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    env = {"HOME": str(tmp_path)}
    reply = await client.request(
        "terminal", "create", sessionId="flood", command="exec yes", env=env
    )
    assert reply["success"] is True, reply
    await _read_output(client.ws, "flood", 512 * 1024)  # aiohttp pongs as it reads
    (conn,) = [p for p in daemon.daemon.hub if p._streamed]
    assert conn._window_answered
    # The client stops reading: the window fills and the output is held, not written.
    await wait_for(lambda: conn._held_since is not None, timeout=10)
    assert conn._write_started is None
    await wait_for(lambda: conn.closed, timeout=15)
    await wait_for(lambda: len(daemon.daemon.hub) == 1, timeout=10)
    assert conn._window == 64 * 1024  # dropped while paced, not unpaced first
    assert _dropped(daemon, "write_timeout") == 1
    # The other client is unaffected, and the dropped client's session keeps running.
    assert (await other.request("activity", "user_activity"))["success"] is True
    listed = await other.request("terminal", "list")
    assert [s["sessionId"] for s in listed["data"]["sessions"]] == ["flood"], listed


async def test_a_client_that_never_answers_is_unpaced_then_dropped_by_the_write_timeout(
    start_daemon, tmp_path, caplog
):
    """A client that never answers a window ping (nor reads) is unpaced after the window
    timeout; its writes then block on the full socket, and the write timeout drops it."""
    caplog.set_level(logging.INFO, "aetherd.connection")
    daemon = await start_daemon(write_timeout=1.0, stream_window_timeout=0.5)
    other = await daemon.connect()
    stalled = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        await wait_for(lambda: len(daemon.daemon.hub) == 2)
        stalled.send_text(
            json.dumps(
                {
                    "channel": "terminal",
                    "type": "create",
                    "sessionId": "flood",
                    "command": "exec yes",
                    "env": {"HOME": str(tmp_path)},
                }
            )
        )
        await wait_for(lambda: len(daemon.daemon.hub) == 1, timeout=20)
    finally:
        stalled.close()
    assert "output no longer paced" in caplog.text
    assert "client stopped reading; dropping it" in caplog.text
    assert _dropped(daemon, "write_timeout") == 1
    assert (await other.request("activity", "user_activity"))["success"] is True
