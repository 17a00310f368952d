"""Reload (PROTOCOL.md §14): a real daemon re-executes itself on SIGHUP / `aetherd reload`.

Every test runs `aetherd serve` as a real process with real PTY sessions, and checks
what a user sees: same pid, same sessions, the exact bytes across the reload.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support import (
    WsClient,
    aetherd_command,
    child_env,
    connect,
    free_port,
    run_cli,
    wait_for,
)

TOKEN = "reload-token-0123456789"
COUNTER = 'i=0; while :; do echo "n=$i"; i=$((i+1)); sleep 0.05; done'
WAIT = 30.0


class Daemon:
    """`aetherd serve` in a child process; its JSON log goes to a file."""

    def __init__(
        self,
        tmp: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        port: int | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.root = tmp / "root"
        self.root.mkdir(exist_ok=True)
        self.data = tmp / "data"
        self.run = tmp / "run"
        self.log_path = tmp / "daemon.log"
        self.env = child_env(tmp, HOME=str(tmp), **(env or {}))
        argv = [
            *(wrap or []),
            *aetherd_command(),
            "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--token", TOKEN,
            "--root", str(self.root),
            "--data-dir", str(self.data),
            "--runtime-dir", str(self.run),
            "--log-format", "json",
            "--terminal-shell", "bash",
            *extra,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=tmp, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=self._log, pass_fds=pass_fds,
        )  # fmt: skip
        self.pid = self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/workspaces/local/ws"

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line, "level": "raw"})
        return out

    def logged(self, pattern: str) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if re.search(pattern, str(e.get("msg", "")))]

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    async def wait_ready(self) -> None:
        assert self.proc.poll() is None, "daemon exited"
        await wait_for(lambda: self.proc.poll() is None and self.ready(), WAIT, 0.05)

    def info(self) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/workspaces/local/info",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def generation(self) -> int:
        try:
            return int(json.loads((self.data / "daemon.json").read_text())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    async def reload(self) -> None:
        """SIGHUP, then wait until the next generation serves."""
        before = self.generation()
        os.kill(self.pid, signal.SIGHUP)
        await wait_for(lambda: self.generation() > before, WAIT, 0.05)
        await self.wait_ready()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def daemon(tmp_path: Path):
    started: list[Daemon] = []

    def start(*extra: str, **kwargs: Any) -> Daemon:
        d = Daemon(tmp_path, *extra, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        errors = [e for e in d.log_lines() if e.get("level") in ("ERROR", "CRITICAL")]
        assert not errors, errors


async def open_ws(d: Daemon) -> WsClient:
    return await connect(d.ws_url, TOKEN)


async def attach(ws: WsClient, session_id: str, **fields: Any) -> dict[str, Any]:
    reply = await ws.request("terminal", "create", sessionId=session_id, **fields)
    assert reply["success"] is True, reply
    return reply["data"]


class Stream:
    """The output of one session on one socket: bytes by offset, checked contiguous."""

    def __init__(self) -> None:
        self.text = ""
        self.end: int | None = None
        self.closes: list[dict[str, Any]] = []

    def take(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "close":
            self.closes.append(frame)
            return
        offset, data = frame["offset"], frame["data"]
        if self.end is not None:
            assert offset == self.end, f"gap or overlap: expected {self.end}, got {offset}"
            assert not frame.get("truncated"), frame
        self.text += data
        self.end = offset + len(data.encode())

    async def until(self, ws: WsClient, sid: str, pred, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"stream never matched; tail={self.text[-200:]!r}")
            frame = await ws.expect(
                lambda f: (
                    f.get("channel") == "terminal"
                    and f.get("type") in ("output", "close")
                    and f.get("sessionId") == sid
                ),
                remaining,
            )
            self.take(frame)


class PStream:
    """The output of one process on one socket: bytes per stream, checked contiguous."""

    def __init__(self, process_id: str) -> None:
        self.id = process_id
        self.data = {"stdout": "", "stderr": ""}
        self.ends: dict[str, int] = {"stdout": 0, "stderr": 0}
        self.exits: list[dict[str, Any]] = []

    def mine(self, frame: dict[str, Any]) -> bool:
        return frame.get("channel") == "process" and frame.get("processId") == self.id

    def take(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "exit":
            self.exits.append(frame)
            return
        assert frame.get("type") == "output", frame
        stream, offset, data = frame["stream"], frame["offset"], frame["data"]
        assert offset == self.ends[stream], f"{stream}: expected {self.ends[stream]}, got {offset}"
        assert not frame.get("truncated"), frame
        self.data[stream] += data
        self.ends[stream] = offset + len(data.encode())

    async def until(self, ws: WsClient, pred, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.id} never matched; {self.data!r} {self.exits}")
            self.take(await ws.expect(self.mine, remaining))


async def read_until_closed(ws: WsClient, streams: list[PStream]) -> int | None:
    """Keep the process frames in flight until the socket closes; its close code."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        msg = await ws.ws.receive(timeout=WAIT)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return ws.ws.close_code
        frame = json.loads(msg.data)
        for stream in streams:
            if stream.mine(frame):
                stream.take(frame)
    raise TimeoutError("socket never closed")


def path_env(tmp_path: Path, directory: Path) -> dict[str, str]:
    """PYTHONPATH with `directory` (created) first: where a "new version" gets installed."""
    directory.mkdir()
    return {"PYTHONPATH": f"{directory}{os.pathsep}{child_env(tmp_path)['PYTHONPATH']}"}


def metric(d: Daemon, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", d.metrics(), re.M)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


def numbers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"n=(\d+)", text)]


async def closed_with(ws: WsClient, timeout: float = WAIT) -> int | None:
    """Read until the socket closes; its close code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await ws.ws.receive(timeout=deadline - time.monotonic())
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
            return ws.ws.close_code or msg.data
        if msg.type is aiohttp.WSMsgType.CLOSED:
            return ws.ws.close_code
    raise TimeoutError("socket never closed")


async def test_sighup_keeps_pid_session_and_every_byte(daemon):
    d = daemon()
    await d.wait_ready()
    ws = await open_ws(d)
    created = await attach(ws, "counter", command=COUNTER)
    shell_pid = created["pid"]
    stream = Stream()
    await stream.until(ws, "counter", lambda s: len(numbers(s.text)) >= 5)
    info = d.info()
    assert info["generation"] == 0 and info["restoredSessions"] == 0

    os.kill(d.pid, signal.SIGHUP)
    # Frames already in flight may precede the close: keep them (they are the stream).
    code = None
    deadline = time.monotonic() + WAIT
    while code is None and time.monotonic() < deadline:
        msg = await ws.ws.receive(timeout=WAIT)
        if msg.type is aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            if frame.get("channel") == "terminal" and frame.get("sessionId") == "counter":
                stream.take(frame)
        else:
            code = ws.ws.close_code
    assert code == 1012
    await ws.session.close()
    seen_before = numbers(stream.text)[-1]

    await d.wait_ready()
    assert d.proc.poll() is None and d.generation() == 1
    ws = await open_ws(d)
    reply = await attach(ws, "counter", resumeFrom=stream.end)
    assert reply["attached"] is True and reply["pid"] == shell_pid
    await stream.until(ws, "counter", lambda s: numbers(s.text)[-1] >= seen_before + 10)
    got = numbers(stream.text)
    assert got == list(range(len(got))), "the counter has a gap or a duplicate"
    info = d.info()
    assert info["generation"] == 1 and info["restoredSessions"] == 1
    assert "startedAt" in info
    assert metric(d, "aetherd_terminal_adopted_sessions_total") == 1
    # The same process: pid, and the shell is still its child.
    with open(f"/proc/{shell_pid}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) == d.pid
    assert d.logged("reloaded: generation 1, 1 terminal sessions adopted")
    # The state file was read once and removed.
    assert list(d.run.glob("handover-*")) == []
    await ws.close()


async def test_aetherd_reload_cli(daemon, tmp_path: Path):
    d = daemon()
    await d.wait_ready()
    result = await asyncio.to_thread(run_cli, tmp_path, "reload", "--data-dir", str(d.data))
    assert result.returncode == 0, result.stderr
    assert f"reloaded (pid {d.pid}, generation 1)" in result.stdout
    assert d.proc.poll() is None
    await d.wait_ready()
    # No daemon behind a data dir: a clear error.
    missing = await asyncio.to_thread(
        run_cli, tmp_path, "reload", "--data-dir", str(tmp_path / "nowhere")
    )
    assert missing.returncode == 1 and "no running daemon" in missing.stderr


async def test_bad_settings_refuse_the_reload_and_the_old_daemon_serves(daemon, tmp_path: Path):
    settings = tmp_path / "aetherd.yaml"
    settings.write_text("ping_interval: 45\n")
    d = daemon("--settings", str(settings))
    await d.wait_ready()
    ws = await open_ws(d)
    await attach(ws, "s1", command="echo ready; exec cat")
    await ws.expect(lambda f: "ready" in f.get("data", ""))
    settings.write_text("ping_interval: -1\n")
    result = await asyncio.to_thread(run_cli, tmp_path, "reload", "--data-dir", str(d.data))
    assert result.returncode == 1
    assert "reload refused" in result.stderr and "ping_interval" in result.stderr
    # The old process still serves the same socket and session.
    assert d.logged("reload refused, still serving")
    await ws.send({"channel": "terminal", "type": "input", "sessionId": "s1", "data": "still\n"})
    await ws.expect(lambda f: "still" in f.get("data", ""))
    assert d.generation() == 0 and d.ready()
    assert metric(d, "aetherd_reloads_refused_total") == 1
    # Fixed settings: the next reload goes through.
    settings.write_text("ping_interval: 45\n")
    await d.reload()
    assert d.generation() == 1
    await ws.session.close()


async def test_new_code_that_does_not_import_is_refused(daemon, tmp_path: Path):
    poison = tmp_path / "poison"
    d = daemon(env=path_env(tmp_path, poison))
    await d.wait_ready()
    # A "new version" installed on the path that fails to import.
    (poison / "aetherd").mkdir()
    (poison / "aetherd" / "__init__.py").write_text("raise ImportError('poisoned build')\n")
    os.kill(d.pid, signal.SIGHUP)
    await wait_for(lambda: bool(d.logged("reload refused")), WAIT)
    assert "poisoned build" in d.logged("reload refused")[0]["msg"]
    assert d.proc.poll() is None and d.ready() and d.generation() == 0


async def test_unchanged_code_is_not_checked_in_a_child_new_code_is(daemon, tmp_path: Path):
    """The check's child (a whole import) runs only when a file of the code changed."""
    installed = tmp_path / "installed"
    d = daemon(env=path_env(tmp_path, installed))
    await d.wait_ready()
    # A first start may write __pycache__ directories (a cold cache): a directory changed
    # after the start is not trusted, so that reload may check in a child. Not after it.
    await d.reload()
    await d.reload()
    record = json.loads((d.data / "daemon.json").read_text())
    assert record["lastCheck"] == "settings"
    assert d.logged("reload check: the code is unchanged")
    # "Install" something: a new file in a directory on the daemon's sys.path.
    (installed / "new_module.py").write_text("VALUE = 1\n")
    await d.reload()
    assert json.loads((d.data / "daemon.json").read_text())["lastCheck"] == "child"
    # The new process fingerprints what it runs now: the next reload is light again.
    await d.reload()
    assert json.loads((d.data / "daemon.json").read_text())["lastCheck"] == "settings"
    assert len(d.logged("reload check: the code is unchanged")) >= 2


async def test_connecting_during_the_reload_is_not_refused(daemon):
    d = daemon()
    await d.wait_ready()
    os.kill(d.pid, signal.SIGHUP)
    # Keep connecting through the whole reload: none may be refused.
    statuses = []
    deadline = time.monotonic() + WAIT
    while d.generation() < 1 and time.monotonic() < deadline:

        def probe() -> int:
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head = sock.recv(64)
            return int(head.split()[1])

        statuses.append(await asyncio.to_thread(probe))  # ConnectionRefusedError fails it
    assert d.generation() == 1
    assert statuses and set(statuses) == {200}


async def test_a_session_exiting_during_the_reload_reports_its_exit_once(daemon):
    d = daemon()
    await d.wait_ready()
    ws = await open_ws(d)
    # Exits exactly while the daemon is between processes: once the state is written.
    wait_then_exit = (
        f"echo waiting; while ! ls {d.run}/handover-*.json >/dev/null 2>&1; do sleep 0.005; done; "
        "echo bye; exit 7"
    )
    await attach(ws, "exiting", command=wait_then_exit)
    # Another one exits before the reload, with nobody attached: handed over exited. It
    # waits for its detach (a session that exits while attached is told and forgotten).
    release = d.run / "release-done"
    await attach(
        ws,
        "done",
        command=f"while ! [ -e {release} ]; do sleep 0.005; done; echo finished; exit 3",
    )
    await ws.request("terminal", "detach", sessionId="done")
    release.touch()

    deadline = time.monotonic() + WAIT
    while True:  # bounded by WAIT
        listed = (await ws.request("terminal", "list"))["data"]["sessions"]
        if any(s["sessionId"] == "done" and s["exited"] for s in listed):
            break
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.02)
    stream = Stream()
    await stream.until(ws, "exiting", lambda s: "waiting" in s.text)
    await d.reload()
    await ws.session.close()

    ws = await open_ws(d)
    await attach(ws, "exiting", resumeFrom=stream.end)
    await stream.until(ws, "exiting", lambda s: bool(s.closes))
    assert "bye" in stream.text
    assert [(c["exitCode"], c["signal"]) for c in stream.closes] == [(7, None)]
    done = Stream()
    await attach(ws, "done")
    await done.until(ws, "done", lambda s: bool(s.closes))
    assert "finished" in done.text and done.closes[0]["exitCode"] == 3
    # Told once: the sessions are gone, nobody can be told again.
    listed = await ws.request("terminal", "list")
    ids = [s["sessionId"] for s in listed["data"]["sessions"]]
    assert "exiting" not in ids and "done" not in ids
    assert len(d.logged("terminal session ended")) == 2  # one per session, across both
    await ws.close()


async def test_input_flooded_during_the_reload_is_kept_in_order(daemon, tmp_path: Path):
    d = daemon()
    await d.wait_ready()
    out = d.root / "typed.txt"
    ws = await open_ws(d)
    await attach(ws, "sink", command=f"stty -echo; echo ready; exec cat > {out}")
    await ws.expect(lambda f: "ready" in f.get("data", ""))
    acked: list[int] = []
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for i in range(100_000):
            try:
                await ws.send(
                    {"channel": "terminal", "type": "input", "sessionId": "sink",
                     "data": f"line-{i}\n", "requestId": f"in-{i}"}
                )  # fmt: skip
            except (ConnectionError, RuntimeError):
                return
            sent = i + 1
            await asyncio.sleep(0)

    async def acks() -> None:
        for _ in range(1_000_000):  # ends when the socket closes (1012)
            msg = await ws.ws.receive(timeout=WAIT)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(msg.data)
            rid = frame.get("requestId", "")
            if rid.startswith("in-") and frame.get("success"):
                acked.append(int(rid[3:]))

    reader = asyncio.ensure_future(acks())
    writer = asyncio.ensure_future(flood())
    await wait_for(lambda: len(acked) >= 200, WAIT)
    before = d.generation()
    os.kill(d.pid, signal.SIGHUP)
    await asyncio.wait_for(reader, WAIT)  # the socket closed (1012)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    # 1012, or 1006 when the flood's backlog of replies outlasted the 2 s close handshake
    # and the reset took the queued close frame with it (protocol.md, section 14, "Limit").
    assert ws.ws.close_code in (1012, 1006)
    await ws.session.close()
    await wait_for(lambda: d.generation() > before, WAIT)
    await d.wait_ready()
    ws = await open_ws(d)
    await attach(ws, "sink")
    await ws.request("terminal", "input", sessionId="sink", data="END\n")
    await wait_for(lambda: out.exists() and "END" in out.read_text(), WAIT)
    lines = out.read_text().split("\n")
    assert lines[-2:] == ["END", ""]
    got = [int(line[5:]) for line in lines[:-2]]
    # Every acknowledged line arrived, once, in order; nothing was invented.
    assert got == list(range(len(got)))
    assert acked and max(acked) < len(got) <= sent
    await ws.close()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _footprint(pid: int) -> tuple[int, int, list[int]]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return fds, maps, sorted(_children(pid))


def _file_maps(pid: int) -> int:
    """Mappings of files (ring mirrors, libraries): anonymous ones (thread stacks, malloc
    arenas) come and go with the executors' threads, so only the total is bounded."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if len(fields := line.split()) > 5 and fields[5][0] == "/")


RELOADS = int(os.environ.get("AETHERD_TEST_RELOADS", "10"))


async def test_reloads_in_a_row_leak_no_fd_mapping_or_process(daemon):
    """RELOADS reloads (10 in CI; bench/reload.py --leaks runs 100): the footprint stays."""
    d = daemon()
    await d.wait_ready()
    ws = await open_ws(d)
    await attach(ws, "a", command=COUNTER)
    await attach(ws, "b", command="exec cat")
    reply = await ws.request("process", "start", processId="p", argv=["cat"], stdin=True)
    assert reply["success"] is True, reply
    await ws.close()
    await d.reload()
    first = _footprint(d.pid)
    first_files = _file_maps(d.pid)
    first_kinds = _fd_kinds(d.pid)
    assert len(first[2]) == 3  # the two shells and the process, nothing else
    for _ in range(RELOADS):
        await d.reload()
    assert d.proc.poll() is None and d.generation() == RELOADS + 1
    kinds = _fd_kinds(d.pid)
    assert kinds.get("/dev/ptmx") == first_kinds.get("/dev/ptmx") == 2, kinds
    assert kinds.get("anon_inode") == first_kinds.get("anon_inode"), kinds  # pidfds, epoll
    assert kinds.get("pipe") == first_kinds.get("pipe"), kinds  # the process's 3 pipes
    # Connections of the readiness probes close a moment later: wait for them, bounded.
    await wait_for(lambda: _footprint(d.pid)[0] <= first[0], 10)
    _, maps, kids = _footprint(d.pid)
    assert kids == first[2]
    assert _file_maps(d.pid) <= first_files + 2, (_file_maps(d.pid), first_files)
    # Thread stacks and arenas vary with a few threads (2 mappings each); a leak of two
    # anonymous mappings per reload (20 over 10) still fails.
    assert maps <= first[1] + 16, (maps, first[1])
    ws = await open_ws(d)
    stream = Stream()
    await attach(ws, "a", resumeFrom=0)
    await stream.until(ws, "a", lambda s: len(numbers(s.text)) > 3)
    got = numbers(stream.text)
    assert got == list(range(got[0], got[0] + len(got)))
    # The process went through every reload too: its stdin is the same pipe.
    proc = PStream("p")
    assert (await ws.request("process", "attach", processId="p"))["success"]
    assert (await ws.request("process", "input", processId="p", data="hi\n", eof=True))["success"]
    await proc.until(ws, lambda s: bool(s.exits))
    assert proc.data["stdout"] == "hi\n" and proc.exits[0]["exitCode"] == 0
    await ws.close()


async def test_unreadable_state_is_a_clean_restart_with_one_line(daemon, tmp_path: Path):
    """A new version that cannot read the state: one line, sessions and processes ended
    and reaped."""
    newer = tmp_path / "newer"
    d = daemon(env=path_env(tmp_path, newer))
    await d.wait_ready()
    ws = await open_ws(d)
    created = await attach(ws, "old", command="exec cat")
    started = await ws.request("process", "start", processId="old", argv=["sleep", "1000"])
    assert started["success"] is True, started
    await ws.close()
    # "Install" a version that reads only state version 2.
    (newer / "sitecustomize.py").write_text(
        "import aetherd.services.handover as h\nh.HANDOVER_VERSION = 3\nh.READS = (3,)\n"
    )
    await d.reload()
    lines = d.logged("handover state version")
    assert len(lines) == 1 and "starting clean" in lines[0]["msg"]
    assert lines[0]["level"] == "warning"
    await wait_for(lambda: _children(d.pid) == [], WAIT)  # the shell was ended and reaped
    assert not psutil.pid_exists(created["pid"])
    assert not psutil.pid_exists(started["data"]["pid"])  # the process too
    ws = await open_ws(d)
    listed = await ws.request("terminal", "list")
    assert listed["data"]["sessions"] == []
    assert (await ws.request("process", "list"))["data"]["processes"] == []
    assert d.info()["restoredSessions"] == 0 and d.info()["generation"] == 1
    await ws.close()


BOTH = 'i=0; while :; do echo "n=$i"; echo "e=$i" >&2; i=$((i+1)); sleep 0.05; done'


async def test_processes_keep_running_across_a_reload_and_lose_no_byte(daemon):
    """Process channel (section 10) across a reload: same pid, both rings and their
    offsets, stdin, an exit during the reload and one before it, each reported once."""
    d = daemon()
    await d.wait_ready()
    ws = await open_ws(d)
    counter = PStream("counter")
    started = await ws.request("process", "start", processId="counter", command=BOTH)
    assert started["success"] is True, started
    pid = started["data"]["pid"]
    cat = PStream("cat")
    reply = await ws.request("process", "start", processId="cat", argv=["cat"], stdin=True)
    assert reply["success"] is True, reply
    assert (await ws.request("process", "input", processId="cat", data="one\n"))["success"]
    await cat.until(ws, lambda s: s.data["stdout"] == "one\n")
    # Exits exactly while the daemon is between processes: once the state is written.
    exiting = PStream("exiting")
    wait_then_exit = (
        f"echo waiting; while ! ls {d.run}/handover-*.json >/dev/null 2>&1; do sleep 0.005; "
        "done; echo bye; echo gone >&2; exit 7"
    )
    reply = await ws.request("process", "start", processId="exiting", command=wait_then_exit)
    assert reply["success"] is True, reply
    await exiting.until(ws, lambda s: "waiting" in s.data["stdout"])
    # Ended before the reload, with nobody attached: handed over exited, told once later.
    reply = await ws.request("process", "start", processId="done", command="echo fin; exit 3")
    assert reply["success"] is True, reply
    await ws.request("process", "detach", processId="done")
    # Killed by its timeout in the new generation: the deadline is handed over.
    # (Sent by hand: `WsClient.request` takes `timeout` for itself.)
    await ws.send(
        {"channel": "process", "type": "start", "requestId": "slow", "processId": "slow",
         "argv": ["sleep", "100"], "timeout": 6}
    )  # fmt: skip
    assert (await ws.expect(lambda f: f.get("requestId") == "slow"))["success"]
    await counter.until(ws, lambda s: len(numbers(s.data["stdout"])) >= 5)

    os.kill(d.pid, signal.SIGHUP)
    assert await read_until_closed(ws, [counter, cat, exiting]) == 1012
    await ws.session.close()
    assert not exiting.exits, "the exit came before the reload: the test raced"
    await wait_for(lambda: d.generation() >= 1, WAIT)
    await d.wait_ready()

    ws = await open_ws(d)
    listed = await ws.request("process", "list")
    by_id = {p["processId"]: p for p in listed["data"]["processes"]}
    assert by_id["counter"]["pid"] == pid and by_id["counter"]["exited"] is False
    assert by_id["counter"]["command"] == BOTH
    for stream in (counter, cat, exiting):
        reply = await ws.request(
            "process", "attach", processId=stream.id, resumeFrom=dict(stream.ends)
        )
        assert reply["success"] is True, reply
    seen = numbers(counter.data["stdout"])[-1]
    await counter.until(ws, lambda s: numbers(s.data["stdout"])[-1] >= seen + 10)
    await counter.until(ws, lambda s: s.data["stderr"].count("\n") >= seen + 10)
    got = numbers(counter.data["stdout"])
    assert got == list(range(len(got))), "stdout has a gap or a duplicate"
    errs = [int(m) for m in re.findall(r"e=(\d+)", counter.data["stderr"])]
    assert errs == list(range(len(errs))), "stderr has a gap or a duplicate"
    # stdin carries on: the same pipe, the same cat.
    reply = await ws.request("process", "input", processId="cat", data="two\n", eof=True)
    assert reply["success"] is True, reply
    await cat.until(ws, lambda s: bool(s.exits))
    assert cat.data["stdout"] == "one\ntwo\n" and cat.exits[0]["exitCode"] == 0
    # The exit during the reload: the output written meanwhile, then the exit, once.
    await exiting.until(ws, lambda s: bool(s.exits))
    assert exiting.data == {"stdout": "waiting\nbye\n", "stderr": "gone\n"}
    assert [(e["exitCode"], e["signal"]) for e in exiting.exits] == [(7, None)]
    done = PStream("done")
    assert (await ws.request("process", "attach", processId="done"))["success"]
    await done.until(ws, lambda s: bool(s.exits))
    assert done.data["stdout"] == "fin\n" and done.exits[0]["exitCode"] == 3
    slow = PStream("slow")
    assert (await ws.request("process", "attach", processId="slow"))["success"]
    await slow.until(ws, lambda s: bool(s.exits))
    assert slow.exits[0]["timedOut"] is True and slow.exits[0]["signal"] == signal.SIGTERM
    # Still this daemon's child (the same process after execv), adopted and counted.
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) == d.pid
    assert metric(d, "aetherd_process_adopted_total") == 5
    assert d.logged("reloaded: generation 1, 0 terminal sessions adopted, 5 processes adopted")
    # Each exit was logged once, across both generations.
    ended = [e for e in d.log_lines() if e.get("msg") == "process ended"]
    assert sorted(e["processId"] for e in ended) == ["cat", "done", "exiting", "slow"]
    await ws.request("process", "signal", processId="counter", signal="SIGKILL")
    await counter.until(ws, lambda s: bool(s.exits))
    await ws.close()
