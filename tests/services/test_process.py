"""The process service alone: real processes, pipes, process groups, signals and limits."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.process import (
    Attachment,
    ManagedProcess,
    Output,
    ProcessExitInfo,
    ProcessManager,
    parse_signal,
)
from tests.support import wait_for


@pytest.fixture
async def manager(make_settings: Callable[..., Any]) -> AsyncIterator[Any]:
    managers: list[ProcessManager] = []

    async def make(**overrides: Any) -> ProcessManager:
        mgr = ProcessManager(make_settings(**overrides))
        managers.append(mgr)
        return mgr

    yield make
    for mgr in managers:
        await mgr.stop()


class Reader:
    """Reads an attachment to its exit, checking each stream's offsets are contiguous."""

    def __init__(self, process: ManagedProcess, resume: dict[str, int] | None = None) -> None:
        self.wake = asyncio.Event()
        self.attachment: Attachment = process.attach(self.wake.set, resume)
        self.data: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.starts: dict[str, int | None] = {"stdout": None, "stderr": None}
        self.ends: dict[str, int] = {"stdout": 0, "stderr": 0}
        self.frames: list[Output] = []

    def end(self, stream: str) -> int:
        return self.ends[stream]

    def _take(self, item: Output) -> None:
        if self.starts[item.stream] is None:
            self.starts[item.stream] = item.offset
        else:
            assert item.offset == self.end(item.stream), "gap or duplicate"
        self.ends[item.stream] = item.end
        self.frames.append(item)
        raw = (
            base64.b64decode(item.data)
            if self.attachment.process.state.encoding == "base64"
            else item.data.encode()
        )
        self.data[item.stream] += raw
        assert item.end == item.offset + len(raw) or "\ufffd" in item.data

    async def until(self, stream: str, marker: bytes, timeout: float = 10) -> None:
        for _ in range(100_000):
            if marker in self.data[stream]:
                return
            item = self.attachment.read()
            if item is None:
                await asyncio.wait_for(self.wake.wait(), timeout)
                self.wake.clear()
            elif isinstance(item, Output):
                self._take(item)
            else:
                raise AssertionError(f"exited before {marker!r}: {self.data}")
        raise AssertionError("too many frames")

    async def to_exit(self, timeout: float = 10) -> ProcessExitInfo:
        for _ in range(100_000):
            item = self.attachment.read()
            if item is None:
                await asyncio.wait_for(self.wake.wait(), timeout)
                self.wake.clear()
            elif isinstance(item, Output):
                self._take(item)
            else:
                return item
        raise AssertionError("no exit")


def zombies() -> list[int]:
    """Our children that have exited and were not reaped."""
    return [c.pid for c in psutil.Process().children() if _status(c) == psutil.STATUS_ZOMBIE]


def _status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.NoSuchProcess:
        return "gone"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_stdout_and_stderr_are_separate_streams_with_offsets(manager):
    mgr = await manager()
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; printf 'é'; exit 3"
    process = mgr.spawn(command=script)
    reader = Reader(process)
    exit_ = await reader.to_exit()
    assert exit_.exit_code == 3 and exit_.signal is None and not exit_.timed_out
    assert reader.data["stdout"] == "out1\nout2\nout3\né".encode()
    assert reader.data["stderr"] == b"err1\nerr2\nerr3\n"
    assert reader.starts == {"stdout": 0, "stderr": 0}
    assert process.info()["offsets"] == {"stdout": 17, "stderr": 15}
    # Every frame holds one stream only.
    assert all(f.stream in ("stdout", "stderr") for f in reader.frames)


async def test_argv_runs_without_a_shell_and_env_and_cwd_apply(manager, workspace):
    (workspace / "sub").mkdir()
    mgr = await manager()
    mgr.env_provider = lambda: {"FROM_CONFIG": "cfg", "BOTH": "config"}
    process = mgr.spawn(
        argv=["/bin/sh", "-c", 'echo "$FROM_CONFIG $BOTH $1"; pwd', "x", "$HOME;*"],
        cwd="/sub",
        env={"BOTH": "request"},
    )
    reader = Reader(process)
    await reader.to_exit()
    assert reader.data["stdout"].decode() == f"cfg request $HOME;*\n{workspace / 'sub'}\n"
    assert process.info()["argv"][0] == "/bin/sh" and process.info()["command"] is None
    assert process.info()["cwd"] == "/sub"


async def test_daemon_settings_do_not_leak_into_processes(manager, monkeypatch):
    monkeypatch.setenv("AETHERD_TOKEN", "secret")
    mgr = await manager()
    result = await mgr.run(command="env")
    assert "AETHERD_TOKEN" not in result.stdout and "PATH=" in result.stdout


async def test_stdin_then_eof_ends_cat(manager):
    mgr = await manager()
    process = mgr.spawn(argv=["cat"], stdin=True)
    reader = Reader(process)
    process.write(b"hello ")
    await reader.until("stdout", b"hello ")
    process.write("wörld".encode(), eof=True)
    exit_ = await reader.to_exit()
    assert exit_.exit_code == 0
    assert reader.data["stdout"] == "hello wörld".encode()
    assert not process.stdin_open


async def test_input_errors(manager):
    mgr = await manager(process_max_pending_input=1024)
    no_stdin = mgr.spawn(command="sleep 5")
    with pytest.raises(AetherError) as err:
        no_stdin.write(b"x")
    assert err.value.code is ErrorCode.INVALID_MESSAGE
    # A process that never reads its stdin: pending input is bounded.
    stuck = mgr.spawn(command="sleep 5", stdin=True)
    with pytest.raises(AetherError) as err:
        for _ in range(10_000):
            stuck.write(b"x" * 1000)
    assert err.value.code is ErrorCode.LIMIT_EXCEEDED
    assert stuck.pending_input <= 1024
    closed = mgr.spawn(argv=["cat"], stdin=True)
    closed.write(b"", eof=True)
    with pytest.raises(AetherError) as err:
        closed.write(b"late")
    assert err.value.code is ErrorCode.CONFLICT
    await closed.wait()


async def test_signals_reach_the_whole_group(manager, workspace):
    mgr = await manager()
    # The shell starts a child (sleep) that would outlive it without a group signal.
    process = mgr.spawn(command="sleep 60 & echo $!; wait")
    reader = Reader(process)
    await reader.until("stdout", b"\n")
    child = int(reader.data["stdout"].decode())
    assert alive(child)
    process.send_signal(parse_signal("SIGTERM"))
    exit_ = await reader.to_exit()
    assert exit_.signal == signal.SIGTERM and exit_.exit_code is None
    await wait_for(lambda: not alive(child), 5)
    with pytest.raises(AetherError) as err:
        process.send_signal(signal.SIGINT)
    assert err.value.code is ErrorCode.CONFLICT


def test_signal_names_and_numbers():
    assert parse_signal("SIGINT") == signal.SIGINT
    assert parse_signal(9) == 9
    for bad in ("SIGNOPE", "INT", "sigint", "", 0, -1, 10_000, True):
        with pytest.raises(AetherError) as err:
            parse_signal(bad)
        assert err.value.code is ErrorCode.INVALID_MESSAGE
        assert err.value.extra["field"] == "signal"


async def test_timeout_escalates_to_sigkill_when_sigterm_is_trapped(manager):
    mgr = await manager(process_kill_grace=0.3)
    process = mgr.spawn(
        command="trap '' TERM; echo ready; while :; do sleep 0.05; done", timeout=0.3
    )
    reader = Reader(process)
    exit_ = await reader.to_exit()
    assert exit_.timed_out
    assert exit_.signal == signal.SIGKILL and exit_.exit_code is None


async def test_timeout_with_sigterm_obeyed(manager):
    mgr = await manager()
    result = await mgr.run(command="sleep 30", timeout=0.2)
    assert result.exit.timed_out and result.exit.signal == signal.SIGTERM


async def test_wait_result_is_capped_with_the_head_dropped(manager):
    mgr = await manager(process_wait_output_bytes=4096)
    result = await mgr.run(
        command="seq 1 5000; echo done; echo small >&2",
    )
    assert result.truncated
    assert result.stdout.endswith("4999\n5000\ndone\n")
    assert len(result.stdout.encode()) <= 4096
    assert result.stderr == "small\n"
    assert result.exit.exit_code == 0
    small = await mgr.run(argv=["echo", "hi"])
    assert (small.stdout, small.truncated) == ("hi\n", False)


async def test_utf8_is_decoded_across_reads_and_bad_bytes_become_fffd(manager):
    mgr = await manager()
    # "€" split over two writes, then an invalid byte, then a truncated character at EOF.
    process = mgr.spawn(command=r"printf '\342\202'; sleep 0.1; printf '\254 \377 x \342'")
    reader = Reader(process)
    await reader.to_exit()
    assert reader.data["stdout"].decode() == "€ \ufffd x \ufffd"


async def test_base64_encoding_keeps_raw_bytes(manager):
    mgr = await manager()
    result = await mgr.run(command=r"printf '\377\000\342'", encoding="base64")
    assert base64.b64decode(result.stdout) == b"\xff\x00\xe2"
    process = mgr.spawn(command=r"printf '\377\000\342'", encoding="base64")
    reader = Reader(process)
    await reader.to_exit()
    assert reader.data["stdout"] == b"\xff\x00\xe2"


async def test_resume_gets_exactly_the_missed_bytes_and_exited_replays(manager):
    mgr = await manager()
    process = mgr.spawn(argv=["cat"], stdin=True)
    first = Reader(process)
    process.write(b"one\n")
    await first.until("stdout", b"one\n")
    first.attachment.detach()
    process.write(b"two\n", eof=True)
    await process.wait()
    resumed = Reader(process, {"stdout": first.end("stdout"), "stderr": 0})
    assert (await resumed.to_exit()).exit_code == 0
    assert resumed.data["stdout"] == b"two\n" and resumed.starts["stdout"] == 4
    again = Reader(process)  # an exited process replays everything, then its exit
    assert (await again.to_exit()).exit_code == 0
    assert again.data["stdout"] == b"one\ntwo\n"


async def test_spawn_errors(manager, workspace):
    mgr = await manager()
    (workspace / "file").write_text("x")
    cases = [
        ({"command": "true", "argv": ["true"]}, ErrorCode.INVALID_MESSAGE),
        ({}, ErrorCode.INVALID_MESSAGE),
        ({"argv": ["echo", "a\x00b"]}, ErrorCode.INVALID_MESSAGE),
        ({"argv": []}, ErrorCode.INVALID_MESSAGE),
        ({"command": "true", "cwd": "/../.."}, ErrorCode.INVALID_PATH),
        ({"command": "true", "cwd": "/missing"}, ErrorCode.NOT_FOUND),
        ({"command": "true", "cwd": "/file"}, ErrorCode.NOT_DIRECTORY),
        ({"command": "true", "env": {"A=B": "x"}}, ErrorCode.INVALID_MESSAGE),
        ({"command": "true", "process_id": "bad id"}, ErrorCode.INVALID_MESSAGE),
        ({"argv": ["/no/such/program"]}, ErrorCode.NOT_FOUND),
    ]
    fds = open_fds()
    for kwargs, code in cases:
        with pytest.raises(AetherError) as err:
            mgr.spawn(**kwargs)
        assert err.value.code is code, kwargs
    assert open_fds() == fds  # a failed start leaves no pipe behind
    assert mgr.processes() == []
    with pytest.raises(AetherError) as err:
        mgr.get("nope")
    assert err.value.code is ErrorCode.NOT_FOUND


async def test_ids_conflict_while_running_and_are_reused_after_exit(manager):
    mgr = await manager()
    process = mgr.spawn(command="sleep 30", process_id="build")
    with pytest.raises(AetherError) as err:
        mgr.spawn(command="true", process_id="build")
    assert err.value.code is ErrorCode.CONFLICT
    process.send_signal(signal.SIGKILL)
    await process.wait()
    again = mgr.spawn(command="echo again", process_id="build")
    assert mgr.get("build") is again


async def test_limit_counts_live_processes_and_evicts_the_oldest_exited(manager):
    mgr = await manager(process_max=2)
    done = await mgr.run(command="true", process_id="done")
    assert done.exit.exit_code == 0
    a = mgr.spawn(command="sleep 30", process_id="a")
    assert mgr.find("done") is not None
    b = mgr.spawn(command="sleep 30", process_id="b")  # evicts "done"
    assert mgr.find("done") is None
    with pytest.raises(AetherError) as err:
        mgr.spawn(command="true")
    assert err.value.code is ErrorCode.LIMIT_EXCEEDED and err.value.extra["limit"] == 2
    assert [p.id for p in mgr.processes()] == ["a", "b"]
    for p in (a, b):
        p.send_signal(signal.SIGKILL)
        await p.wait()


async def test_exited_processes_are_dropped_after_the_retention(manager):
    mgr = await manager(process_exited_retention=0.2)
    result = await mgr.run(command="echo x")
    assert mgr.find(result.process_id) is not None
    await wait_for(lambda: mgr.find(result.process_id) is None, 5)


async def test_background_child_holding_the_pipe_is_ended_after_the_drain(manager):
    mgr = await manager(process_exit_drain=0.2, process_kill_grace=0.5)
    process = mgr.spawn(command="sleep 60 & echo $!")
    reader = Reader(process)
    exit_ = await reader.to_exit()
    assert exit_.exit_code == 0
    child = int(reader.data["stdout"].decode())
    await wait_for(lambda: not alive(child), 5)
    await wait_for(lambda: mgr.background_tasks == 0, 5)


async def test_no_zombie_and_no_fd_leak_after_many_runs(manager):
    mgr = await manager(process_exited_retention=0.05)
    # Warm up (imports, the executor, the first pidfd) before counting.
    await mgr.run(command="true")
    await wait_for(lambda: not mgr.processes(), 5)
    gc.collect()
    fds, zombies_before = open_fds(), zombies()
    for i in range(30):
        kind = i % 3
        if kind == 0:
            await mgr.run(command="echo out; echo err >&2; exit 1")
        elif kind == 1:
            process = mgr.spawn(argv=["cat"], stdin=True)
            process.write(b"data", eof=True)
            await process.wait()
        else:
            process = mgr.spawn(command="sleep 30 & wait")
            process.send_signal(signal.SIGKILL)
            await process.wait()
    await wait_for(lambda: not mgr.processes() and mgr.background_tasks == 0, 10)
    gc.collect()
    assert zombies() == zombies_before
    assert open_fds() == fds


async def test_stop_ends_every_process_even_one_ignoring_sigterm(manager):
    mgr = await manager(process_kill_grace=0.3)
    stubborn = mgr.spawn(command="trap '' TERM; echo ready; while :; do sleep 0.05; done")
    polite = mgr.spawn(command="sleep 60")
    reader = Reader(stubborn)
    await reader.until("stdout", b"ready")
    fds_during = open_fds()
    await mgr.stop()
    assert not alive(stubborn.pid) and not alive(polite.pid)
    assert stubborn.state.exit is not None and stubborn.state.exit.signal == signal.SIGKILL
    assert open_fds() < fds_during
    with pytest.raises(AetherError) as err:
        mgr.spawn(command="true")
    assert err.value.code is ErrorCode.BUSY


async def test_output_nobody_reads_stays_within_the_ring(manager):
    mgr = await manager(process_ring_bytes=64 * 1024)
    rss_before = psutil.Process().memory_info().rss
    process = mgr.spawn(command="yes 0123456789abcdef")
    # Let it print many times the ring (bounded wait), with nobody attached.
    await wait_for(lambda: mgr.output_bytes > 20 * 1024 * 1024, 30)
    ring = process.state.stdout.ring
    assert len(ring) <= 64 * 1024 and ring.end > 20 * 1024 * 1024
    assert psutil.Process().memory_info().rss - rss_before < 50 * 1024 * 1024
    process.send_signal(signal.SIGKILL)
    await process.wait()
    # A late reader starts at the ring's start, marked truncated.
    reader = Reader(process)
    await reader.to_exit()
    assert reader.frames[0].truncated and reader.frames[0].offset == ring.start


async def test_a_replay_that_lost_its_head_skips_the_cut_character(manager):
    mgr = await manager(process_ring_bytes=4096, process_wait_output_bytes=4096)
    # 3000 three-byte characters: the ring keeps the last 4096 bytes, which start
    # inside a character (9000 - 4096 is not a multiple of 3).
    result = await mgr.run(
        command="i=0; while [ $i -lt 300 ]; do printf '€€€€€€€€€€'; i=$((i+1)); done"
    )
    assert result.truncated and "\ufffd" not in result.stdout
    process = mgr.get(result.process_id)
    reader = Reader(process)
    await reader.to_exit()
    assert reader.frames[0].truncated
    assert set(reader.data["stdout"].decode()) == {"€"}


async def test_a_released_record_is_adopted_with_its_output_stdin_and_timeout(manager):
    """The hand-over seam of a reload: one record (pid, fds, rings) moves to a new manager."""
    old = await manager()
    new = await manager(process_kill_grace=0.3)
    fds = open_fds()
    process = old.spawn(argv=["cat"], stdin=True, process_id="kept", timeout=30)
    first = Reader(process)
    process.write(b"one\n")
    await first.until("stdout", b"one\n")
    state = process.release()
    assert old.find("kept") is None and first.attachment.closed
    adopted = new.adopt(state)
    adopted.write(b"two\n", eof=True)
    reader = Reader(adopted, {"stdout": first.end("stdout"), "stderr": 0})
    exit_ = await reader.to_exit()
    assert exit_.exit_code == 0 and reader.data["stdout"] == b"two\n"
    assert reader.starts["stdout"] == 4 and adopted.state.stdout.ring.contents() == b"one\ntwo\n"
    # The timeout's deadline carries over too.
    slow = old.spawn(command="sleep 30", timeout=0.5)
    moved = new.adopt(slow.release())
    exit_ = await asyncio.wait_for(moved.wait(), 10)
    assert exit_.timed_out and exit_.signal == signal.SIGTERM
    await wait_for(lambda: new.background_tasks == 0, 5)
    for mgr in (old, new):
        for p in mgr.processes():
            mgr._forget(p)
    assert open_fds() == fds


async def test_hand_over_through_the_state_file_form_and_adopt_in_a_new_manager(manager):
    """A reload without the exec: every process leaves as plain data (JSON and a blob),
    and the next manager drives it on: rings, offsets, stdin, pending input, exits."""
    from aetherd.services.handover import ProcessHandover

    old = await manager(process_exited_retention=60.0)
    fds = open_fds()
    cat = old.spawn(argv=["cat"], stdin=True, process_id="cat")
    seen = Reader(cat)
    cat.write(b"one\n")
    await seen.until("stdout", b"one\n")
    seen.attachment.detach()
    done = old.spawn(command="echo out; echo err >&2; exit 5", process_id="done")
    await asyncio.wait_for(done.wait(), 10)
    blob = bytearray()
    states = old.hand_over(blob)
    assert old.processes() == [] and old.background_tasks == 0
    with pytest.raises(AetherError) as refused:
        old.spawn(argv=["true"])
    assert refused.value.code is ErrorCode.BUSY
    by_id = {s.id: s for s in states}
    assert by_id["cat"].stdout.fd is not None and by_id["cat"].stdin_fd is not None
    assert by_id["done"].exited and by_id["done"].stdout.fd is None
    assert by_id["done"].retention_left is not None and 0 < by_id["done"].retention_left <= 60
    # Written while no manager reads: it waits in the pipe for the next one.
    assert by_id["cat"].stdin_fd is not None
    os.write(by_id["cat"].stdin_fd, b"between\n")
    again = [ProcessHandover.model_validate_json(s.model_dump_json()) for s in states]
    new = await manager()
    new.handover = (again, bytes(blob))
    await new.start()
    assert new.adopted == 2 and new.adoption_failures == 0
    adopted = new.get("cat")
    assert adopted.pid == cat.pid
    reader = Reader(adopted, {"stdout": seen.end("stdout"), "stderr": 0})
    await reader.until("stdout", b"between\n")
    adopted.write(b"two\n", eof=True)
    exit_ = await reader.to_exit()
    assert exit_.exit_code == 0 and reader.data["stdout"] == b"between\ntwo\n"
    assert reader.starts["stdout"] == 4
    ended = Reader(new.get("done"))
    assert await ended.to_exit() == ProcessExitInfo(5, None, False, done.state.exit.duration_ms)
    assert ended.data == {"stdout": b"out\n", "stderr": b"err\n"}
    for p in new.processes():
        new._forget(p)
    await wait_for(lambda: new.background_tasks == 0, 5)
    assert open_fds() == fds and zombies() == []


async def test_a_handed_over_process_that_is_not_ours_is_dropped_whole(manager):
    old = await manager()
    real = old.spawn(argv=["cat"], stdin=True, process_id="real")
    blob = bytearray()
    [state] = old.hand_over(blob)
    assert state.stdout.fd is not None
    copy = os.dup(state.stdout.fd)
    # pid 1 is nobody's child here: dropped, its fds (copies of real pipes) closed, and
    # it is not signalled (it is not ours to end).
    bogus = state.model_copy(
        update={
            "id": "bogus",
            "pid": 1,
            "stdout": state.stdout.model_copy(update={"fd": copy}),
            "stderr": state.stderr.model_copy(update={"fd": None}),
            "stdin_fd": None,
        }
    )
    new = await manager()
    new.handover = ([bogus, state], bytes(blob))
    await new.start()
    assert new.find("bogus") is None and new.adoption_failures == 1
    try:  # the copy was closed (its number may be reused since, but not by a pipe)
        assert not os.readlink(f"/proc/self/fd/{copy}").startswith("pipe:")
    except FileNotFoundError:
        pass
    assert new.get("real").alive and new.get("real").pid == real.pid
    metrics = {(s.name, tuple(s.labels.items())): s.value for s in new.metrics()}
    assert metrics[("aetherd_process_adoption_failures", ())] == 1
