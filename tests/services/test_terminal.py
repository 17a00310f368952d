"""The terminal service alone: the ring, UTF-8 cuts, real PTY sessions, ending and stopping."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.terminal import (
    Attachment,
    Exit,
    Output,
    OutputRing,
    TerminalManager,
    _utf8_cut,
)
from tests.support import wait_for

# The whole terminal suite runs on asyncio's loop and on uvloop (tests/conftest.py).
pytestmark = pytest.mark.event_loops


def test_utf8_cut_never_splits_a_character():
    data = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    boundaries = {0, 1, 3, 6, 10}
    for end in range(len(data) + 1):
        cut = _utf8_cut(data, end)
        assert cut in boundaries and cut <= end
        assert end - cut < 4
    # Invalid bytes are not held back forever.
    assert _utf8_cut(b"ab\xff", 3) == 3
    assert _utf8_cut(b"\x80\x80\x80\x80", 4) == 4


def test_ring_keeps_the_last_bytes_with_absolute_offsets():
    ring = OutputRing(10)
    assert (ring.start, ring.end, len(ring)) == (0, 0, 0)
    ring.append(b"0123456789")
    ring.append(b"abcd")
    assert (ring.start, ring.end) == (4, 14)
    assert ring.chunk(0, 100, final=False) == (4, b"456789abcd")
    assert ring.chunk(10, 2, final=False) == (10, b"ab")
    assert ring.chunk(14, 5, final=False) == (14, b"")


def test_ring_chunks_hold_back_an_incomplete_character():
    ring = OutputRing(100)
    euro = "€".encode()
    ring.append(b"x" + euro[:2])
    assert ring.chunk(0, 100, final=False) == (0, b"x")
    assert ring.chunk(1, 100, final=False) == (1, b"")
    assert ring.chunk(1, 100, final=True) == (1, euro[:2])  # nothing more will come
    ring.append(euro[2:])
    assert ring.chunk(1, 100, final=False) == (1, euro)
    assert ring.chunk(0, 3, final=False) == (0, b"x")  # limit inside the character


def test_ring_resync_skips_a_partial_character_at_its_start():
    ring = OutputRing(5)
    ring.append("ab€€".encode())  # 8 bytes; the ring keeps the last 5: b"\x82\xac" + "€"
    start, data = ring.chunk(0, 100, final=False)
    assert (start, data) == (ring.start + 2, "€".encode())


@pytest.fixture
async def manager(make_settings: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Any]:
    managers: list[TerminalManager] = []
    home = tmp_path / "home"
    home.mkdir()

    async def make(**overrides: Any) -> TerminalManager:
        mgr = TerminalManager(make_settings(**overrides))
        mgr.base_env["HOME"] = str(home)
        await mgr.start()
        managers.append(mgr)
        return mgr

    yield make
    for mgr in managers:
        await mgr.stop()


async def collect(attachment: Attachment, wake: asyncio.Event) -> tuple[str, Exit]:
    """Read an attachment to its exit; check offsets are contiguous."""
    text = ""
    offset = None
    for _ in range(100_000):
        item = attachment.read()
        if item is None:
            await asyncio.wait_for(wake.wait(), 10)
            wake.clear()
        elif isinstance(item, Output):
            assert offset is None or item.offset == offset
            offset = item.end
            text += item.data
        else:
            return text, item
    raise AssertionError("no exit")


async def test_command_exit_code_env_and_exit_callbacks(manager):
    mgr = await manager()
    mgr.base_env["FROM_BASE"] = "base"
    mgr.env_provider = lambda: {"FROM_PROVIDER": "provider", "FROM_BASE": "overridden"}
    session = await mgr.create(
        "boot:web", command='echo "$FROM_BASE $FROM_PROVIDER $X $TERM"; exit 3', env={"X": "x"}
    )
    seen: list[Exit] = []
    session.on_exit(seen.append)
    wake = asyncio.Event()
    text, exit_ = await collect(session.attach(wake.set), wake)
    assert text == "overridden provider x xterm-256color\r\n"
    assert exit_ == Exit(3, None)
    assert seen == [exit_]
    assert await session.wait() == exit_
    late: list[Exit] = []
    session.on_exit(late.append)
    assert late == [exit_]


async def test_daemon_settings_do_not_leak_into_sessions(manager, monkeypatch):
    monkeypatch.setenv("AETHERD_TOKEN", "secret-token")
    mgr = await manager()
    session = await mgr.create("env", command='echo "[${AETHERD_TOKEN-unset}]"')
    wake = asyncio.Event()
    text, _ = await collect(session.attach(wake.set), wake)
    assert text == "[unset]\r\n"


async def test_signal_exit_is_reported_as_signal(manager):
    mgr = await manager()
    session = await mgr.create("sig", command="kill -TERM $$")
    assert await asyncio.wait_for(session.wait(), 10) == Exit(None, 15)


async def test_create_errors(manager, workspace):
    mgr = await manager(terminal_max_sessions=1)
    (workspace / "file").write_text("x")
    cases = [
        ({"session_id": "bad id"}, ErrorCode.INVALID_MESSAGE),
        ({"session_id": "a", "cwd": "/../etc"}, ErrorCode.INVALID_PATH),
        ({"session_id": "a", "cwd": "/missing"}, ErrorCode.NOT_FOUND),
        ({"session_id": "a", "cwd": "/file"}, ErrorCode.NOT_DIRECTORY),
        ({"session_id": "a", "env": {"A=B": "x"}}, ErrorCode.INVALID_MESSAGE),
        ({"session_id": "a", "env": {"A": "x\x00y"}}, ErrorCode.INVALID_MESSAGE),
    ]
    for kwargs, code in cases:
        session_id = kwargs.pop("session_id")
        with pytest.raises(AetherError) as info:
            await mgr.create(session_id, **kwargs)
        assert info.value.code is code, kwargs
    await mgr.create("one", command="sleep 100")
    with pytest.raises(AetherError) as info:
        await mgr.create("one")
    assert info.value.code is ErrorCode.CONFLICT
    with pytest.raises(AetherError) as info:
        await mgr.create("two")
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(AetherError) as info:
        mgr.get("two")
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    assert mgr.count() == 1


@pytest.mark.slow
async def test_stop_kills_every_session_even_one_ignoring_sighup(manager):
    mgr = await manager(terminal_kill_grace=0.3)
    me = psutil.Process()
    stubborn = await mgr.create("stubborn", command="trap '' HUP; echo READY; sleep 1000 & wait")
    plain = await mgr.create("plain")
    wake = asyncio.Event()
    attachment = stubborn.attach(wake.set)
    text = ""
    while "READY" not in text:
        item = attachment.read()
        if item is None:
            await asyncio.wait_for(wake.wait(), 10)
            wake.clear()
        else:
            text += item.data
    shell = psutil.Process(stubborn.pid)
    await wait_for(lambda: bool(shell.children()))
    sleeper = shell.children()[0].pid
    pids = [stubborn.pid, plain.pid, sleeper]
    await mgr.stop()
    assert stubborn.exit == Exit(None, 9)  # SIGKILL after the grace period
    assert plain.exit == Exit(None, 1)  # SIGHUP
    assert mgr.count() == 0 and mgr.sessions() == []

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await wait_for(lambda: all(gone(p) for p in pids))
    assert not {c.pid for c in me.children()} & set(pids)
    with pytest.raises(AetherError) as info:
        await mgr.create("late")
    assert info.value.code is ErrorCode.BUSY


async def test_input_is_written_and_resize_applies(manager):
    mgr = await manager()
    session = await mgr.create("io", command="read line; stty size; echo got=$line")
    session.resize(120, 40)
    session.write("héllo\r".encode())
    wake = asyncio.Event()
    text, exit_ = await collect(session.attach(wake.set), wake)
    assert exit_ == Exit(0, None)
    assert text.endswith("40 120\r\ngot=héllo\r\n")
    with pytest.raises(AetherError) as info:
        session.write(b"x")
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_a_client_that_fell_out_of_the_ring_is_resynchronised(manager):
    """One attachment reads, one never does while 4 MB flow through a 64 KiB ring: the
    reader drives the PTY, and the other, when it reads again, resumes at the ring's
    start with `truncated`, then follows without a gap."""
    mgr = await manager(terminal_ring_bytes=65536)
    session = await mgr.create(
        "flood", command="head -c 4000000 /dev/zero | tr '\\0' x; exec sleep 30"
    )
    stalled = session.attach(lambda: None)
    wake = asyncio.Event()
    reader = session.attach(wake.set)
    received = 0
    for _ in range(100_000):  # the reading client takes everything
        item = reader.read()
        if item is None:
            if received >= 4_000_000:
                break
            await asyncio.wait_for(wake.wait(), 10)
            wake.clear()
        else:
            assert isinstance(item, Output)
            received += len(item.data)
    assert received == 4_000_000
    assert stalled.lag > session.ring.capacity  # it has fallen out of the ring
    first = stalled.read()
    assert isinstance(first, Output) and first.truncated
    assert first.offset == session.ring.start
    assert (mgr.resyncs, mgr.skipped_bytes) == (1, session.ring.start)
    item, offset = first, first.end
    for _ in range(1000):
        item = stalled.read()
        if item is None:
            break
        assert item.offset == offset and not item.truncated
        offset = item.end
    assert offset == session.ring.end
    assert mgr.output_bytes == 4_000_000


async def test_characters_cut_by_the_rings_wrap_reach_the_client_whole(manager):
    """2 MB of 1- to 4-byte characters through a ring of an odd size (4,099 bytes), so
    the circular store wraps hundreds of times at every position inside a character:
    the client that keeps up gets every character, in order, with contiguous offsets."""
    mgr = await manager(terminal_ring_bytes=4099, terminal_pause_bytes=4096)
    line = "héllo €😀 ok"
    count = 2_000_000 // len(line.encode())
    # It stays alive after its output: at the exit, what the PTY still holds is drained
    # at once, past a ring this small (the client's turn to read would come too late).
    session = await mgr.create("utf8", command=f"yes '{line}' | head -n {count}; exec sleep 30")
    expected = (line + "\r\n") * count
    wake = asyncio.Event()
    attachment = session.attach(wake.set)
    parts: list[str] = []
    offset = received = 0
    for _ in range(1_000_000):
        item = attachment.read()
        if item is None:
            if received >= len(expected):
                break
            await asyncio.wait_for(wake.wait(), 10)
            wake.clear()
            continue
        assert isinstance(item, Output)
        assert item.offset == offset and not item.truncated
        offset = item.end
        parts.append(item.data)
        received += len(item.data)
    assert "".join(parts) == expected
    assert mgr.resyncs == 0


async def test_reading_pauses_when_the_only_client_is_a_ring_behind(manager):
    # A ring smaller than the pause mark (256 KiB): the client is a whole ring behind
    # before it is "behind" by the pause mark, and reading must stop there too.
    mgr = await manager(terminal_ring_bytes=65536)
    session = await mgr.create("yes", command="yes")
    attachment = session.attach(lambda: None)
    await wait_for(lambda: not session.reading)
    end = session.ring.end
    assert attachment.lag == session.ring.capacity
    item = attachment.read()  # the client takes a frame: reading resumes
    assert isinstance(item, Output)
    await wait_for(lambda: session.ring.end > end)


CHILD_STATE = (
    # session leader, the PTY as controlling terminal, in the foreground; cwd; signals.
    'echo "sid=$(ps -o sid= -p $$ | tr -d " ") pid=$$ tty=$(tty)"; '
    'echo "fg=$(ps -o tpgid= -p $$ | tr -d " ") pgid=$(ps -o pgid= -p $$ | tr -d " ")"; '
    'echo "cwd=$PWD"; grep -E "^Sig(Blk|Ign):" /proc/self/status'
)


@pytest.mark.parametrize("spawn", ["posix_spawn", "fork"])
async def test_the_child_leads_its_session_on_its_pty(manager, workspace, monkeypatch, spawn):
    """posix_spawn (the default where libc has it) and the fork fallback start the child
    alike: its own session, the PTY as controlling terminal, the requested cwd, no
    signal ignored or blocked (the daemon ignores SIGPIPE, SIGXFSZ and, while reloading,
    SIGHUP), exit status reported."""
    from aetherd.services import ptyspawn

    if spawn == "fork":
        monkeypatch.setattr(ptyspawn, "available", lambda: False)
    else:
        assert ptyspawn.available(), "glibc >= 2.29 offers posix_spawn_file_actions_addchdir_np"
    (workspace / "sub").mkdir()
    mgr = await manager()
    session = await mgr.create("child", command=CHILD_STATE + "; exit 7", cwd="/sub")
    wake = asyncio.Event()
    text, exit_ = await collect(session.attach(wake.set), wake)
    assert exit_ == Exit(7, None)
    lines = dict(
        part.split("=", 1) for line in text.split("\r\n") for part in line.split() if "=" in part
    )
    assert lines["sid"] == lines["pid"] == str(session.pid), text  # a session leader
    assert lines["tty"].startswith("/dev/pts/"), text  # `tty` answers: a terminal on fd 0
    assert lines["fg"] == lines["pgid"] == lines["pid"], text  # the foreground process group
    assert lines["cwd"] == str(workspace / "sub"), text
    masks = {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in text.split("\r\n")
        if line.startswith("Sig")
    }
    assert masks == {"SigBlk": 0, "SigIgn": 0}, text


async def test_a_program_that_cannot_start_says_why_on_its_terminal(
    manager, workspace, monkeypatch
):
    """posix_spawn refuses (here: the cwd vanished after the check): the fork fallback
    starts the child, which writes why on the terminal and exits 127."""
    from aetherd.services import ptyspawn, terminal

    assert ptyspawn.available()
    (workspace / "gone").mkdir()
    real_spawn = terminal._spawn

    def spawn_after_rmdir(argv, env, cwd, cols, rows):
        os.rmdir(cwd)
        return real_spawn(argv, env, cwd, cols, rows)

    monkeypatch.setattr(terminal, "_spawn", spawn_after_rmdir)
    mgr = await manager()
    session = await mgr.create("gone", command="echo never", cwd="/gone")
    wake = asyncio.Event()
    text, exit_ = await collect(session.attach(wake.set), wake)
    assert exit_ == Exit(127, None)
    assert "aetherd: cannot start" in text and "No such file or directory" in text, text
