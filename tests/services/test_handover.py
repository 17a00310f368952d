"""Handover of terminal sessions between two managers (a reload, without the exec), and
the state file's reader: versions, pids and blobs it refuses, one reason each."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aetherd.reload import end_abandoned
from aetherd.services import handover
from aetherd.services.handover import HandoverState, take, write_state
from aetherd.services.terminal import Exit, Output, TerminalManager
from tests.support import wait_for


@pytest.fixture
async def managers(make_settings: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Any]:
    made: list[TerminalManager] = []
    home = tmp_path / "home"
    home.mkdir()

    def make(**overrides: Any) -> TerminalManager:
        mgr = TerminalManager(make_settings(**overrides))
        mgr.base_env["HOME"] = str(home)
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        await mgr.stop()


async def read_until(session: Any, cursor: int, pred: Callable[[str], bool]) -> tuple[str, int]:
    """Output of `session` from `cursor` until `pred(text)`; contiguous offsets."""
    wake = asyncio.Event()
    attachment = session.attach(wake.set, cursor)
    text = ""
    for _ in range(10_000):
        item = attachment.read()
        if item is None:
            if pred(text):
                break
            await asyncio.wait_for(wake.wait(), 10)
            wake.clear()
            continue
        assert isinstance(item, Output)
        assert item.offset == cursor and not item.truncated
        cursor = item.end
        text += item.data
    attachment.detach()
    return text, cursor


async def test_a_live_session_moves_with_its_ring_offsets_and_pending_input(managers):
    old = managers()
    await old.start()
    session = await old.create("s", command="stty -echo; echo start; exec cat")
    text, cursor = await read_until(session, 0, lambda t: "start" in t)
    pid = session.pid
    states, blob = old.hand_over()
    assert old.sessions() == [] and old.count() == 0
    [state] = states
    assert state.pid == pid and state.fd is not None and not state.exited
    assert blob[state.ring_at : state.ring_at + state.ring_len] == text.encode()
    # Written while nobody reads the PTY: it waits in the kernel for the new manager.
    os.write(state.fd, b"between\n")
    new = managers()
    new.handover = (states, blob)
    await new.start()
    assert new.adopted == 1 and new.reloaded
    adopted = new.get("s")
    assert adopted.pid == pid and adopted.adopted and adopted.ring.start == 0
    more, _ = await read_until(adopted, cursor, lambda t: "between" in t)
    assert more == "between\r\n"
    adopted.write(b"after\n")
    more, _ = await read_until(adopted, cursor, lambda t: "after" in t)
    assert more == "between\r\nafter\r\n"


async def test_an_exited_session_keeps_its_exit_and_retention_clock(managers):
    old = managers(terminal_exited_retention=60.0)
    await old.start()
    session = await old.create("x", command="echo out; exit 5")
    await asyncio.wait_for(session.wait(), 10)
    states, blob = old.hand_over()
    [state] = states
    assert state.exited and state.exit_code == 5 and state.fd is None
    assert state.retention_left is not None and 0 < state.retention_left <= 60
    new = managers()
    new.handover = (states, blob)
    await new.start()
    adopted = new.get("x")
    assert adopted.exit == Exit(5, None)
    wake = asyncio.Event()
    attachment = adopted.attach(wake.set)
    item = attachment.read()
    assert isinstance(item, Output) and item.data == "out\r\n"
    assert attachment.read() == Exit(5, None)
    assert new.find("x") is None  # told once, then forgotten


async def test_a_session_that_is_not_ours_is_dropped_whole(managers):
    old = managers()
    await old.start()
    await old.create("a", command="exec cat")
    states, blob = old.hand_over()
    [state] = states
    assert state.fd is not None
    # pid 1 is nobody's child here; its fd (a copy of a real PTY) is closed with it.
    bogus = state.model_copy(update={"id": "b", "pid": 1, "fd": os.dup(state.fd)})
    new = managers()
    new.handover = ([bogus, state], blob)
    await new.start()
    assert new.find("b") is None and new.adoption_failures == 1
    assert new.get("a").alive


def _state(pid: int | None = None, **fields: Any) -> HandoverState:
    base = {
        "version": handover.HANDOVER_VERSION,
        "pid": os.getpid() if pid is None else pid,
        "written_at": 0.0,
        "listen_fd": 3,
        "terminals": [],
    }
    base.update(fields)
    return HandoverState.model_validate(base)


def _env(path: Path) -> dict[str, str]:
    return handover.envelope(path, [7, 8], [1234])


def test_take_reads_the_state_once(tmp_path: Path):
    path = write_state(tmp_path / "run", _state(), b"blob")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o700
    env = _env(path)
    taken = take(env)
    assert taken is not None and taken.state is not None and taken.refused is None
    assert taken.fds == [7, 8] and taken.pids == [1234] and taken.blob == b"blob"
    assert env == {} and not path.exists() and not path.with_suffix(".blob").exists()
    assert take({}) is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(version=3), "version 3 is not readable"),
        (lambda d: d.update(pid=1), "belongs to pid 1"),
        (lambda d: d.update(terminals=[{"id": "x"}]), "malformed at terminals.0"),
    ],
)
def test_take_refuses_what_it_cannot_adopt(tmp_path: Path, mutate, reason):
    path = write_state(tmp_path, _state(), b"")
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    taken = take(_env(path))
    assert taken is not None and taken.state is None
    assert taken.refused is not None and reason in taken.refused
    assert taken.fds == [7, 8]  # the envelope survives: the fds can still be closed


def test_a_version_1_state_is_still_read(tmp_path: Path):
    """Version 1 (before processes were handed over) is version 2 with no processes."""
    path = write_state(tmp_path, _state(), b"")
    data = json.loads(path.read_text())
    data.update(version=1, processes=[])
    path.write_text(json.dumps(data))
    taken = take(_env(path))
    assert taken is not None and taken.refused is None
    assert taken.state is not None and taken.state.processes == []


def test_take_refuses_a_short_blob_and_a_missing_file(tmp_path: Path):
    session = {
        "id": "s", "pid": 2, "fd": None, "command": None, "cwd": "/", "cols": 80, "rows": 24,
        "created_at": 0.0, "ring_start": 0, "ring_at": 0, "ring_len": 10, "pending_at": 10,
        "pending_len": 0, "exited": True, "exit_code": 0, "exit_signal": None,
        "exit_delivered": False, "retention_left": None, "eof": True, "terminating": False,
    }  # fmt: skip
    path = write_state(tmp_path, _state(terminals=[session]), b"short")
    taken = take(_env(path))
    assert taken is not None and taken.refused and "blob is shorter" in taken.refused
    stream = {"fd": None, "eof": True, "ring_start": 0, "ring_at": 0, "ring_len": 4}
    process = {
        "id": "p", "pid": 2, "argv": ["true"], "command": None, "request_argv": ["true"],
        "cwd": "/", "encoding": "utf-8", "started_at": 0.0, "started_monotonic": 0.0,
        "stdout": stream, "stderr": {**stream, "ring_at": 4, "ring_len": 2}, "stdin_fd": None,
        "stdin_requested": False, "pending_at": 6, "pending_len": 0,
        "close_stdin_after_input": False, "timeout": None, "timed_out": False,
        "terminating": False, "leader_status": [0, None], "exit_code": 0, "exit_signal": None,
        "exited": True, "duration_ms": 1, "wait": False, "retention_left": None,
        "group_left": False,
    }  # fmt: skip
    path = write_state(tmp_path, _state(processes=[process]), b"short")
    taken = take(_env(path))
    assert taken is not None and taken.refused and "process 'p' needs" in taken.refused
    path = write_state(tmp_path, _state(processes=[process]), b"longer")
    taken = take(_env(path))
    assert taken is not None and taken.state is not None, taken.refused
    gone = take(_env(tmp_path / "absent.json"))
    assert gone is not None and gone.refused and "cannot read" in gone.refused


async def test_abandoned_children_are_ended_and_reaped():
    # A plain Popen: no asyncio child watcher racing end_abandoned to reap it.
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' HUP; echo ready; exec sleep 60"],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # trap set
    # The child ignores SIGHUP: it takes the SIGKILL after the grace, and is reaped.
    await end_abandoned([proc.pid], grace=0.2)
    # Gone from /proc: reaped, not a zombie.
    await wait_for(lambda: not os.path.exists(f"/proc/{proc.pid}"), 10)
    proc.returncode = -signal.SIGKILL  # reaped already: Popen must not wait for it
    proc.stdout.close()


def test_a_ring_file_keeps_the_last_bytes_across_the_wrap(tmp_path: Path):
    from aetherd.services import ringfile

    base = tmp_path / "s"
    ring = ringfile.RingFile(base, 10, {"id": "s", "pid": 1})
    ring.append(b"abcdefgh", 8)
    ring.append(b"ijklmn", 14)  # wraps: the first 4 bytes fall out
    meta, start, data = ringfile.read(base)
    assert (meta["id"], start, data) == ("s", 4, b"efghijklmn")
    ring.append(b"x" * 25, 39)  # more than the capacity at once
    assert ringfile.read(base)[1:] == (29, b"x" * 10)
    ring.close(remove=True)
    assert ringfile.read(base) is None and list(tmp_path.iterdir()) == []


async def test_a_session_mirrors_its_ring_to_a_file_until_it_is_forgotten(managers, tmp_path):
    from aetherd.services import ringfile
    from aetherd.services.keeper import fd_name

    mgr = managers(runtime_dir=tmp_path / "rt")
    await mgr.start()
    session = await mgr.create("m", command="echo mirrored; exec cat")
    text, cursor = await read_until(session, 0, lambda t: "mirrored" in t)
    base = tmp_path / "rt" / "rings" / fd_name("m")
    meta, start, data = ringfile.read(base)
    assert meta["id"] == "m" and meta["pid"] == session.pid
    assert (start, data) == (0, text.encode()) and cursor == len(data)
    await mgr.close("m")
    await wait_for(lambda: ringfile.read(base) is None, 10)
