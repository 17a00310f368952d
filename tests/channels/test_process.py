"""The process channel end to end: real processes, a real daemon on loopback, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import uuid
from typing import Any

import psutil
import pytest

from tests.conftest import TOKEN
from tests.support import (
    RawWebSocket,
    WsClient,
    aetherd_command,
    child_env,
    connect,
    read_port,
    wait_for,
    wait_ready,
)


def mine(process_id: str) -> Any:
    return lambda f: f.get("channel") == "process" and f.get("processId") == process_id


class Proc:
    """One socket's view of one process: output per stream, checked for gaps."""

    def __init__(self, client: WsClient, process_id: str) -> None:
        self.client = client
        self.id = process_id
        self.data: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.ends: dict[str, int | None] = {"stdout": None, "stderr": None}
        self.first: dict[str, int | None] = {"stdout": None, "stderr": None}
        self.frames: list[dict[str, Any]] = []

    def _take(self, frame: dict[str, Any]) -> None:
        stream = frame["stream"]
        raw = frame["data"].encode()
        if self.ends[stream] is None:
            self.first[stream] = frame["offset"]
        else:
            assert frame["offset"] == self.ends[stream], "gap or duplicate"
        self.ends[stream] = frame["offset"] + len(raw)
        self.data[stream] += raw
        self.frames.append(frame)

    async def until(self, stream: str, marker: bytes, timeout: float = 10) -> None:
        while marker not in self.data[stream]:
            frame = await self.client.expect(mine(self.id), timeout)
            assert frame["type"] == "output", f"{frame} before {marker!r}: {self.data}"
            self._take(frame)

    async def to_exit(self, timeout: float = 10) -> dict[str, Any]:
        for _ in range(100_000):
            frame = await self.client.expect(mine(self.id), timeout)
            if frame["type"] == "exit":
                return frame
            assert frame["type"] == "output", frame
            self._take(frame)
        raise AssertionError("no exit")


async def start(client: WsClient, **fields: Any) -> tuple[dict[str, Any], Proc]:
    """Send `start` and return its reply (which must come before any output) and a Proc.

    (A `timeout` field is passed through: this does not use `WsClient.request`.)"""
    process_id = fields.pop("processId", None) or "p-" + uuid.uuid4().hex[:8]
    request_id = uuid.uuid4().hex
    await client.send(
        {
            "channel": "process",
            "type": "start",
            "requestId": request_id,
            "processId": process_id,
            **fields,
        }
    )
    first = await client.expect(lambda f: f.get("requestId") == request_id or mine(process_id)(f))
    assert first.get("requestId") == request_id, f"output came before the reply: {first}"
    return first, Proc(client, process_id)


async def test_start_replies_first_then_streams_stdout_and_stderr_then_exit(daemon):
    client = await daemon.connect()
    reply, proc = await start(
        client, command="echo out1; echo err1 >&2; echo out2; printf 'é' >&2; exit 7"
    )
    assert reply["success"] is True
    assert reply["data"]["processId"] == proc.id and reply["data"]["pid"] > 0
    exit_ = await proc.to_exit()
    assert exit_["exitCode"] == 7 and exit_["signal"] is None and exit_["timedOut"] is False
    assert isinstance(exit_["durationMs"], int)
    assert proc.data == {"stdout": b"out1\nout2\n", "stderr": "err1\né".encode()}
    assert proc.first == {"stdout": 0, "stderr": 0}
    assert all(f["stream"] in ("stdout", "stderr") for f in proc.frames)


async def test_wait_true_is_one_call_exec_without_output_frames(daemon):
    client = await daemon.connect()
    reply = await client.request(
        "process",
        "start",
        processId="exec1",
        argv=["sh", "-c", "echo hello; echo oops >&2; exit 2"],
        wait=True,
    )
    data = reply["data"]
    assert data["processId"] == "exec1" and data["exitCode"] == 2 and data["signal"] is None
    assert (data["stdout"], data["stderr"], data["truncated"]) == ("hello\n", "oops\n", False)
    assert data["timedOut"] is False and data["durationMs"] >= 0
    listed = await client.request("process", "list")
    assert not [f for f in client.backlog if mine("exec1")(f)]
    [entry] = [p for p in listed["data"]["processes"] if p["processId"] == "exec1"]
    assert entry["exited"] and entry["exitCode"] == 2


async def test_wait_true_with_input_pipelined_behind_it(daemon):
    client = await daemon.connect()
    request_id = "exec-cat"
    await client.send(
        {
            "channel": "process",
            "type": "start",
            "requestId": request_id,
            "processId": "cat1",
            "argv": ["cat"],
            "stdin": True,
            "wait": True,
        }
    )
    # Sent before any reply: the process must already exist when this arrives.
    await client.send(
        {"channel": "process", "type": "input", "processId": "cat1", "data": "piped", "eof": True}
    )
    reply = await client.expect(lambda f: f.get("requestId") == request_id)
    assert reply["success"] is True, reply
    assert reply["data"]["stdout"] == "piped" and reply["data"]["exitCode"] == 0


async def test_wait_true_truncates_the_head_and_base64(start_daemon):
    daemon = await start_daemon(process_wait_output_bytes=2048)
    client = await daemon.connect()
    reply = await client.request(
        "process", "start", command="seq 1 3000", wait=True, processId="big"
    )
    data = reply["data"]
    assert data["truncated"] is True and data["stdout"].endswith("2999\n3000\n")
    assert len(data["stdout"].encode()) <= 2048
    raw = await client.request(
        "process", "start", command=r"printf '\377\000'", wait=True, encoding="base64"
    )
    assert base64.b64decode(raw["data"]["stdout"]) == b"\xff\x00"


async def test_input_eof_signal_attach_detach_reply_null(daemon):
    client = await daemon.connect()
    _, proc = await start(client, argv=["cat"], stdin=True)
    reply = await client.request("process", "input", processId=proc.id, data="abc")
    assert reply["success"] is True and reply["data"] is None
    await proc.until("stdout", b"abc")
    reply = await client.request("process", "detach", processId=proc.id)
    assert reply["success"] is True and reply["data"] is None
    reply = await client.request("process", "attach", processId=proc.id)
    assert reply["success"] is True and reply["data"] is None
    replay = Proc(client, proc.id)
    await replay.until("stdout", b"abc")
    assert replay.first["stdout"] == 0
    reply = await client.request("process", "input", processId=proc.id, data="", eof=True)
    assert reply["success"] is True
    exit_ = await replay.to_exit()
    assert exit_["exitCode"] == 0
    assert replay.data["stdout"] == b"abc"


async def test_signal_reaches_the_group_and_a_child_of_the_shell_dies_too(daemon):
    client = await daemon.connect()
    _, proc = await start(client, command="sleep 60 & echo $!; wait")
    await proc.until("stdout", b"\n")
    child = int(proc.data["stdout"])
    reply = await client.request("process", "signal", processId=proc.id, signal="SIGINT")
    assert reply["success"] is True
    exit_ = await proc.to_exit()
    assert exit_["signal"] == signal.SIGINT and exit_["exitCode"] is None

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as handle:
                return handle.read().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    await wait_for(gone, 5)
    # By number too.
    _, other = await start(client, command="sleep 60")
    reply = await client.request("process", "signal", processId=other.id, signal=9)
    assert reply["success"] is True
    assert (await other.to_exit())["signal"] == 9


async def test_timeout_sends_exit_with_timed_out(start_daemon):
    daemon = await start_daemon(process_kill_grace=0.3)
    client = await daemon.connect()
    _, proc = await start(client, command="trap '' TERM; while :; do sleep 0.05; done", timeout=0.2)
    exit_ = await proc.to_exit()
    assert exit_["timedOut"] is True and exit_["signal"] == signal.SIGKILL


async def test_resume_after_disconnect_gets_exactly_the_missed_bytes(daemon):
    first = await daemon.connect()
    _, proc = await start(first, argv=["cat"], stdin=True, processId="resumable")
    await first.request("process", "input", processId=proc.id, data="one\n")
    await proc.until("stdout", b"one\n")
    seen = proc.ends["stdout"]
    await first.close()
    other = await daemon.connect()
    await other.request("process", "input", processId=proc.id, data="two\n")
    await other.request("process", "input", processId=proc.id, data="three\n")
    await other.close()
    third = await daemon.connect()
    reply = await third.request(
        "process", "attach", processId=proc.id, resumeFrom={"stdout": seen, "stderr": 0}
    )
    assert reply["success"] is True
    resumed = Proc(third, proc.id)
    await resumed.until("stdout", b"three\n")
    assert resumed.first["stdout"] == seen == 4
    assert resumed.data["stdout"] == b"two\nthree\n"
    await third.request("process", "input", processId=proc.id, eof=True)
    assert (await resumed.to_exit())["exitCode"] == 0


async def test_an_exited_process_replays_then_sends_exit_and_is_listed(daemon):
    client = await daemon.connect()
    reply = await client.request(
        "process", "start", processId="done", command="echo a; echo b >&2; exit 4", wait=True
    )
    assert reply["data"]["exitCode"] == 4
    other = await daemon.connect()
    await other.request("process", "attach", processId="done")
    proc = Proc(other, "done")
    exit_ = await proc.to_exit()
    assert exit_["exitCode"] == 4
    assert proc.data == {"stdout": b"a\n", "stderr": b"b\n"}
    listed = await other.request("process", "list")
    [entry] = listed["data"]["processes"]
    assert entry["processId"] == "done" and entry["command"] == "echo a; echo b >&2; exit 4"
    assert entry["argv"] is None and entry["cwd"] == "/" and entry["exited"] is True
    assert entry["exitCode"] == 4 and entry["signal"] is None
    assert entry["startedAt"].endswith("Z") and entry["offsets"] == {"stdout": 2, "stderr": 2}


async def test_list_shows_running_processes_with_argv(daemon):
    client = await daemon.connect()
    _, proc = await start(client, argv=["sleep", "30"], cwd="/")
    listed = await client.request("process", "list")
    [entry] = listed["data"]["processes"]
    assert entry["argv"] == ["sleep", "30"] and entry["command"] is None
    assert entry["exited"] is False and entry["clients"] == 1 and entry["stdin"] is False
    await client.request("process", "signal", processId=proc.id, signal="SIGKILL")
    await proc.to_exit()


async def test_detached_socket_stops_receiving_and_the_process_keeps_running(daemon):
    client = await daemon.connect()
    _, proc = await start(client, argv=["cat"], stdin=True)
    await client.request("process", "detach", processId=proc.id)
    await client.request("process", "input", processId=proc.id, data="x", eof=True)
    await wait_for(lambda: daemon.daemon.services.processes.get(proc.id).state.exit is not None)
    await client.request("process", "list")  # a round trip after the exit
    assert not [f for f in client.backlog if mine(proc.id)(f)]


@pytest.mark.parametrize(
    ("type_", "fields", "code", "field"),
    [
        ("input", {"processId": "nope", "data": "x"}, "NOT_FOUND", None),
        ("signal", {"processId": "nope", "signal": "SIGINT"}, "NOT_FOUND", None),
        ("attach", {"processId": "nope"}, "NOT_FOUND", None),
        ("detach", {"processId": "nope"}, "NOT_FOUND", None),
        ("start", {"argv": ["echo", "a\u0000b"]}, "INVALID_MESSAGE", "argv"),
        ("start", {"command": "true", "cwd": "/../outside"}, "INVALID_PATH", None),
        ("start", {"command": "true", "argv": ["true"]}, "INVALID_MESSAGE", "argv"),
        ("start", {}, "INVALID_MESSAGE", "command"),
        ("start", {"command": "true", "timeout": "5"}, "INVALID_MESSAGE", "timeout"),
        ("start", {"command": "true", "processId": "a b"}, "INVALID_MESSAGE", "processId"),
        ("start", {"argv": ["/no/such/program"]}, "NOT_FOUND", None),
    ],
)
async def test_bad_input_gets_its_code_and_the_socket_stays_open(
    daemon, type_, fields, code, field
):
    client = await daemon.connect()
    request_id = uuid.uuid4().hex
    await client.send({"channel": "process", "type": type_, "requestId": request_id, **fields})
    reply = await client.expect(lambda f: f.get("requestId") == request_id)
    assert reply["success"] is False and reply["code"] == code, reply
    if field is not None:
        assert reply["field"] == field
    assert (await client.request("process", "list"))["success"] is True


async def test_input_without_stdin_and_bad_signal_names(daemon):
    client = await daemon.connect()
    _, proc = await start(client, command="sleep 30")
    reply = await client.request("process", "input", processId=proc.id, data="x")
    assert (reply["success"], reply["code"]) == (False, "INVALID_MESSAGE")
    for bad in ("SIGNOPE", "KILL", 0, 1000):
        reply = await client.request("process", "signal", processId=proc.id, signal=bad)
        assert (reply["code"], reply["field"]) == ("INVALID_MESSAGE", "signal"), bad
    reply = await client.request("process", "signal", processId=proc.id, signal="SIGTERM")
    assert reply["success"] is True
    await proc.to_exit()
    reply = await client.request("process", "signal", processId=proc.id, signal="SIGTERM")
    assert reply["code"] == "CONFLICT"
    assert (await client.request("process", "list"))["success"] is True


async def test_process_limit_over_the_socket(start_daemon):
    daemon = await start_daemon(process_max=1)
    client = await daemon.connect()
    _, proc = await start(client, command="sleep 30")
    reply = await client.request("process", "start", command="true")
    assert reply["code"] == "LIMIT_EXCEEDED" and reply["limit"] == 1
    await client.request("process", "signal", processId=proc.id, signal="SIGKILL")
    await proc.to_exit()
    reply = await client.request("process", "start", command="true", wait=True)
    assert reply["success"] is True


async def test_config_env_reaches_processes(daemon, workspace):
    (workspace / ".aether").mkdir()
    (workspace / ".aether" / "config.yaml").write_text("env:\n  FROM_CONFIG: yes-it-does\n")
    store = daemon.daemon.services.config
    await wait_for(lambda: store.current.env.get("FROM_CONFIG") == "yes-it-does", 10)
    client = await daemon.connect()
    reply = await client.request(
        "process", "start", command='echo "$FROM_CONFIG $MINE"', env={"MINE": "x"}, wait=True
    )
    assert reply["data"]["stdout"] == "yes-it-does x\n"


def _manager(daemon: Any) -> Any:
    return daemon.daemon.services.processes


async def test_many_runs_over_the_socket_leave_no_zombie_and_no_fd(start_daemon):
    daemon = await start_daemon(process_exited_retention=0.05)
    client = await daemon.connect()
    me = psutil.Process()
    await client.request("process", "start", command="true", wait=True)  # warm up
    await wait_for(lambda: not _manager(daemon).processes(), 5)
    await wait_for(lambda: _manager(daemon).background_tasks == 0, 5)
    fds_before = len(os.listdir("/proc/self/fd"))
    children_before = {c.pid for c in me.children()}
    for index in range(8):
        reply = await client.request(
            "process", "start", command=f"echo {index}; echo e >&2", wait=True
        )
        assert reply["data"]["stdout"] == f"{index}\n"
        _, proc = await start(client, argv=["cat"], stdin=True)
        await client.request("process", "input", processId=proc.id, data="x", eof=True)
        assert (await proc.to_exit())["exitCode"] == 0
    await wait_for(lambda: not _manager(daemon).processes(), 5)
    await wait_for(lambda: _manager(daemon).background_tasks == 0, 5)
    await wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds_before, 5)
    assert {c.pid for c in me.children()} == children_before  # every child reaped


@pytest.mark.slow
async def test_a_stalled_client_on_a_flooding_process_keeps_memory_bounded(start_daemon):
    daemon = await start_daemon(process_ring_bytes=256 * 1024)
    me = psutil.Process()
    stalled = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        stalled.send_text(
            json.dumps(
                {
                    "channel": "process",
                    "type": "start",
                    "processId": "flood",
                    "command": "exec yes 0123456789abcdef",
                }
            )
        )
        await wait_for(lambda: _manager(daemon).find("flood") is not None)
        flood = _manager(daemon).get("flood")
        rss_before = me.memory_info().rss
        target = 64 * 1024 * 1024
        other = await daemon.connect()
        peak = rss_before
        for _ in range(600):  # bounded: 600 waits of 0.05 s
            if _manager(daemon).output_bytes >= target:
                break
            peak = max(peak, me.memory_info().rss)
            await asyncio.sleep(0.05)
        assert _manager(daemon).output_bytes >= target
        # Another socket is served meanwhile.
        assert (await other.request("process", "list"))["success"] is True
        ring = flood.state.stdout.ring
        assert len(ring) <= 256 * 1024 and ring.end >= target
        peak = max(peak, me.memory_info().rss)
        assert peak - rss_before < 48 * 1024 * 1024, (peak - rss_before) / 2**20
        await other.request("process", "signal", processId="flood", signal="SIGKILL")
        await flood.wait()
    finally:
        stalled.close()


@pytest.mark.slow
async def test_processes_end_with_the_daemon(tmp_path, workspace):
    """A real `aetherd serve`: SIGTERM ends it, and every process group with it."""
    proc = subprocess.Popen(
        [*aetherd_command(), "serve", "--port", "0", "--root", str(workspace)],
        cwd=workspace,
        env=child_env(tmp_path, AETHERD_TOKEN=TOKEN, AETHERD_PROCESS_KILL_GRACE="0.5"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        port, _ = await asyncio.to_thread(read_port, proc)
        await wait_ready(port, proc)
        client = await connect(f"http://127.0.0.1:{port}/workspaces/local/ws", TOKEN)
        try:
            stubborn, out = await start(
                client, command="trap '' TERM; sleep 60 & echo $!; while :; do sleep 0.05; done"
            )
            await out.until("stdout", b"\n")
            pids += [stubborn["data"]["pid"], int(out.data["stdout"])]
            plain, _ = await start(client, argv=["sleep", "60"], stdin=True)
            pids.append(plain["data"]["pid"])
            assert all(psutil.pid_exists(pid) for pid in pids)
            proc.send_signal(signal.SIGTERM)
        finally:
            await client.close()
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    def ended(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await wait_for(lambda: all(ended(pid) for pid in pids), 5)


async def test_an_error_without_request_id_names_the_process_in_ref(daemon):
    client = await daemon.connect()
    await client.send({"channel": "process", "type": "signal", "processId": "ghost", "signal": 2})
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "NOT_FOUND"
    assert frame["ref"] == {"channel": "process", "type": "signal", "processId": "ghost"}
