"""Crash survival (PROTOCOL.md §14): a keeper holds the PTYs while the daemon is dead.

- under `aetherd init`: SIGKILL the daemon; init restarts it with the fds it kept, the
  shell keeps running, its output written meanwhile is there, its exit status comes
  from init (the shell is init's child now);
- under systemd's fd store, played by a fake notify socket in this test: it receives
  the fds (FDSTORE=1, SCM_RIGHTS) and hands them back to a restarted daemon through
  LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, as systemd does.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.support import aetherd_command, child_env, free_port, wait_for
from tests.test_reload import COUNTER, TOKEN, WAIT, Daemon, Stream, attach, numbers

PR_SET_CHILD_SUBREAPER = 36


def _record(data: Path) -> dict[str, Any]:
    try:
        return json.loads((data / "daemon.json").read_text())
    except (OSError, ValueError):
        return {}


async def _until_closed(ws: Any, stream: Stream, sid: str) -> None:
    """Read the socket until it ends (the daemon died), keeping `sid`'s output."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = await ws.ws.receive(timeout=WAIT)
        if msg.type is aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            if frame.get("sessionId") == sid and frame.get("type") == "output":
                stream.take(frame)
        else:
            return
    raise TimeoutError("socket never closed")


async def _connect(port: int) -> Any:
    from tests.support import connect

    return await connect(f"ws://127.0.0.1:{port}/workspaces/local/ws", TOKEN)


async def test_sigkill_under_init_keeps_the_shell_its_output_and_its_exit(tmp_path: Path):
    port = free_port()
    data, run, root = tmp_path / "data", tmp_path / "run", tmp_path / "root"
    root.mkdir()
    log = (tmp_path / "init.log").open("ab")
    argv = [
        *aetherd_command(), "init",
        "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, "--root", str(root),
        "--data-dir", str(data), "--runtime-dir", str(run), "--log-format", "json",
    ]  # fmt: skip
    init = subprocess.Popen(
        argv, cwd=tmp_path, env=child_env(tmp_path, HOME=str(tmp_path)), stdout=log, stderr=log
    )
    try:
        await wait_for(lambda: _record(data).get("pid") is not None, WAIT, 0.05)
        first = _record(data)["pid"]
        assert psutil.Process(first).ppid() == init.pid
        ws = await _connect(port)
        counter = await attach(ws, "counter", command=COUNTER)
        await attach(ws, "later", command="stty -echo; read x; echo got $x; exit 5")
        stream = Stream()
        await stream.until(ws, "counter", lambda s: len(numbers(s.text)) >= 5)

        os.kill(first, signal.SIGKILL)
        await _until_closed(ws, stream, "counter")
        await ws.session.close()
        await wait_for(lambda: _record(data).get("pid") not in (None, first), WAIT, 0.05)
        second = _record(data)["pid"]
        assert _record(data)["generation"] == 1 and psutil.Process(second).ppid() == init.pid
        # The shell lived through it; it is init's child now.
        assert psutil.Process(counter["pid"]).ppid() == init.pid

        ws = await _connect(port)
        reply = await attach(ws, "counter", resumeFrom=stream.end)
        assert reply["pid"] == counter["pid"] and reply["attached"] is True
        seen = numbers(stream.text)[-1]
        # Output written while no daemon ran waited in the PTY: no gap, no duplicate.
        await stream.until(ws, "counter", lambda s: numbers(s.text)[-1] >= seen + 10)
        got = numbers(stream.text)
        assert got == list(range(len(got)))

        later = Stream()
        await attach(ws, "later", resumeFrom=0)
        await ws.request("terminal", "input", sessionId="later", data="go\n")
        await later.until(ws, "later", lambda s: bool(s.closes))
        assert "got go" in later.text
        # init reaped the orphaned shell and forwarded its status.
        assert [(c["exitCode"], c["signal"]) for c in later.closes] == [(5, None)]
        await ws.close()
        init.send_signal(signal.SIGTERM)
        assert init.wait(WAIT) == 0
        assert not psutil.pid_exists(counter["pid"]) or (
            psutil.Process(counter["pid"]).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        if init.poll() is None:
            init.kill()
            init.wait(10)
        log.close()
    text = (tmp_path / "init.log").read_text()
    assert "restarting it with" in text
    assert '"level": "error"' not in text.lower()


class FakeSystemd:
    """The notify socket of a service manager with an fd store (FileDescriptorStoreMax)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.store: dict[str, int] = {}
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        size = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while not self._stop:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[: len(blob) - len(blob) % got.itemsize])
                    fds.extend(got)
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._lock:
                self.messages.append(text)
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1" and fds:
                    old = self.store.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.store[name] = fds.pop(0)
                elif fields.get("FDSTOREREMOVE") == "1":
                    old = self.store.pop(name, None)
                    if old is not None:
                        os.close(old)
            for fd in fds:
                os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.store)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()
        for fd in self.store.values():
            with contextlib.suppress(OSError):
                os.close(fd)


# Execs the daemon with the stored fds at 3.. and LISTEN_PID set to its own pid, as
# systemd does when it starts a service with a non-empty fd store.
EXEC_WITH_FDS = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2], LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"""


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0


async def test_fd_store_exchange_with_a_fake_systemd(tmp_path: Path):
    fake = FakeSystemd(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(fake.path), "FDSTORE": "16"}
    # Like PID 1 under systemd: the shells orphaned by the crash come to this process.
    _subreaper(True)
    first = Daemon(tmp_path, env=env)
    second: Daemon | None = None
    shell = 0
    try:
        await first.wait_ready()
        ws = await _connect(first.port)
        created = await attach(ws, "kept", command=COUNTER)
        shell = created["pid"]
        stream = Stream()
        await stream.until(ws, "kept", lambda s: len(numbers(s.text)) >= 5)
        await wait_for(lambda: len(fake.names()) == 2, WAIT)  # the socket and the PTY
        assert "listen" in fake.names()

        first.proc.kill()
        first.proc.wait(WAIT)
        await _until_closed(ws, stream, "kept")
        await ws.session.close()
        assert psutil.Process(shell).ppid() == os.getpid()

        with fake._lock:
            names = list(fake.store)
            fds = [fake.store[name] for name in names]
        cmd = [sys.executable, "-c", EXEC_WITH_FDS, ",".join(map(str, fds)), ":".join(names)]
        second = Daemon(tmp_path, env=env, wrap=cmd, port=first.port, pass_fds=tuple(fds))
        await second.wait_ready()
        ws = await _connect(second.port)
        reply = await attach(ws, "kept", resumeFrom=stream.end)
        assert reply["pid"] == shell
        seen = numbers(stream.text)[-1]
        await stream.until(ws, "kept", lambda s: numbers(s.text)[-1] >= seen + 10)
        got = numbers(stream.text)
        assert got == list(range(len(got)))
        assert second.info()["restoredSessions"] == 1
        # systemd does not forward exit statuses: the end is seen, the status is not.
        closed = await ws.request("terminal", "close", sessionId="kept")
        assert closed["data"]["exitCode"] is None and closed["data"]["signal"] is None
        await wait_for(lambda: fake.names() == ["listen"], WAIT)  # FDSTOREREMOVE
        await ws.close()
    finally:
        if shell:
            with contextlib.suppress(ProcessLookupError):
                os.kill(shell, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                await asyncio.to_thread(os.waitpid, shell, 0)
        _subreaper(False)
        first.stop()
        if second is not None:
            second.stop()
        fake.close()


async def test_under_init_a_reload_keeps_the_keeper_for_the_next_crash(tmp_path: Path):
    """SIGHUP to init is forwarded; the re-executed daemon still talks to init, so a
    session created after the reload survives a SIGKILL too."""
    port = free_port()
    data, root = tmp_path / "data", tmp_path / "root"
    root.mkdir()
    log = (tmp_path / "init.log").open("ab")
    argv = [
        *aetherd_command(), "init",
        "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, "--root", str(root),
        "--data-dir", str(data), "--runtime-dir", str(tmp_path / "run"), "--log-format", "json",
    ]  # fmt: skip
    init = subprocess.Popen(
        argv, cwd=tmp_path, env=child_env(tmp_path, HOME=str(tmp_path)), stdout=log, stderr=log
    )
    try:
        await wait_for(lambda: _record(data).get("pid") is not None, WAIT, 0.05)
        daemon_pid = _record(data)["pid"]
        ws = await _connect(port)
        await attach(ws, "before", command="exec cat")
        await ws.close()
        init.send_signal(signal.SIGHUP)
        await wait_for(lambda: _record(data).get("generation") == 1, WAIT, 0.05)
        assert _record(data)["pid"] == daemon_pid  # a reload, not a restart
        ws = await _connect(port)
        await attach(ws, "after", command="exec cat")
        await ws.close()
        os.kill(daemon_pid, signal.SIGKILL)
        await wait_for(lambda: _record(data).get("generation") == 2, WAIT, 0.05)
        ws = await _connect(port)
        listed = await ws.request("terminal", "list")
        assert sorted(s["sessionId"] for s in listed["data"]["sessions"]) == ["after", "before"]
        await ws.close()
        # A reload after the crash: the shells (init's children now) are handed over as
        # such, and init still reports their exit status.
        init.send_signal(signal.SIGHUP)
        await wait_for(lambda: _record(data).get("generation") == 3, WAIT, 0.05)
        ws = await _connect(port)
        ended = Stream()
        await attach(ws, "before", resumeFrom=0)
        await ws.request("terminal", "input", sessionId="before", data="\x04")
        await ended.until(ws, "before", lambda s: bool(s.closes))
        assert [(c["exitCode"], c["signal"]) for c in ended.closes] == [(0, None)]
        await ws.close()
        init.send_signal(signal.SIGTERM)
        assert init.wait(WAIT) == 0
    finally:
        if init.poll() is None:
            init.kill()
            init.wait(10)
        log.close()


async def test_processes_do_not_outlive_a_crash_the_restarted_daemon_ends_them(tmp_path: Path):
    """The process channel's processes are handed over by a reload, not kept through a
    crash (no keeper holds their pipes). What happens, as docs/operations.md says: one
    that writes dies of SIGPIPE; the restarted daemon ends every group the dead daemon
    left running (a silent one, a background child), and none of them is listed."""
    port = free_port()
    data, run, root = tmp_path / "data", tmp_path / "run", tmp_path / "root"
    root.mkdir()
    log_path = tmp_path / "init.log"
    log = log_path.open("ab")
    argv = [
        *aetherd_command(), "init",
        "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, "--root", str(root),
        "--data-dir", str(data), "--runtime-dir", str(run), "--log-format", "json",
    ]  # fmt: skip
    init = subprocess.Popen(
        argv, cwd=tmp_path, env=child_env(tmp_path, HOME=str(tmp_path)), stdout=log, stderr=log
    )
    try:
        await wait_for(lambda: _record(data).get("pid") is not None, WAIT, 0.05)
        first = _record(data)["pid"]
        ws = await _connect(port)
        pids: dict[str, int] = {}
        for process_id, command in (
            ("silent", "exec sleep 1000"),
            ("writer", "while :; do echo x; sleep 0.05; done"),
            ("group", "sleep 1000 & echo started; wait"),
        ):
            reply = await ws.request("process", "start", processId=process_id, command=command)
            assert reply["success"] is True, reply
            pids[process_id] = reply["data"]["pid"]
        await ws.expect(lambda f: f.get("processId") == "group" and "started" in f.get("data", ""))
        members = [p.pid for p in psutil.Process(pids["group"]).children()]
        assert len(members) == 1  # the background sleep, in the same process group

        os.kill(first, signal.SIGKILL)
        for _ in range(100_000):  # until the socket ends
            msg = await ws.ws.receive(timeout=WAIT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
        await ws.session.close()
        await wait_for(lambda: _record(data).get("pid") not in (None, first), WAIT, 0.05)

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        everyone = [*pids.values(), *members]
        await wait_for(lambda: all(gone(pid) for pid in everyone), WAIT, 0.05)
        ws = await _connect(port)
        assert (await ws.request("process", "list"))["data"]["processes"] == []
        reply = await ws.request("process", "attach", processId="silent")
        assert reply["success"] is False and reply["code"] == "NOT_FOUND", reply
        await ws.close()
        lines = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if "left running by a daemon that died" in line
        ]
        assert len(lines) == 1 and "silent" in lines[0]["msg"] and "group" in lines[0]["msg"]
        assert list((run / "processes").iterdir()) == []  # no record left behind
        init.send_signal(signal.SIGTERM)
        assert init.wait(WAIT) == 0
    finally:
        if init.poll() is None:
            init.kill()
            init.wait(10)
        log.close()
