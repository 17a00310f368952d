"""The ACP connection and backend declarations, without a daemon.

`AcpConnection` runs real child processes (small Python programs) and speaks
JSON-RPC with them on real pipes.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from aetherd.agent.acp import AcpClosed, AcpConnection, AcpError, StderrRing
from aetherd.agent.backends import spec_from_command, spec_from_config
from aetherd.cli import build_parser
from aetherd.errors import SettingsError
from aetherd.settings import load_settings

ECHO = r"""
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("method") == "echo":
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": msg["params"]}), flush=True)
    elif msg.get("method") == "fail":
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                          "error": {"code": -32000, "message": "nope"}}), flush=True)
    elif msg.get("method") == "ask":
        print(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "client/thing",
                          "params": {"x": 1}}), flush=True)
        reply = json.loads(sys.stdin.readline())
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": reply}), flush=True)
    elif msg.get("method") == "exit":
        sys.stderr.write("bye\n")
        sys.exit(4)
"""


def connection(**overrides: Any) -> tuple[AcpConnection, list[tuple[str, Any]]]:
    notes: list[tuple[str, Any]] = []

    async def on_request(method: str, params: Any) -> Any:
        if method == "client/thing":
            return {"got": params}
        raise AcpError(-32601, "no")

    values: dict[str, Any] = {
        "max_line": 4096,
        "stderr_bytes": 1024,
        "max_requests": 4,
        "write_timeout": 5,
    }
    values.update(overrides)
    conn = AcpConnection("test", on_request, lambda m, p: notes.append((m, p)), **values)
    return conn, notes


async def test_requests_errors_incoming_requests_and_exit(tmp_path):
    conn, _ = connection()
    await conn.start([sys.executable, "-c", ECHO], {"PATH": "/usr/bin:/bin"}, str(tmp_path))
    try:
        assert await conn.request("echo", {"a": [1, "é"]}, timeout=10) == {"a": [1, "é"]}
        with pytest.raises(AcpError) as err:
            await conn.request("fail", {}, timeout=10)
        assert err.value.code == -32000 and err.value.message == "nope"
        # The agent asks us something in the middle of our request.
        reply = await conn.request("ask", {}, timeout=10)
        assert reply == {"jsonrpc": "2.0", "id": 7, "result": {"got": {"x": 1}}}
        with pytest.raises(AcpClosed) as closed:
            await conn.request("exit", {}, timeout=10)
        assert "exited with code 4" in str(closed.value) and "bye" in str(closed.value)
        assert not conn.alive
    finally:
        await conn.stop(1)


FLOOD = r"""
import os, sys, json
block = b"x" * 65536
for _ in range(int(sys.argv[1])):
    os.write(1, block)           # one endless line on stdout
    os.write(2, block)
os.write(1, b"\nnot json\n[1]\n")
os.write(1, json.dumps({"jsonrpc": "2.0", "method": "note", "params": 1}).encode() + b"\n")
sys.stdin.readline()
"""


async def test_an_endless_line_and_a_stderr_flood_stay_bounded(tmp_path):
    conn, notes = connection(max_line=100_000, stderr_bytes=2048)
    blocks = 400  # 25 MiB on each stream
    await conn.start([sys.executable, "-c", FLOOD, str(blocks)], {}, str(tmp_path))
    try:
        for _ in range(2000):
            if notes:
                break
            await asyncio.sleep(0.02)
        assert notes == [("note", 1)]
        assert conn.long_lines == 1 and conn.garbage_lines == 2
        assert len(conn.stderr.data) == 2048
        assert conn.stderr.total >= 65536  # drained while it flooded (not necessarily all yet)
        assert conn.alive
    finally:
        await conn.stop(1)


async def test_a_program_that_cannot_start_is_acp_closed(tmp_path):
    conn, _ = connection()
    with pytest.raises(AcpClosed, match="no such program"):
        await conn.start(["/nonexistent/agent"], {}, str(tmp_path))


async def test_too_many_agent_requests_at_once_are_refused(tmp_path):
    gate = asyncio.Event()
    notes: list[Any] = []

    async def slow(method: str, params: Any) -> Any:
        await gate.wait()
        return "late"

    script = r"""
import json, sys
for i in range(3):
    print(json.dumps({"jsonrpc": "2.0", "id": i, "method": "slow", "params": None}), flush=True)
for line in sys.stdin:
    print(json.dumps({"jsonrpc": "2.0", "method": "seen", "params": json.loads(line)}), flush=True)
"""
    conn = AcpConnection(
        "t",
        slow,
        lambda m, p: notes.append(p),
        max_line=4096,
        stderr_bytes=1024,
        max_requests=2,
        write_timeout=5,
    )
    await conn.start([sys.executable, "-c", script], {}, str(tmp_path))
    try:
        for _ in range(500):
            if notes:
                break
            await asyncio.sleep(0.02)
        assert notes[0]["id"] == 2 and notes[0]["error"]["code"] == -32000
        gate.set()
        for _ in range(500):
            if len(notes) == 3:
                break
            await asyncio.sleep(0.02)
        assert sorted(n["id"] for n in notes[1:]) == [0, 1]
        assert all(n["result"] == "late" for n in notes[1:])
    finally:
        await conn.stop(1)


def test_stderr_ring_keeps_the_tail():
    ring = StderrRing(10)
    ring.add(b"0123456789abcdef")
    ring.add(b"XY")
    assert bytes(ring.data) == b"89abcdefXY" and ring.total == 18
    assert ring.tail(4) == "efXY"


def test_backend_declarations_from_flags_env_and_config(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--agent-backend", "a=agent-a --acp", "--agent-backend", "b=/bin/b"]
    )
    settings = load_settings({"agent_backends": args.agent_backends}, environ={})
    assert settings.agent_backends == {"a": "agent-a --acp", "b": "/bin/b"}
    settings = load_settings({}, environ={"AETHERD_AGENT_BACKENDS": "x=run x; y = npx y --acp"})
    assert settings.agent_backends == {"x": "run x", "y": "npx y --acp"}
    for bad in ("builtin=foo", "no-command", "sp ace=x", "a="):
        with pytest.raises(SettingsError, match="agent_backends"):
            load_settings({}, environ={"AETHERD_AGENT_BACKENDS": bad})
    assert spec_from_command("y", "npx 'y z' --acp").argv == ("npx", "y z", "--acp")
    spec = spec_from_config("c", {"command": "node", "args": ["a b.js"], "env": {"K": "v"}})
    assert spec is not None and spec.argv == ("node", "a b.js") and spec.env == (("K", "v"),)
    spec = spec_from_config("c", {"command": "gemini --experimental-acp"})
    assert spec is not None and spec.argv == ("gemini", "--experimental-acp")
