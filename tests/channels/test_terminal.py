"""The terminal channel end to end: real PTYs, a real daemon on loopback, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.conftest import TOKEN
from tests.support import RawWebSocket, WsClient, wait_for

# The whole terminal suite runs on asyncio's loop and on uvloop (tests/conftest.py).
pytestmark = pytest.mark.event_loops


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty HOME, so bash does not run a slow ~/.bashrc."""
    path = tmp_path / "home"
    path.mkdir()
    return path


class Term:
    """One client's view of one session: output reassembled and checked for gaps."""

    def __init__(self, client: WsClient, sid: str) -> None:
        self.client = client
        self.sid = sid
        self.raw = b""
        self.start: int | None = None
        self.frames: list[dict[str, Any]] = []

    @property
    def text(self) -> str:
        """Everything seen so far."""
        return self.raw.decode("utf-8")

    @property
    def end(self) -> int:
        """The byte offset just past the last output seen."""
        return (self.start or 0) + len(self.raw)

    def _take(self, frame: dict[str, Any]) -> None:
        data = frame["data"]
        assert "\ufffd" not in data, "a character was split or mangled"
        if self.start is None:
            self.start = frame["offset"]
        else:
            assert frame["offset"] == self.end, "gap or duplicate in the output stream"
        self.frames.append(frame)
        self.raw += data.encode("utf-8")

    def _is_mine(self, frame: dict[str, Any]) -> bool:
        return (
            frame.get("channel") == "terminal"
            and frame.get("sessionId") == self.sid
            and frame.get("type") in ("output", "close")
        )

    async def until(self, marker: str, timeout: float = 10.0) -> str:
        """Read output until `marker` appears; returns all text so far."""
        while marker not in self.text:
            try:
                frame = await self.client.expect(self._is_mine, timeout)
            except TimeoutError:
                raise AssertionError(f"no {marker!r} in {self.text[-300:]!r}") from None
            if frame["type"] == "close":
                raise AssertionError(f"session closed before {marker!r}: {self.text[-500:]!r}")
            self._take(frame)
        return self.text

    async def until_close(self, timeout: float = 10.0) -> dict[str, Any]:
        """Read output until the `close` frame, and return it."""
        while True:
            frame = await self.client.expect(self._is_mine, timeout)
            if frame["type"] == "close":
                return frame
            self._take(frame)

    async def run(self, line: str, timeout: float = 10.0) -> str:
        """Type `line` and wait for a fresh marker printed after it; returns the text between."""
        marker = uuid.uuid4().hex[:12]
        before = len(self.text)
        # Split in the command line, so the echoed input never matches the printed marker.
        await self.send(f"{line}; echo __''{marker}\r")
        await self.until(f"__{marker}", timeout)
        return self.text[before:]

    async def send(self, data: str) -> None:
        """Send input (no requestId)."""
        await self.client.send(
            {"channel": "terminal", "type": "input", "sessionId": self.sid, "data": data}
        )


async def open_term(client: WsClient, sid: str, home: Path, **fields: Any) -> tuple[Term, dict]:
    """Create (or attach to) `sid` with an empty HOME and return the view and the reply."""
    env = {"HOME": str(home), **fields.pop("env", {})}
    reply = await client.request("terminal", "create", sessionId=sid, env=env, **fields)
    assert reply["success"] is True, reply
    return Term(client, sid), reply["data"]


def manager(running):
    """The daemon's terminal manager (the server runs in this process)."""
    return running.daemon.services.terminals


async def test_connect_pushes_sessions_first(daemon, home):
    client = await daemon.connect()
    first = await client.expect(lambda f: True)
    assert first == {"channel": "terminal", "type": "sessions", "sessions": []}
    await open_term(client, "s1", home)
    other = await daemon.connect()
    pushed = await other.expect_type("terminal", "sessions")
    [info] = pushed["sessions"]
    assert info["sessionId"] == "s1"
    assert info["command"] == "bash"
    assert info["cwd"] == "/"
    assert (info["cols"], info["rows"]) == (80, 24)
    assert info["clients"] == 1
    assert info["exited"] is False
    assert psutil.Process(info["pid"]).is_running()
    assert info["createdAt"].endswith("Z")


async def test_defaults_echo_and_exit_code(daemon, home, workspace):
    client = await daemon.connect()
    term, data = await open_term(client, "main", home)
    assert data["attached"] is False
    assert data["sessionId"] == "main"
    out = await term.run("echo T=$TERM; stty size; pwd")
    assert "T=xterm-256color" in out
    assert "24 80" in out
    assert f"\n{workspace}\r" in out
    await term.send("exit 7\r")
    close = await term.until_close()
    assert close == {
        "channel": "terminal",
        "type": "close",
        "sessionId": "main",
        "exitCode": 7,
        "signal": None,
    }
    assert term.start == 0
    await wait_for(lambda: manager(daemon).find("main") is None)


async def test_command_cwd_env_and_size(daemon, home, workspace):
    (workspace / "sub").mkdir()
    client = await daemon.connect()
    term, data = await open_term(
        client,
        "cmd",
        home,
        cwd="/sub",
        cols=100,
        rows=30,
        env={"GREETING": "héllo wörld"},
        command='echo "$GREETING"; pwd; stty size; exit 5',
    )
    assert data["command"] == 'echo "$GREETING"; pwd; stty size; exit 5'
    assert data["cwd"] == "/sub"
    close = await term.until_close()
    assert close["exitCode"] == 5 and close["signal"] is None
    assert term.text == f"héllo wörld\r\n{workspace / 'sub'}\r\n30 100\r\n"


async def test_resize_delivers_sigwinch(daemon, home):
    client = await daemon.connect()
    term, _ = await open_term(
        client,
        "w",
        home,
        command="trap 'echo WINCH $(stty size)' WINCH; echo READY; while :; do sleep 0.05; done",
    )
    await term.until("READY")
    reply = await client.request("terminal", "resize", sessionId="w", cols=132, rows=43)
    assert reply["success"] is True
    await term.until("WINCH 43 132")
    [info] = (await client.request("terminal", "list"))["data"]["sessions"]
    assert (info["cols"], info["rows"]) == (132, 43)


async def test_unknown_session_errors(daemon):
    client = await daemon.connect()
    for type_, extra in [
        ("input", {"data": "x"}),
        ("resize", {"cols": 10, "rows": 10}),
        ("close", {}),
        ("detach", {}),
    ]:
        reply = await client.request("terminal", type_, sessionId="ghost", **extra)
        assert reply["success"] is False
        assert reply["code"] == "SESSION_NOT_FOUND", reply
        assert "ghost" in reply["error"]
        await client.send({"channel": "terminal", "type": type_, "sessionId": "ghost", **extra})
        frame = await client.expect_type("error", "error")
        assert frame["code"] == "SESSION_NOT_FOUND"
        assert frame["ref"] == {"channel": "terminal", "type": type_, "sessionId": "ghost"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sessionId": "has space"}, "sessionId"),
        ({"sessionId": ""}, "sessionId"),
        ({"sessionId": "x" * 129}, "sessionId"),
        ({"sessionId": 5}, "sessionId"),
        ({}, "sessionId"),
        ({"sessionId": "ok", "cols": 0}, "cols"),
        ({"sessionId": "ok", "cols": 1001}, "cols"),
        ({"sessionId": "ok", "rows": "24"}, "rows"),
        ({"sessionId": "ok", "env": {"A": 1}}, "env.A"),
        ({"sessionId": "ok", "resumeFrom": -1}, "resumeFrom"),
    ],
)
async def test_create_rejects_bad_fields(daemon, fields, field):
    client = await daemon.connect()
    reply = await client.request("terminal", "create", **fields)
    assert reply["success"] is False
    assert reply["code"] == "INVALID_MESSAGE"
    assert reply["field"] == field
    assert manager(daemon).count() == 0


async def test_resize_and_input_validation(daemon, home):
    client = await daemon.connect()
    await open_term(client, "v", home)
    for type_, fields, field in [
        ("resize", {"cols": 80}, "rows"),
        ("resize", {"cols": 80, "rows": 0}, "rows"),
        ("resize", {"cols": 2000, "rows": 10}, "cols"),
        ("input", {}, "data"),
        ("input", {"data": 7}, "data"),
    ]:
        reply = await client.request("terminal", type_, sessionId="v", **fields)
        assert (reply["code"], reply["field"]) == ("INVALID_MESSAGE", field)
    assert (await client.request("terminal", "list"))["success"] is True


async def test_session_limit(start_daemon, home):
    running = await start_daemon(terminal_max_sessions=2)
    client = await running.connect()
    await open_term(client, "a", home)
    await open_term(client, "b", home)
    reply = await client.request("terminal", "create", sessionId="c")
    assert reply["code"] == "LIMIT_EXCEEDED"
    assert reply["limit"] == 2
    # Attaching to an existing session is not a new one.
    _, data = await open_term(client, "a", home)
    assert data["attached"] is True


async def test_pending_input_limit(start_daemon, home):
    running = await start_daemon(terminal_max_pending_input=64 * 1024)
    client = await running.connect()
    term, _ = await open_term(client, "slow", home, command="echo READY; sleep 1000")
    await term.until("READY")
    chunk = "x" * 30_000  # no newline: the line discipline holds it, then stops taking it
    codes = []
    for _ in range(50):
        reply = await client.request("terminal", "input", sessionId="slow", data=chunk)
        codes.append(reply.get("code"))
        if reply["success"] is False:
            break
    assert codes[-1] == "LIMIT_EXCEEDED"
    session = manager(running).get("slow")
    assert 0 < session.pending_input <= 64 * 1024
    # The socket is fine, and closing a session with stuck input works.
    reply = await client.request("terminal", "close", sessionId="slow")
    assert reply["success"] is True


async def test_utf8_is_never_split_across_small_frames(start_daemon, home):
    running = await start_daemon(terminal_max_frame_bytes=64)
    client = await running.connect()
    text = "aé€😀" * 3000
    term, _ = await open_term(
        client,
        "utf8",
        home,
        command="python3 -c \"import sys; sys.stdout.write('a\\u00e9\\u20ac\\U0001F600' * 3000)\"",
    )
    close = await term.until_close()
    assert close["exitCode"] == 0
    assert term.text == text
    assert all(len(f["data"].encode()) <= 64 for f in term.frames)
    assert len(term.frames) >= len(text.encode()) // 64


async def test_large_output_is_coalesced_into_64k_frames(daemon, home):
    client = await daemon.connect()
    term, _ = await open_term(
        client, "big", home, command="python3 -c \"print('\\u00e9' * 400000, end='')\""
    )
    await term.until_close()
    assert term.text == "é" * 400000
    sizes = [len(f["data"].encode()) for f in term.frames]
    assert max(sizes) <= 65536
    assert max(sizes) > 4096  # reads are gathered, not one frame per 4 KiB read


async def test_reattach_replays_and_resume_is_exact(daemon, home):
    first = await daemon.connect()
    a, _ = await open_term(first, "r", home)
    await a.run("echo part1")
    seen = a.end
    # Type more, then drop the socket without reading what it produced.
    await a.send("seq 1 3000; echo END_OF_PART2\r")
    await first.close()
    await wait_for(lambda: manager(daemon).get("r").info()["clients"] == 0)

    second = await daemon.connect()
    pushed = await second.expect_type("terminal", "sessions")
    assert [s["sessionId"] for s in pushed["sessions"]] == ["r"]
    b, data = await open_term(second, "r", home, resumeFrom=seen)
    assert data["attached"] is True
    await b.until("\nEND_OF_PART2")
    assert b.start == seen
    assert not b.frames[0].get("truncated")

    third = await daemon.connect()
    c, _ = await open_term(third, "r", home)  # full replay
    await c.until("\nEND_OF_PART2")
    assert c.start == 0
    assert c.raw[:seen] == a.raw
    assert c.raw[seen : b.end] == b.raw  # exactly the missing bytes: no gap, no duplicate


async def test_replay_beyond_the_ring_is_marked_truncated(start_daemon, home):
    running = await start_daemon(terminal_ring_bytes=8192, terminal_pause_bytes=4096)
    client = await running.connect()
    term, _ = await open_term(client, "t", home, command="seq 1 20000; echo DONE; sleep 1000")
    await term.until("DONE")
    assert term.start == 0 and not term.frames[0].get("truncated")
    other = await running.connect()
    for resume in (None, 0):
        fields = {} if resume is None else {"resumeFrom": resume}
        view, _ = await open_term(other, "t", home, **fields)
        await view.until("DONE")
        assert view.frames[0]["truncated"] is True
        assert view.start > 0
        assert term.raw.endswith(view.raw)
        assert len(view.raw) <= 8192


async def test_two_sockets_share_a_session_and_detach(daemon, home):
    one = await daemon.connect()
    two = await daemon.connect()
    a, _ = await open_term(one, "shared", home)
    b, data = await open_term(two, "shared", home)
    assert data["attached"] is True and data["clients"] == 2
    await b.send("echo FROM_$((6*7))\r")
    await a.until("FROM_42")
    await b.until("FROM_42")
    reply = await one.request("terminal", "detach", sessionId="shared")
    assert reply["success"] is True
    [info] = (await two.request("terminal", "list"))["data"]["sessions"]
    assert info["clients"] == 1
    await b.run("echo AFTER_DETACH")
    # Socket one still works and, once its own other session echoes, has seen nothing
    # more of the detached one.
    other, _ = await open_term(one, "other", home)
    await other.run("echo HELLO")
    assert not any(
        f.get("sessionId") == "shared" and "AFTER_DETACH" in f.get("data", "") for f in one.backlog
    )
    assert manager(daemon).get("shared").alive


async def test_disconnect_leaves_the_session_running(daemon, home):
    client = await daemon.connect()
    term, data = await open_term(client, "keep", home)
    await term.run("export KEPT=yes")
    await client.close()
    await wait_for(lambda: manager(daemon).get("keep").info()["clients"] == 0)
    assert psutil.Process(data["pid"]).is_running()
    again = await daemon.connect()
    term2, _ = await open_term(again, "keep", home)
    assert "KEPT=yes" in await term2.run("echo KEPT=$KEPT")


async def test_exit_while_detached_replays_then_closes(start_daemon, home):
    running = await start_daemon(terminal_exited_retention=600)
    client = await running.connect()
    term, _ = await open_term(client, "gone", home)
    await term.run("true")
    assert (await client.request("terminal", "detach", sessionId="gone"))["success"]
    await term.send("echo LAST_WORDS; exit 9\r")
    await wait_for(lambda: not manager(running).get("gone").alive)
    [info] = (await client.request("terminal", "list"))["data"]["sessions"]
    assert info["exited"] is True and info["exitCode"] == 9
    # Input to an exited session is refused; the session is still there to replay.
    reply = await client.request("terminal", "input", sessionId="gone", data="x")
    assert reply["code"] == "SESSION_NOT_FOUND"
    later = await running.connect()
    replay, data = await open_term(later, "gone", home)
    assert data["exited"] is True
    close = await replay.until_close()
    assert "LAST_WORDS" in replay.text
    assert (close["exitCode"], close["signal"]) == (9, None)
    # Delivered: the session is gone, and the id is free again.
    await wait_for(lambda: manager(running).find("gone") is None)


async def test_exited_session_is_dropped_after_retention(start_daemon, home):
    running = await start_daemon(terminal_exited_retention=0.2)
    client = await running.connect()
    await open_term(client, "brief", home)
    assert (await client.request("terminal", "detach", sessionId="brief"))["success"]
    await client.send(
        {"channel": "terminal", "type": "input", "sessionId": "brief", "data": "exit\r"}
    )
    await wait_for(lambda: manager(running).find("brief") is None)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
async def test_close_kills_the_whole_session_and_leaks_nothing(start_daemon, home):
    running = await start_daemon(terminal_kill_grace=0.5)
    client = await running.connect()
    me = psutil.Process()
    await open_term(client, "warmup", home)
    assert (await client.request("terminal", "close", sessionId="warmup"))["success"]
    await wait_for(lambda: manager(running).find("warmup") is None)
    await wait_for(lambda: manager(running).background_tasks == 0)
    fds_before = len(os.listdir("/proc/self/fd"))

    term, data = await open_term(client, "victim", home)
    # A job in its own process group, and one that ignores SIGHUP (needs SIGKILL).
    out = await term.run("sleep 1000 & echo BG1=$!; (trap '' HUP; exec sleep 1001) & echo BG2=$!")
    bg1 = int(out.split("BG1=")[-1].split()[0])
    bg2 = int(out.split("BG2=")[-1].split()[0])
    shell = data["pid"]
    assert all(psutil.Process(p).is_running() for p in (shell, bg1, bg2))
    reply = await client.request("terminal", "close", sessionId="victim")
    assert reply["success"] is True
    assert reply["data"]["exitCode"] is None and reply["data"]["signal"] == 1  # SIGHUP
    close = await term.until_close()
    assert (close["exitCode"], close["signal"]) == (None, 1)
    await wait_for(lambda: all(_gone(p) for p in (shell, bg1, bg2)))
    await wait_for(lambda: manager(running).find("victim") is None)
    await wait_for(lambda: manager(running).background_tasks == 0)
    await wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds_before)
    assert not [c for c in me.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert shell not in [c.pid for c in me.children()]


async def test_many_sessions_leave_no_zombies_or_fds(daemon, home):
    client = await daemon.connect()
    me = psutil.Process()
    await open_term(client, "warm", home, command="true")
    await wait_for(lambda: manager(daemon).find("warm") is None)
    await wait_for(lambda: manager(daemon).background_tasks == 0)
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = {c.pid for c in me.children()}
    terms = []
    for index in range(5):
        term, _ = await open_term(client, f"m{index}", home, command=f"echo M{index}; exit {index}")
        terms.append(term)
    for index, term in enumerate(terms):
        close = await term.until_close()
        assert close["exitCode"] == index
        assert term.text == f"M{index}\r\n"
    await wait_for(lambda: manager(daemon).count() == 0 and not manager(daemon).sessions())
    await wait_for(lambda: manager(daemon).background_tasks == 0)
    await wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds_before)
    assert {c.pid for c in me.children()} == children_before


@pytest.mark.slow
async def test_flood_with_a_stalled_client_keeps_memory_bounded(daemon, home):
    me = psutil.Process()
    fast = await daemon.connect()
    await open_term(fast, "flood", home, command="exec yes 0123456789abcdef")
    stalled = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        stalled.send_text(
            json.dumps({"channel": "terminal", "type": "create", "sessionId": "flood"})
        )
        await wait_for(lambda: manager(daemon).get("flood").info()["clients"] == 2)
        rss_before = me.memory_info().rss
        # Another socket, another session: it must keep working during the flood.
        quiet = await daemon.connect()
        calm, _ = await open_term(quiet, "calm", home)
        received = 0
        target = 40 * 1024 * 1024
        peak = rss_before
        for _ in range(100_000):
            frame = await fast.expect(
                lambda f: f.get("sessionId") == "flood" and f.get("type") == "output"
            )
            received += len(frame["data"])
            if received % (4 * 1024 * 1024) < len(frame["data"]):
                peak = max(peak, me.memory_info().rss)
                assert "ECHO" in await calm.run("echo ECHO")
            if received >= target:
                break
        assert received >= target
        peak = max(peak, me.memory_info().rss)
        # The stalled client is far behind the ring: it costs no more than the ring.
        session = manager(daemon).get("flood")
        assert session.ring.end > target
        assert peak - rss_before < 48 * 1024 * 1024, (peak - rss_before) / 2**20
    finally:
        stalled.close()


@pytest.mark.slow
@pytest.mark.parametrize("window", [64 * 1024, 0], ids=["paced", "unpaced"])
async def test_backpressure_stops_and_resumes_reading(start_daemon, home, window):
    # Paced (the default), the writer holds the stalled client's output once a window
    # of it is unanswered; unpaced, its write blocks once the socket buffers are full.
    # Either way the cursor lags and the daemon stops reading the PTY. (The window
    # timeout is long here: this client never pongs, and would be unpaced after it.)
    daemon = await start_daemon(stream_window_bytes=window, stream_window_timeout=600)
    stalled = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    reader_task: asyncio.Task[None] | None = None
    try:
        stalled.send_text(
            json.dumps(
                {
                    "channel": "terminal",
                    "type": "create",
                    "sessionId": "bp",
                    "command": "exec yes",
                    "env": {"HOME": str(home)},
                }
            )
        )
        await wait_for(lambda: manager(daemon).find("bp") is not None)
        session = manager(daemon).get("bp")
        (conn,) = list(daemon.daemon.hub)
        proc = psutil.Process(session.pid)

        def writer_stuck() -> bool:
            if window:
                return conn._held_since is not None and conn._write_started is None
            return conn._write_started is not None

        def stalled_state() -> bool:
            return writer_stuck() and not session.reading and proc.status() == "sleeping"

        await wait_for(stalled_state, timeout=20)
        assert session.paused_count >= 1
        stalled_at = session.ring.end
        # `yes` is now blocked writing to the full PTY, as on a real terminal: it stays
        # asleep and the stream does not advance.
        for _ in range(5):
            await wait_for(lambda: proc.status() == "sleeping")
            await asyncio.sleep(0.02)
        assert stalled_state()
        assert session.ring.end == stalled_at
        assert not conn.closed  # held or blocked, not dropped (the write timeout is 30 s)
        # A client that catches up, and keeps reading, resumes reading.
        reader = await daemon.connect()
        view, _ = await open_term(reader, "bp", home, resumeFrom=stalled_at)
        await view.until("y\r\ny\r\n")
        assert view.start == stalled_at

        async def keep_reading() -> None:
            for _ in range(1_000_000):  # bounded; cancelled once the ring has moved on
                await reader.ws.receive(timeout=20)

        reader_task = asyncio.create_task(keep_reading())
        await wait_for(lambda: session.ring.end > stalled_at + 1024 * 1024)
    finally:
        if reader_task is not None:
            reader_task.cancel()
            await asyncio.gather(reader_task, return_exceptions=True)
        stalled.close()


@pytest.mark.slow
async def test_ctrl_c_reaches_a_flooding_process(daemon, home):
    client = await daemon.connect()
    term, _ = await open_term(client, "cc", home)
    await term.run("true")
    await term.send("yes FLOOD\r")
    await term.until("FLOOD\r\nFLOOD\r\nFLOOD")
    await term.send("\x03")
    await term.send("echo AFTER_$((40+2))\r")
    for _ in range(10):
        try:
            await term.until("AFTER_42", timeout=2)
            break
        except TimeoutError:
            term.raw = term.raw[-1000:]  # keep memory bounded while the flood drains
            term.start = None
    assert "AFTER_42" in term.text


@pytest.mark.slow
async def test_ctrl_c_reaches_a_process_blocked_by_backpressure(daemon, home):
    stalled = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        stalled.send_text(
            json.dumps(
                {
                    "channel": "terminal",
                    "type": "create",
                    "sessionId": "cc2",
                    "command": "yes; echo INTERRUPTED; sleep 1000",
                    "env": {"HOME": str(home)},
                }
            )
        )
        await wait_for(lambda: manager(daemon).find("cc2") is not None)
        session = manager(daemon).get("cc2")
        await wait_for(lambda: not session.reading, timeout=20)
        shell = psutil.Process(session.pid)
        await wait_for(lambda: any(c.name() == "yes" for c in shell.children()))
        [yes] = [c for c in shell.children() if c.name() == "yes"]
        stalled.send_text(
            json.dumps({"channel": "terminal", "type": "input", "sessionId": "cc2", "data": "\x03"})
        )
        await wait_for(lambda: _gone(yes.pid))
    finally:
        stalled.close()


async def test_info_counts_live_sessions(daemon, home):
    async def terminals() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                daemon.url("/workspaces/ws-test/info"),
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp:
                return (await resp.json())["terminals"]

    assert await terminals() == 0
    client = await daemon.connect()
    term, _ = await open_term(client, "i1", home)
    await open_term(client, "i2", home)
    assert await terminals() == 2
    await term.send("exit\r")
    await term.until_close()
    assert await terminals() == 1
