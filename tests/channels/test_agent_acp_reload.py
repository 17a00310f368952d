"""ACP backends across a reload (PROTOCOL.md sections 14 and 17), with a real daemon.

`aetherd serve` runs as a child process (the reload test's `Daemon`); SIGHUP makes
it re-execute itself. The agent process gets a clean restart: the old one is stopped
with the old daemon's services, the next task starts a new one, which loads the
conversation's session again (the scripted agent advertises `loadSession`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from tests.channels.test_agent import history, task_events, texts
from tests.channels.test_agent_acp import AGENT
from tests.test_reload import daemon, open_ws  # noqa: F401  (daemon is a fixture)


async def test_a_reload_restarts_the_agent_and_loads_its_session(daemon, tmp_path: Path):  # noqa: F811
    trace = tmp_path / "trace.jsonl"
    command = shlex.join([sys.executable, str(AGENT)])
    d = daemon(
        "--agent-backend",
        f"scripted={command}",
        env={"ACP_AGENT_LOAD": "1", "ACP_AGENT_TRACE": str(trace)},
    )
    await d.wait_ready()
    ws = await open_ws(d)
    await history(ws)
    await ws.send(
        {
            "channel": "agent",
            "type": "prompt",
            "prompt": "hello",
            "taskId": "r1",
            "backend": "scripted",
        }
    )
    assert (await task_events(ws, "r1"))[-1]["status"] == "completed"
    await ws.close()

    def seen() -> list[dict]:
        return [json.loads(line) for line in trace.read_text().splitlines()]

    first_pid = seen()[0]["pid"]
    session = next(m for m in seen() if m.get("method") == "session/prompt")["params"]["sessionId"]
    await d.reload()
    # The old agent was stopped with the old daemon's services.
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)

    ws = await open_ws(d)
    page = await history(ws)
    assert any(e.get("taskId") == "r1" and e["type"] == "done" for e in page["events"])
    await ws.send(
        {
            "channel": "agent",
            "type": "prompt",
            "prompt": "hello",
            "taskId": "r2",
            "backend": "scripted",
        }
    )
    events = await task_events(ws, "r2")
    assert events[-1]["status"] == "completed" and texts(events) == "Hello, world"
    await ws.close()
    later = [m for m in seen() if m["pid"] != first_pid]
    assert [m["method"] for m in later if "method" in m][:3] == [
        "initialize",
        "session/load",
        "session/prompt",
    ]
    assert all(
        m["params"]["sessionId"] == session for m in later if m.get("method") == "session/prompt"
    )
