"""Agent backends over ACP (PROTOCOL.md section 17), end to end.

A real daemon on loopback, a real WebSocket client, and the scripted ACP agent
(`tests/fixtures/acp_agent.py`) as a real child process speaking JSON-RPC on its
stdio. The prompt's first word picks the agent's script.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.channels.test_agent import decide, history, task_events, texts
from tests.support import WsClient, wait_for

AGENT = Path(__file__).resolve().parents[1] / "fixtures" / "acp_agent.py"
COMMAND = shlex.join([sys.executable, str(AGENT)])


async def start(start_daemon, tmp_path: Path, **overrides: Any):
    values: dict[str, Any] = {
        "agent_backends": {"scripted": COMMAND},
        "agent_permission_mode": "auto",
        "acp_cancel_grace": 0.5,
        "process_kill_grace": 0.5,
    }
    values.update(overrides)
    return await start_daemon(**values)


async def run_task(client: WsClient, task_id: str, prompt: str, **fields: Any) -> list[dict]:
    reply = await client.request(
        "agent", "prompt", prompt=prompt, taskId=task_id, backend="scripted", **fields
    )
    assert reply["success"] is True, reply
    return await task_events(client, task_id)


def kinds(events: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["type"], e.get("status")) for e in events]


def check_seqs(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_text_thinking_plan_and_tool_calls_map_to_agent_events(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)

    events = await run_task(client, "t-hello", "hello")
    check_seqs(events)
    assert kinds(events)[:2] == [("status", "queued"), ("status", "running")]
    assert kinds(events)[-2:] == [("status", "completed"), ("done", "completed")]
    assert texts(events, "thinking") == "Let me think about it."
    assert texts(events) == "Hello, world"
    # One messageId per content block: the thinking block and the text block differ.
    thinking_ids = {e["messageId"] for e in events if e["type"] == "thinking"}
    text_ids = {e["messageId"] for e in events if e["type"] == "text"}
    assert len(thinking_ids) == 1 and len(text_ids) == 1 and thinking_ids != text_ids

    events = await run_task(client, "t-plan", "plan")
    plans = [e for e in events if e["type"] == "plan"]
    assert [p["entries"][0]["status"] for p in plans] == ["in_progress", "completed"]
    assert plans[0]["entries"][1] == {
        "content": "Write the fix",
        "priority": "medium",
        "status": "pending",
    }

    events = await run_task(client, "t-tools", "tools")
    calls = [(e["type"], e["toolCallId"], e.get("status")) for e in events if "toolCallId" in e]
    assert calls == [
        ("tool_invocation", "call-1", "running"),
        ("tool_result", "call-1", None),
        ("tool_invocation", "call-2", "running"),
        ("tool_result", "call-2", None),
    ]
    first = next(e for e in events if e["type"] == "tool_invocation")
    assert first["name"] == "Read a.txt" and first["input"] == {"path": "a.txt"}
    ok, failed = [e for e in events if e["type"] == "tool_result"]
    assert ok["isError"] is False and ok["result"] == "file body"
    assert failed["isError"] is True and "make: no rule" in failed["error"]
    # Text before and after a tool call are different blocks.
    assert len({e["messageId"] for e in events if e["type"] == "text"}) == 2

    events = await run_task(client, "t-usage", "usage")
    assert events[-1]["usage"] == {"inputTokens": 12, "outputTokens": 34}

    # Everything is in the transcript, in order, and replayed to a new connection.
    other = await running.connect()
    page = await history(other)
    stored = [e for e in page["events"] if e["taskId"] in ("t-hello", "t-plan", "t-tools")]
    check_seqs(stored)
    assert [e["type"] for e in stored].count("plan") == 2
    merged = [e for e in stored if e["type"] == "text" and e["taskId"] == "t-hello"]
    assert [e["content"] for e in merged] == ["Hello, world"]


async def test_refusal_and_agent_errors_fail_the_task(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)
    done = (await run_task(client, "t-refuse", "refuse"))[-1]
    assert done["status"] == "failed" and done["code"] == "PROVIDER_ERROR"
    assert "refusal" in done["error"]
    done = (await run_task(client, "t-error", "error"))[-1]
    assert done["status"] == "failed" and done["code"] == "PROVIDER_ERROR"
    assert "the model is overloaded" in done["error"]
    # The agent is still there for the next task.
    events = await run_task(client, "t-after", "hello")
    assert events[-1]["status"] == "completed"


async def test_backend_settings_unknown_names_and_a_command_that_cannot_start(
    start_daemon, tmp_path
):
    running = await start(
        start_daemon, tmp_path, agent_backends={"scripted": COMMAND, "ghost": "/nonexistent/agent"}
    )
    client = await running.connect()
    await history(client)
    reply = await client.request("agent", "prompt", prompt="x", backend="nope")
    assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"
    assert reply["field"] == "backend"
    reply = await client.request("agent", "settings", backend="nope")
    assert reply["code"] == "INVALID_MESSAGE"

    reply = await client.request("agent", "settings")
    assert reply["data"]["backend"] == "builtin"
    reply = await client.request("agent", "settings", backend="scripted")
    assert reply["data"]["backend"] == "scripted"
    # The default backend now is the scripted agent: no backend field needed.
    await client.send({"channel": "agent", "type": "prompt", "prompt": "hello", "taskId": "t-d"})
    events = await task_events(client, "t-d")
    assert texts(events) == "Hello, world"

    reply = await client.request("agent", "prompt", prompt="x", taskId="t-ghost", backend="ghost")
    assert reply["success"] is True
    events = await task_events(client, "t-ghost")
    assert kinds(events)[-1] == ("done", "failed")
    assert events[-1]["code"] == "PROVIDER_ERROR"
    assert "/nonexistent/agent" in events[-1]["error"]


async def test_permission_requests_round_trip_with_options(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    other = await running.connect()
    await history(client)
    await history(other)

    # auto mode: `rm -rf build` is destructive, so a person is asked.
    await client.request("agent", "prompt", prompt="permission", taskId="p1", backend="scripted")
    asked = await client.expect_type("agent", "permission_request", taskId="p1")
    assert asked["toolCallId"] == "perm-1"
    assert asked["input"] == {"command": "rm -rf build"}
    assert [o["optionId"] for o in asked["options"]] == [
        "allow-once",
        "allow-always",
        "reject-once",
    ]
    assert asked["options"][0] == {"optionId": "allow-once", "name": "Allow", "kind": "allow_once"}
    await client.expect_type("agent", "status", taskId="p1", status="awaiting_input")
    # A bad optionId is refused; then another connection approves with a named option.
    bad = await decide(other, "approve", asked["requestId"], optionId="reject-once")
    assert bad["success"] is False and bad["code"] == "INVALID_MESSAGE"
    reply = await decide(other, "approve", asked["requestId"], optionId="allow-always")
    assert reply["success"] is True and reply["data"]["approved"] is True
    events = await task_events(client, "p1")
    assert texts(events) == "outcome: allow-always"
    assert ("status", "running") in kinds(events)

    # approve without optionId picks the first allow_* option.
    await client.request("agent", "prompt", prompt="permission", taskId="p2", backend="scripted")
    asked = await client.expect_type("agent", "permission_request", taskId="p2")
    await decide(client, "approve", asked["requestId"])
    assert texts(await task_events(client, "p2")) == "outcome: allow-once"

    # reject picks the first reject_* option.
    await client.request("agent", "prompt", prompt="permission", taskId="p3", backend="scripted")
    asked = await client.expect_type("agent", "permission_request", taskId="p3")
    await decide(client, "reject", asked["requestId"], reason="no")
    events = await task_events(client, "p3")
    assert texts(events) == "outcome: reject-once"
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["isError"] is True

    # auto mode: a harmless command is allowed without asking.
    events = await run_task(client, "p4", "permission ls -la")
    assert texts(events) == "outcome: allow-once"
    assert not [e for e in events if e["type"] == "permission_request"]

    # full mode answers allow by itself even for a destructive command.
    await client.request("agent", "settings", permissionMode="full")
    events = await run_task(client, "p5", "permission rm -rf /")
    assert texts(events) == "outcome: allow-once"
    assert not [e for e in events if e["type"] == "permission_request"]

    # ask mode asks for everything.
    await client.request("agent", "settings", permissionMode="ask")
    await client.request("agent", "prompt", prompt="permission ls", taskId="p6", backend="scripted")
    asked = await client.expect_type("agent", "permission_request", taskId="p6")
    await decide(client, "reject", asked["requestId"])
    assert texts(await task_events(client, "p6")) == "outcome: reject-once"


async def test_fs_requests_go_through_the_jail_and_the_watcher(start_daemon, tmp_path, workspace):
    running = await start(start_daemon, tmp_path, watcher_debounce=0.02)
    client = await running.connect()
    await history(client)
    (workspace / "notes.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "secret.txt").write_text("SECRET")
    root = str(running.daemon.services.jail.root)

    events = await run_task(client, "f1", f"read {root}/notes.txt")
    assert texts(events) == "content: one\ntwo\nthree\n"
    events = await run_task(client, "f2", f"read {root}/notes.txt 2 1")
    assert texts(events) == "content: two\n"
    events = await run_task(client, "f3", f"read {tmp_path}/secret.txt")
    assert "outside the workspace root" in texts(events)
    assert "SECRET" not in texts(events)
    events = await run_task(client, "f4", f"read {root}/../secret.txt")
    assert "outside the workspace root" in texts(events)
    events = await run_task(client, "f5", f"read {root}/missing.txt")
    assert texts(events).startswith("error -32002")

    events = await run_task(client, "f6", f"write {root}/out/new.txt written by the agent")
    assert texts(events) == "written"
    assert (workspace / "out" / "new.txt").read_text() == "written by the agent"
    change = await client.expect_type("files", "change", path="/out/new.txt")
    assert change["action"] == "create"
    events = await run_task(client, "f7", f"write {tmp_path}/evil.txt nope")
    assert "outside the workspace root" in texts(events)
    assert not (tmp_path / "evil.txt").exists()


async def test_terminal_requests_run_on_the_process_service(start_daemon, tmp_path, workspace):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)
    events = await run_task(client, "term", "terminal echo $GREETING; pwd; echo oops >&2; exit 3")
    said = texts(events)
    assert "exit 3" in said
    assert "hi-from-env" in said and str(running.daemon.services.jail.root) in said
    assert "oops" in said and "'exitCode': 3" in said
    terminal_id = said.split()[1]
    assert terminal_id.startswith("acp-scripted-")
    # The command ran as a section 10 process: listed on the process channel.
    listed = await client.request("process", "list")
    ids = [p["processId"] for p in listed["data"]["processes"]]
    assert terminal_id in ids
    result = next(e for e in events if e["type"] == "tool_result")
    assert "hi-from-env" in result["result"]


async def test_abort_cancels_and_kills_an_agent_that_ignores_it(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)
    backend = running.daemon.services.agent.backends["scripted"]

    # A cooperative agent answers session/cancel with stopReason cancelled.
    await client.request("agent", "prompt", prompt="slow", taskId="a1", backend="scripted")
    await client.expect_type("agent", "text", taskId="a1")
    pid = backend.conn.pid
    reply = await client.request("agent", "abort", taskId="a1")
    assert reply["success"] is True and reply["data"]["status"] == "aborted"
    events = await task_events(client, "a1")
    assert kinds(events)[-2:] == [("status", "aborted"), ("done", "aborted")]
    assert backend.conn.pid == pid  # it was not killed

    # One that ignores the cancel is killed after acp_cancel_grace; the next task
    # gets a new agent process.
    await client.request("agent", "prompt", prompt="ignore-cancel", taskId="a2", backend="scripted")
    await client.expect_type("agent", "text", taskId="a2")
    reply = await client.request("agent", "abort", taskId="a2")
    assert reply["success"] is True
    events = await task_events(client, "a2")
    assert events[-1]["status"] == "aborted"
    events = await run_task(client, "a3", "hello")
    assert events[-1]["status"] == "completed"
    assert backend.conn.pid != pid
    await wait_for(lambda: running.daemon.services.running_tasks() == 0)


async def test_a_crash_mid_turn_fails_the_task_and_the_agent_restarts(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)
    events = await run_task(client, "c1", "crash")
    assert texts(events) == "about to crash"
    done = events[-1]
    assert done["status"] == "failed" and done["code"] == "PROVIDER_ERROR"
    assert "exited with code 3" in done["error"] and "scripted crash" in done["error"]
    events = await run_task(client, "c2", "hello")
    assert events[-1]["status"] == "completed"
    backend = running.daemon.services.agent.backends["scripted"]
    assert backend.starts == 2 and backend.crashes == 1


async def test_an_agent_that_dies_before_initialize_fails_the_task(start_daemon, tmp_path):
    command = shlex.join(["env", "ACP_AGENT_INIT=crash", sys.executable, str(AGENT)])
    running = await start(start_daemon, tmp_path, agent_backends={"scripted": command})
    client = await running.connect()
    await history(client)
    done = (await run_task(client, "i1", "hello"))[-1]
    assert done["status"] == "failed" and done["code"] == "PROVIDER_ERROR"
    assert "did not initialize" in done["error"]
    assert "no credentials" in done["error"]


async def test_garbage_on_stdout_is_skipped_and_the_daemon_stays_healthy(start_daemon, tmp_path):
    command = shlex.join(["env", "ACP_AGENT_INIT=garbage", sys.executable, str(AGENT)])
    running = await start(
        start_daemon, tmp_path, agent_backends={"scripted": command}, acp_max_line_bytes=65536
    )
    client = await running.connect()
    await history(client)
    events = await run_task(client, "g1", "garbage 200000")
    assert texts(events) == "still here"
    assert events[-1]["status"] == "completed"
    conn = running.daemon.services.agent.backends["scripted"].conn
    assert conn.long_lines == 1
    assert conn.garbage_lines >= 5
    # The same agent process goes on serving.
    events = await run_task(client, "g2", "hello")
    assert events[-1]["status"] == "completed"
    assert running.daemon.services.agent.backends["scripted"].conn is conn


async def test_a_flood_on_stdout_and_stderr_does_not_grow_memory(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path, acp_max_line_bytes=1024 * 1024)
    client = await running.connect()
    await history(client)
    events = await run_task(client, "w1", "hello")  # the agent is up
    assert events[-1]["status"] == "completed"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        # 32 MiB of one endless line on stdout, and 32 MiB on stderr.
        events = await run_task(client, "w2", f"flood {32 * 1024 * 1024}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert texts(events) == "flooded"
    # Held at once: at most the 1 MiB line buffer and a read chunk or two.
    assert peak < 8 * 1024 * 1024, peak
    conn = running.daemon.services.agent.backends["scripted"].conn
    assert conn.long_lines == 1
    assert conn.stderr.total >= 32 * 1024 * 1024
    assert len(conn.stderr.data) == running.settings.acp_stderr_bytes


async def test_config_backends_env_cwd_process_group_and_stop(start_daemon, tmp_path, workspace):
    trace = tmp_path / "trace.jsonl"
    config = workspace / ".aether" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        "env:\n  WORKSPACE_VAR: from-workspace\n"
        "agent:\n  backend: cfg\n  backends:\n    cfg:\n"
        f"      command: {sys.executable}\n      args: [{str(AGENT)!r}]\n"
        f"      env:\n        ACP_AGENT_TRACE: {str(trace)!r}\n        AGENT_VAR: from-backend\n"
    )
    running = await start(start_daemon, tmp_path, agent_backends={})
    client = await running.connect()
    await history(client)
    current = await client.request("agent", "settings")
    assert current["data"]["backend"] == "cfg"
    await client.send(
        {
            "channel": "agent",
            "type": "prompt",
            "prompt": "env WORKSPACE_VAR AGENT_VAR AETHERD_TOKEN",
            "taskId": "e1",
        }
    )
    events = await task_events(client, "e1")
    assert texts(events) == "WORKSPACE_VAR=from-workspace AGENT_VAR=from-backend AETHERD_TOKEN=None"
    seen = [json.loads(line) for line in trace.read_text().splitlines()]
    root = str(running.daemon.services.jail.root)
    init = next(m for m in seen if m.get("method") == "initialize")
    assert init["params"]["clientCapabilities"] == {
        "fs": {"readTextFile": True, "writeTextFile": True},
        "terminal": True,
    }
    new = next(m for m in seen if m.get("method") == "session/new")
    assert new["params"]["cwd"] == root and init["cwd"] == root
    conn = running.daemon.services.agent.backends["cfg"].conn
    assert os.getpgid(conn.pid) == conn.pid  # its own process group
    # Stopping the daemon stops the agent.
    await client.close()
    await running.server.close()
    assert conn.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(conn.pid, 0)


async def test_a_pending_permission_is_replayed_and_dropped_by_abort(start_daemon, tmp_path):
    running = await start(start_daemon, tmp_path)
    client = await running.connect()
    await history(client)
    await client.request("agent", "prompt", prompt="permission", taskId="q1", backend="scripted")
    asked = await client.expect_type("agent", "permission_request", taskId="q1")
    await client.expect_type("agent", "status", taskId="q1", status="awaiting_input")
    other = await running.connect()
    page = await history(other)
    assert [p["requestId"] for p in page["pending"]] == [asked["requestId"]]
    assert page["pending"][0]["options"] == asked["options"]
    reply = await client.request("agent", "abort", taskId="q1")
    assert reply["success"] is True
    events = await task_events(client, "q1")
    assert events[-1]["status"] == "aborted"
    late = await decide(other, "approve", asked["requestId"])
    assert late["success"] is False and late["code"] == "NOT_FOUND"
    third = await running.connect()
    assert (await history(third))["pending"] == []
    # The agent was told `cancelled` and ended its turn itself: the next task runs on it.
    events = await run_task(client, "q2", "hello")
    assert events[-1]["status"] == "completed"


async def test_load_session_keeps_one_conversation_across_restarts(start_daemon, tmp_path):
    trace = tmp_path / "trace.jsonl"
    command = shlex.join(
        ["env", "ACP_AGENT_LOAD=1", f"ACP_AGENT_TRACE={trace}", sys.executable, str(AGENT)]
    )
    running = await start(start_daemon, tmp_path, agent_backends={"scripted": command})
    client = await running.connect()
    await history(client)
    await run_task(client, "l1", "hello")
    await run_task(client, "l2", "hello")

    def methods() -> list[tuple[str, Any]]:
        seen = [json.loads(line) for line in trace.read_text().splitlines()]
        return [(m["method"], m["params"].get("sessionId")) for m in seen if "method" in m]

    prompts = [s for m, s in methods() if m == "session/prompt"]
    assert [m for m, _ in methods()].count("session/new") == 1
    assert prompts[0] == prompts[1]  # one conversation
    # A crash: the next task loads the conversation into the new process.
    await run_task(client, "l3", "crash")
    events = await run_task(client, "l4", "hello")
    assert ("session/load", prompts[0]) in methods()
    assert [s for m, s in methods() if m == "session/prompt"][-1] == prompts[0]
    # What the agent replays while loading is not recorded again.
    assert "replayed" not in texts(events)
    # A new daemon on the same data directory loads it too.
    await client.close()
    await running.server.close()
    again = await start(start_daemon, tmp_path, agent_backends={"scripted": command})
    client = await again.connect()
    page = await history(client)
    assert not any("replayed" in e.get("content", "") for e in page["events"])
    await run_task(client, "l5", "hello")
    loads = [s for m, s in methods() if m == "session/load"]
    assert loads == [prompts[0], prompts[0]]


async def test_auth_method_from_the_config_authenticates_first(start_daemon, tmp_path, workspace):
    config = workspace / ".aether" / "config.yaml"
    config.parent.mkdir()
    argv = ["env", "ACP_AGENT_AUTH=api-key", sys.executable, str(AGENT)]
    config.write_text(
        "agent:\n  backends:\n"
        f"    plain:\n      command: {json.dumps(shlex.join(argv))}\n"
        f"    keyed:\n      command: {json.dumps(shlex.join(argv))}\n      auth_method: api-key\n"
    )
    running = await start(start_daemon, tmp_path, agent_backends={})
    client = await running.connect()
    await history(client)
    reply = await client.request("agent", "prompt", prompt="hello", taskId="n1", backend="plain")
    assert reply["success"] is True
    done = (await task_events(client, "n1"))[-1]
    assert done["code"] == "PROVIDER_ERROR" and "Authentication required" in done["error"]
    reply = await client.request("agent", "prompt", prompt="hello", taskId="n2", backend="keyed")
    events = await task_events(client, "n2")
    assert events[-1]["status"] == "completed" and texts(events) == "Hello, world"
