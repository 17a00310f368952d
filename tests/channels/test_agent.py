"""The agent channel end to end: a real daemon, a real socket, fake providers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from aetherd.agent.events import ContentPiece
from aetherd.logs import redactor
from tests.conftest import TOKEN
from tests.fake_providers import FakeProvider, HttpError, ToolUse, Turn
from tests.support import (
    WsClient,
    aetherd_command,
    child_env,
    connect,
    read_port,
    wait_for,
    wait_ready,
)

KEY_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENROUTER_API_KEY",
)


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def anthropic():
    provider = await FakeProvider("anthropic").start()
    yield provider
    await provider.close()


@pytest.fixture
async def openai():
    provider = await FakeProvider("openai").start()
    yield provider
    await provider.close()


async def start_agent(start_daemon, provider: FakeProvider, **overrides: Any):
    """A daemon whose agent talks to `provider` (fast retries)."""
    values: dict[str, Any] = {"agent_retry_base_delay": 0.01, "agent_retry_max_delay": 0.05}
    if provider.kind == "anthropic":
        values.update(anthropic_api_key="sk-ant-test", anthropic_base_url=provider.base_url)
    else:
        values.update(
            agent_provider="openai", openai_api_key="sk-oai-test", openai_base_url=provider.base_url
        )
    values.update(overrides)
    return await start_daemon(**values)


async def task_events(client: WsClient, task_id: str, until: str = "done") -> list[dict[str, Any]]:
    """The agent events of `task_id`, in order, up to and including the first `until`."""
    out: list[dict[str, Any]] = []
    for _ in range(10_000):
        frame = await client.expect(
            lambda f: f.get("channel") == "agent" and f.get("taskId") == task_id and "seq" in f
        )
        out.append(frame)
        if frame["type"] == until:
            return out
    raise AssertionError("too many events")


async def history(client: WsClient) -> dict[str, Any]:
    return await client.expect_type("agent", "history")


async def decide(client: WsClient, type_: str, request_id: str, **fields: Any) -> dict[str, Any]:
    """approve/reject: the permission request's id travels as `requestId`, so it is echoed."""
    await client.send({"channel": "agent", "type": type_, "requestId": request_id, **fields})
    return await client.expect(lambda f: f.get("requestId") == request_id and "success" in f)


def texts(events, kind="text") -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


# -- configuration and client messages ---------------------------------------------------


async def test_prompt_without_a_key_fails_at_once_naming_the_variable(start_daemon):
    running = await start_daemon()
    client = await running.connect()
    await history(client)
    reply = await client.request("agent", "prompt", prompt="hello", taskId="t-nokey")
    assert reply["success"] is False
    assert reply["code"] == "PROVIDER_NOT_CONFIGURED"
    assert "ANTHROPIC_API_KEY" in reply["error"]
    events = await task_events(client, "t-nokey")
    assert [(e["type"], e["status"]) for e in events] == [
        ("status", "queued"),
        ("status", "failed"),
        ("done", "failed"),
    ]
    assert events[0]["prompt"] == "hello"
    done = events[-1]
    assert done["code"] == "PROVIDER_NOT_CONFIGURED"
    assert "ANTHROPIC_API_KEY" in done["error"]
    # Switching provider names that provider's variable.
    reply = await client.request("agent", "settings", provider="openrouter")
    assert reply["data"]["provider"] == "openrouter"
    await client.send({"channel": "agent", "type": "prompt", "prompt": "x", "taskId": "t2"})
    done = await client.expect_type("agent", "done", taskId="t2")
    assert "OPENROUTER_API_KEY" in done["error"]
    assert running.daemon.services.running_tasks() == 0


async def test_anthropic_stream_with_thinking_and_tools(start_daemon, anthropic, workspace):
    write = ToolUse(
        "write_file", json.dumps({"path": "/src/hello.txt", "content": "héllo ✓\n"}), pieces=5
    )
    anthropic.add(
        Turn(
            thinking=["Let me ", "think ✓"],
            text=["I'll ", "write ", "it."],
            tools=[write],
            input_tokens=100,
            output_tokens=20,
        ),
        Turn(text=["Done", " — wrote it."], input_tokens=150, output_tokens=7),
    )
    running = await start_agent(start_daemon, anthropic, agent_thinking_budget=2048)
    client = await running.connect()
    await history(client)
    reply = await client.request("agent", "prompt", prompt="write hello", taskId="t1")
    assert reply["data"] == {"taskId": "t1", "status": "queued"}
    events = await task_events(client, "t1")
    kinds = [e["type"] for e in events]
    assert (
        kinds[0] == "status"
        and events[0]["status"] == "queued"
        and events[0]["prompt"] == "write hello"
    )
    assert events[1]["status"] == "running"
    assert texts(events, "thinking") == "Let me think ✓"
    assert texts(events) == "I'll write it.Done — wrote it."
    invocation = next(e for e in events if e["type"] == "tool_invocation")
    assert invocation["toolCallId"] == write.id
    assert invocation["name"] == "write_file"
    assert invocation["input"] == {"path": "/src/hello.txt", "content": "héllo ✓\n"}
    assert invocation["status"] == "running"
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["isError"] is False and "wrote" in result["result"]
    assert events[-2]["type"] == "status" and events[-2]["status"] == "completed"
    done = events[-1]
    assert done["status"] == "completed"
    assert done["usage"] == {"inputTokens": 250, "outputTokens": 27}
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["createdAt"].endswith("Z") for e in events)
    assert (workspace / "src" / "hello.txt").read_text() == "héllo ✓\n"
    # What went over the wire to the provider.
    first, second = anthropic.requests
    assert anthropic.headers[0]["x-api-key"] == "sk-ant-test"
    assert redactor._scrub("key sk-ant-test") == "key ***"  # never logged
    assert anthropic.headers[0]["anthropic-version"] == "2023-06-01"
    assert first["stream"] is True and first["thinking"]["budget_tokens"] == 2048
    assert {t["name"] for t in first["tools"]} >= {"bash", "read_file", "ask_user"}
    assert first["messages"] == [{"role": "user", "content": "write hello"}]
    assistant = second["messages"][1]["content"]
    assert assistant[0] == {
        "type": "thinking",
        "thinking": "Let me think ✓",
        "signature": "sig-abc123",
    }
    assert assistant[2]["type"] == "tool_use" and assistant[2]["input"]["path"] == "/src/hello.txt"
    tool_result = second["messages"][2]["content"][0]
    assert tool_result["type"] == "tool_result" and tool_result["tool_use_id"] == write.id
    assert tool_result["is_error"] is False


@pytest.mark.parametrize("route", ["openai", "openrouter"])
async def test_openai_compatible_stream_with_tool_fragments(start_daemon, openai, workspace, route):
    (workspace / "notes.md").write_text("line one\nline two\n")
    read = ToolUse("read_file", json.dumps({"path": "notes.md"}), id="call_abc", pieces=6)
    openai.add(
        Turn(
            thinking=["hmm"], text=["Reading", "…"], tools=[read], input_tokens=30, output_tokens=4
        ),
        Turn(text=["It has ", "two lines."], input_tokens=40, output_tokens=6),
    )
    if route == "openai":
        running = await start_agent(start_daemon, openai, agent_model="gpt-test")
    else:
        running = await start_daemon(
            agent_provider="openrouter",
            openrouter_api_key="sk-or-test",
            openrouter_base_url=openai.base_url,
            agent_model="vendor/model-x",
        )
    client = await running.connect()
    await history(client)
    await client.send(
        {"channel": "agent", "type": "prompt", "prompt": "count lines", "taskId": "t1"}
    )
    events = await task_events(client, "t1")
    assert texts(events) == "Reading…It has two lines."
    assert texts(events, "thinking") == "hmm"
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["toolCallId"] == "call_abc" and result["result"] == "line one\nline two\n"
    assert events[-1]["status"] == "completed"
    assert events[-1]["usage"] == {"inputTokens": 70, "outputTokens": 10}
    first, second = openai.requests
    key = "sk-oai-test" if route == "openai" else "sk-or-test"
    assert openai.headers[0]["Authorization"] == f"Bearer {key}"
    assert first["model"] == ("gpt-test" if route == "openai" else "vendor/model-x")
    assert first["stream_options"] == {"include_usage": True}
    assert first["messages"][0]["role"] == "system"
    assistant = second["messages"][2]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "read_file",
        "arguments": '{"path": "notes.md"}',
    }
    assert second["messages"][3] == {
        "role": "tool",
        "tool_call_id": "call_abc",
        "content": "line one\nline two\n",
    }


async def test_settings_are_persisted_and_honoured(start_daemon, openai, tmp_path):
    openai.add(Turn(text=["ok"]))
    running = await start_daemon(openai_api_key="k", openai_base_url=openai.base_url)
    client = await running.connect()
    await history(client)
    reply = await client.request(
        "agent", "settings", provider="openai", model="my-model", permissionMode="ask"
    )
    assert reply["data"] == {
        "provider": "openai",
        "model": "my-model",
        "permissionMode": "ask",
        "backend": "builtin",
    }
    bad = await client.request("agent", "settings", provider="nope")
    assert bad["success"] is False and bad["code"] == "INVALID_MESSAGE"
    bad = await client.request("agent", "settings", permissionMode="yolo")
    assert bad["code"] == "INVALID_MESSAGE"
    await client.close()
    await running.server.close()
    # A new daemon on the same data directory keeps them.
    again = await start_daemon(openai_api_key="k", openai_base_url=openai.base_url)
    client = await again.connect()
    await history(client)
    current = await client.request("agent", "settings")
    assert current["data"] == {
        "provider": "openai",
        "model": "my-model",
        "permissionMode": "ask",
        "backend": "builtin",
    }
    await client.send({"channel": "agent", "type": "prompt", "prompt": "hi", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "completed"
    assert openai.requests[0]["model"] == "my-model"


async def test_the_config_seam_sets_defaults_env_and_ignores(start_daemon, openai, workspace):
    (workspace / "vendor").mkdir()
    (workspace / "vendor" / "x.py").write_text("")
    (workspace / "main.py").write_text("")
    openai.add(
        Turn(
            tools=[
                ToolUse(
                    "bash", json.dumps({"command": "rm -rf vendor-copy; echo $STAGE"}), id="c1"
                ),
                ToolUse("glob", json.dumps({"pattern": "**/*.py"}), id="c2"),
            ]
        ),
        Turn(text=["ok"]),
    )
    running = await start_daemon(openai_api_key="k", openai_base_url=openai.base_url)
    running.daemon.services.agent.apply_config(
        {"provider": "openai", "model": "cfg-model", "permission_mode": "full"},
        {"STAGE": "from-config"},
        ["vendor"],
    )
    client = await running.connect()
    await history(client)
    current = await client.request("agent", "settings")
    assert current["data"] == {
        "provider": "openai",
        "model": "cfg-model",
        "permissionMode": "full",
        "backend": "builtin",
    }
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    events = await task_events(client, "t1")
    results = {e["toolCallId"]: e for e in events if e["type"] == "tool_result"}
    assert results["c1"]["result"].strip() == "from-config"  # full mode: no approval asked
    assert results["c2"]["result"] == "/main.py"  # vendor/ is ignored
    assert openai.requests[0]["model"] == "cfg-model"
    # A client's own settings win over the workspace config.
    reply = await client.request("agent", "settings", permissionMode="ask")
    assert reply["data"]["permissionMode"] == "ask" and reply["data"]["model"] == "cfg-model"


# -- permissions ---------------------------------------------------------------------------


async def test_auto_mode_asks_for_a_destructive_command_and_survives_a_reconnect(
    start_daemon, anthropic, workspace
):
    (workspace / "src").mkdir()
    (workspace / "src" / "a.txt").write_text("x")
    rm = ToolUse("bash", json.dumps({"command": "rm -rf src && echo gone"}))
    safe = ToolUse("bash", json.dumps({"command": "echo safe-$((1+1))"}))
    anthropic.add(Turn(tools=[safe]), Turn(tools=[rm]), Turn(text=["bye"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "clean", "taskId": "t1"})
    events = await task_events(client, "t1", until="permission_request")
    request = events[-1]
    assert request["toolCallId"] == rm.id and request["name"] == "bash"
    assert request["input"] == {"command": "rm -rf src && echo gone"}
    assert "recursive delete" in request["description"]
    safe_result = next(e for e in events if e["type"] == "tool_result")
    assert safe_result["result"].strip() == "safe-2"  # the safe command needed no approval
    waiting = await client.expect(
        lambda f: f.get("type") == "status" and f.get("status") == "awaiting_input"
    )
    assert waiting["taskId"] == "t1"
    assert (workspace / "src").exists()
    # The client goes away; a new one sees the pending request in its history.
    await client.close()
    client = await running.connect()
    page = await history(client)
    assert [p["requestId"] for p in page["pending"]] == [request["requestId"]]
    assert any(
        e["type"] == "permission_request" and e["requestId"] == request["requestId"]
        for e in page["events"]
    )
    invocation = [
        e for e in page["events"] if e["type"] == "tool_invocation" and e["toolCallId"] == rm.id
    ]
    assert invocation[-1]["status"] == "awaiting_approval"
    reply = await decide(client, "approve", request["requestId"])
    assert reply["success"] is True and reply["data"]["approved"] is True
    events = await task_events(client, "t1")
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["isError"] is False and "gone" in result["result"]
    assert events[-1]["status"] == "completed"
    assert not (workspace / "src").exists()
    again = await decide(client, "approve", request["requestId"])
    assert again["success"] is False and again["code"] == "NOT_FOUND"


async def test_reject_sends_the_reason_to_the_model(start_daemon, anthropic, workspace):
    push = ToolUse("bash", json.dumps({"command": "git push --force origin main"}))
    anthropic.add(Turn(tools=[push]), Turn(text=["ok, not pushing"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "push", "taskId": "t1"})
    request = await client.expect_type("agent", "permission_request", taskId="t1")
    assert "force push" in request["description"]
    reply = await decide(client, "reject", request["requestId"], reason="not on main")
    assert reply["success"] is True
    events = await task_events(client, "t1")
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["isError"] is True and "not on main" in result["error"]
    assert events[-1]["status"] == "completed"
    sent = anthropic.requests[1]["messages"][-1]["content"][0]
    assert sent["is_error"] is True and "not on main" in sent["content"]


async def test_ask_mode_needs_approval_for_writes_and_full_mode_for_nothing(
    start_daemon, anthropic, workspace
):
    write = ToolUse("write_file", json.dumps({"path": "a.txt", "content": "A"}))
    read = ToolUse("read_file", json.dumps({"path": "a.txt"}))
    anthropic.add(Turn(tools=[write]), Turn(tools=[read]), Turn(text=["done"]))
    running = await start_agent(start_daemon, anthropic, agent_permission_mode="ask")
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "w", "taskId": "t1"})
    request = await client.expect_type("agent", "permission_request", taskId="t1")
    assert request["name"] == "write_file"
    assert not (workspace / "a.txt").exists()
    await client.send({"channel": "agent", "type": "approve", "requestId": request["requestId"]})
    events = await task_events(client, "t1")
    assert [e["type"] for e in events].count("permission_request") == 0  # read needed none
    assert events[-1]["status"] == "completed"
    assert (workspace / "a.txt").read_text() == "A"
    # full: a destructive command runs without a request.
    (workspace / "junk").mkdir()
    rm = ToolUse("bash", json.dumps({"command": "rm -rf junk"}))
    anthropic.add(Turn(tools=[rm]), Turn(text=["ok"]))
    await client.request("agent", "settings", permissionMode="full")
    await client.send({"channel": "agent", "type": "prompt", "prompt": "rm", "taskId": "t2"})
    events = await task_events(client, "t2")
    assert "permission_request" not in [e["type"] for e in events]
    assert not (workspace / "junk").exists()


# -- ask_user, unknown tools, invalid JSON ----------------------------------------------------


async def test_ask_user_waits_for_tool_response(start_daemon, anthropic):
    ask = ToolUse("ask_user", json.dumps({"question": "Which port?"}))
    anthropic.add(Turn(tools=[ask]), Turn(text=["Using 8080"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "serve", "taskId": "t1"})
    invocation = await client.expect_type("agent", "tool_invocation", taskId="t1", name="ask_user")
    assert invocation["status"] == "awaiting_input"
    assert invocation["input"] == {"question": "Which port?"}
    await client.expect(lambda f: f.get("type") == "status" and f.get("status") == "awaiting_input")
    # A reconnecting client sees the question as pending.
    other = await running.connect()
    page = await history(other)
    assert [p["toolCallId"] for p in page["pending"]] == [ask.id]
    wrong = await client.request("agent", "tool_response", toolCallId="nope", result="x")
    assert wrong["code"] == "NOT_FOUND"
    await other.send(
        {"channel": "agent", "type": "tool_response", "toolCallId": ask.id, "result": "8080"}
    )
    events = await task_events(client, "t1")
    result = next(e for e in events if e["type"] == "tool_result")
    assert result == {**result, "toolCallId": ask.id, "isError": False, "result": "8080"}
    assert events[-1]["status"] == "completed"
    assert anthropic.requests[1]["messages"][-1]["content"][0]["content"] == "8080"


async def test_unknown_tool_and_invalid_json_become_error_results(start_daemon, openai, workspace):
    bogus = ToolUse("teleport", json.dumps({"to": "mars"}), id="call_1")
    broken = ToolUse("write_file", '{"path": "x.txt", "content": ', id="call_2")
    openai.add(Turn(tools=[bogus, broken]), Turn(text=["sorry"]))
    running = await start_agent(start_daemon, openai)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "go", "taskId": "t1"})
    events = await task_events(client, "t1")
    results = {e["toolCallId"]: e for e in events if e["type"] == "tool_result"}
    assert (
        results["call_1"]["isError"] is True and "no tool 'teleport'" in results["call_1"]["error"]
    )
    assert results["call_2"]["isError"] is True and "not valid JSON" in results["call_2"]["error"]
    assert events[-1]["status"] == "completed"
    assert not (workspace / "x.txt").exists()
    tool_messages = [m for m in openai.requests[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["call_1", "call_2"]
    assert all(m["content"].startswith("ERROR:") for m in tool_messages)


# -- abort and queueing --------------------------------------------------------------------------


async def test_abort_during_model_streaming(start_daemon, anthropic):
    gate = asyncio.Event()
    anthropic.add(Turn(text=["one ", "two ", "three"], pause_after=4, gate=gate))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "talk", "taskId": "t1"})
    await client.expect_type("agent", "text", taskId="t1")
    async with client.session.get(
        running.url("/workspaces/ws-test/info"),
        headers={"Authorization": f"Bearer {running.token}"},
    ) as resp:
        assert (await resp.json())["runningTasks"] == 1
    reply = await client.request("agent", "abort", taskId="t1")
    assert reply["data"] == {"taskId": "t1", "status": "aborted"}
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "aborted"
    assert texts(events) == "" or "three" not in texts(events)
    await wait_for(lambda: anthropic.streams_open == 0)  # the HTTP stream was closed
    assert anthropic.disconnects == 1
    assert running.daemon.services.running_tasks() == 0
    gate.set()
    again = await client.request("agent", "abort", taskId="t1")
    assert again["code"] == "CONFLICT"
    missing = await client.request("agent", "abort", taskId="nope")
    assert missing["code"] == "TASK_NOT_FOUND"


async def test_bash_output_streams_as_progress(start_daemon, anthropic, workspace):
    script = (
        "echo line-one; for i in $(seq 1000); do [ -e go ] && break; sleep 0.01; done; "
        "echo line-two"
    )
    bash = ToolUse("bash", json.dumps({"command": script}))
    anthropic.add(Turn(tools=[bash]), Turn(text=["ok"]))
    running = await start_agent(start_daemon, anthropic, agent_progress_interval=0.01)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    progress = await client.expect(lambda f: f.get("type") == "tool_invocation" and "progress" in f)
    assert progress["progress"] == "line-one\n"
    assert progress["toolCallId"] == bash.id and progress["status"] == "running"
    (workspace / "go").write_text("")
    events = await task_events(client, "t1")
    later = [e["progress"] for e in events if e["type"] == "tool_invocation" and "progress" in e]
    assert "".join(later) == "line-two\n"
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["result"] == "line-one\nline-two\n"


async def test_abort_while_awaiting_approval_drops_the_request(start_daemon, anthropic, workspace):
    anthropic.add(
        Turn(text=["resetting"], tools=[ToolUse("bash", '{"command": "git reset --hard"}')])
    )
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    request = await client.expect_type("agent", "permission_request", taskId="t1")
    assert "hard reset" in request["description"]
    reply = await client.request("agent", "abort", taskId="t1")
    assert reply["success"] is True
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "aborted"
    other = await running.connect()
    page = await history(other)
    assert page["pending"] == []
    assert texts([e for e in page["events"] if e["taskId"] == "t1"]) == "resetting"  # work stays
    late = await decide(other, "approve", request["requestId"])
    assert late["code"] == "NOT_FOUND"


@pytest.mark.slow
async def test_abort_kills_a_long_bash_command(start_daemon, anthropic, workspace):
    bash = ToolUse("bash", json.dumps({"command": "echo $$ > pid.txt; sleep 60; echo never"}))
    anthropic.add(Turn(tools=[bash]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "wait", "taskId": "t1"})
    await client.expect_type("agent", "tool_invocation", taskId="t1", status="running")
    await wait_for(
        lambda: (
            (workspace / "pid.txt").exists() and (workspace / "pid.txt").read_text().strip() != ""
        )
    )
    pid = int((workspace / "pid.txt").read_text())
    await client.send({"channel": "agent", "type": "abort", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "aborted"

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    await wait_for(gone, timeout=5)


async def test_prompts_queue_and_run_one_at_a_time(start_daemon, anthropic):
    gate = asyncio.Event()
    anthropic.add(Turn(text=["first"], pause_after=3, gate=gate), Turn(text=["second"]))
    running = await start_agent(start_daemon, anthropic, agent_max_queued=1)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "a", "taskId": "t1"})
    await client.expect_type("agent", "status", taskId="t1", status="running")
    reply = await client.request("agent", "prompt", prompt="b", taskId="t2")
    assert reply["data"]["status"] == "queued"
    queued = await client.expect_type("agent", "status", taskId="t2", status="queued")
    assert queued["prompt"] == "b"
    dup = await client.request("agent", "prompt", prompt="c", taskId="t2")
    assert dup["code"] == "CONFLICT"
    full = await client.request("agent", "prompt", prompt="c", taskId="t3")
    assert full["code"] == "LIMIT_EXCEEDED"  # agent_max_queued=1
    assert len(anthropic.requests) == 1  # t2 waits for t1
    gate.set()
    first = await task_events(client, "t1")
    second = await task_events(client, "t2")
    assert first[-1]["status"] == "completed" and second[-1]["status"] == "completed"
    running_t2 = next(e for e in second if e.get("status") == "running")
    assert running_t2["seq"] > first[-1]["seq"]
    assert texts(second) == "second"


# -- provider errors ---------------------------------------------------------------------------


async def test_429_and_5xx_are_retried(start_daemon, anthropic):
    anthropic.add(
        HttpError(429, "rate limited", "rate_limit_error", retry_after="0"),
        HttpError(529, "overloaded", "overloaded_error"),
        Turn(text=["finally"]),
    )
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "completed" and texts(events) == "finally"
    assert len(anthropic.requests) == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (HttpError(400, "max_tokens: too large", "invalid_request_error"), "max_tokens: too large"),
        (HttpError(401, "invalid x-api-key", "authentication_error"), "invalid x-api-key"),
        (HttpError(503, "still down"), "still down"),  # retries exhausted
        (
            Turn(text=["par"], error={"type": "overloaded_error", "message": "Overloaded"}),
            "Overloaded",
        ),
    ],
)
async def test_provider_errors_fail_the_task_with_the_providers_message(
    start_daemon, anthropic, reply, message
):
    anthropic.add(*([reply] * 3))
    running = await start_agent(start_daemon, anthropic, agent_retry_attempts=2)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    events = await task_events(client, "t1")
    done = events[-1]
    assert done["status"] == "failed" and done["code"] == "PROVIDER_ERROR"
    assert message in done["error"]


async def test_an_unreachable_provider_is_a_provider_error(start_daemon):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    running = await start_daemon(
        anthropic_api_key="k",
        anthropic_base_url=f"http://127.0.0.1:{port}",
        agent_retry_attempts=1,
        agent_retry_base_delay=0.01,
    )
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    done = (await task_events(client, "t1"))[-1]
    assert done["code"] == "PROVIDER_ERROR" and "cannot reach anthropic" in done["error"]


async def test_openai_error_chunk_and_turn_limit(start_daemon, openai):
    openai.add(HttpError(429, "Rate limit reached", "requests", retry_after="0.01"))
    openai.add(Turn(error={"message": "context too long", "type": "invalid_request_error"}))
    loop = ToolUse("list_files", "{}", id="call_l")
    openai.add(Turn(tools=[loop]), Turn(tools=[ToolUse("list_files", "{}", id="call_m")]))
    running = await start_agent(start_daemon, openai, agent_max_turns=2)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    done = (await task_events(client, "t1"))[-1]
    assert done["code"] == "PROVIDER_ERROR" and "context too long" in done["error"]
    assert len(openai.requests) == 2  # the 429 was retried
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t2"})
    done = (await task_events(client, "t2"))[-1]
    assert done["status"] == "failed" and "turn limit" in done["error"]


# -- replay, paging, the connect race, restart ---------------------------------------------------


async def test_history_replays_merged_text_and_pages(start_daemon, anthropic):
    anthropic.add(Turn(text=[f"w{i} " for i in range(30)], thinking=["a", "b", "c"]))
    anthropic.add(Turn(text=["second task"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p1", "taskId": "t1"})
    live = await task_events(client, "t1")
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p2", "taskId": "t2"})
    live += await task_events(client, "t2")
    # The second task saw the first one (prompt and final answer) as context.
    assert anthropic.requests[1]["messages"] == [
        {"role": "user", "content": "p1"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "".join(f"w{i} " for i in range(30))}],
        },
        {"role": "user", "content": "p2"},
    ]
    other = await running.connect()
    page = await history(other)
    assert page["latestSeq"] == live[-1]["seq"] and page["hasMore"] is False
    merged = [e for e in page["events"] if e["type"] == "text"]
    assert [m["content"] for m in merged] == ["".join(f"w{i} " for i in range(30)), "second task"]
    thinking = [e for e in page["events"] if e["type"] == "thinking"]
    assert [t["content"] for t in thinking] == ["abc"]
    assert len(page["events"]) == len(live) - 29 - 2  # 30 text pieces → 1, 3 thinking → 1
    # Paging backwards with beforeSeq/limit covers every stored event exactly once.
    seen: list[int] = []
    before = None
    for _ in range(50):
        fields = {"limit": 7} if before is None else {"limit": 7, "beforeSeq": before}
        reply = await other.request("agent", "history", **fields)
        data = reply["data"]
        raw_count = sum(1 for e in data["events"])
        assert raw_count <= 7
        seen = [e["seq"] for e in data["events"]] + seen
        if not data["hasMore"]:
            break
        before = min(e["seq"] for e in data["events"])
        before = min(before, *(e["seq"] for e in data["events"]))
    assert seen == sorted(seen)
    bad = await other.request("agent", "history", beforeSeq=0)
    assert bad["code"] == "INVALID_MESSAGE"


async def test_connecting_while_a_task_streams_has_no_gap_and_no_duplicate(start_daemon, anthropic):
    pieces = [f"t{i};" for i in range(300)]
    anthropic.add(Turn(text=pieces, chunk_size=0, frame_delay=0.002))
    running = await start_agent(start_daemon, anthropic)
    runner = running.daemon.services.agent
    store = running.daemon.services.transcript
    original = store.history
    injected: list[int] = []

    async def racing_history(**kwargs):
        # Deliberately emit events between subscribe and the read, and during the read.
        injected.append(runner.events.emit("race", ContentPiece("text", "race-m", "A")).seq)
        result = await original(**kwargs)
        injected.append(runner.events.emit("race", ContentPiece("text", "race-m", "B")).seq)
        return result

    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "stream", "taskId": "t1"})
    await client.expect(lambda f: f.get("type") == "text" and f.get("content") == "t20;")
    store.history = racing_history  # type: ignore[method-assign]
    late = await running.connect()
    store.history = original  # type: ignore[method-assign]
    page = await history(late)
    latest = page["latestSeq"]
    after: list[dict[str, Any]] = []
    for _ in range(2000):
        frame = await late.expect(lambda f: f.get("channel") == "agent" and "seq" in f)
        after.append(frame)
        if frame["type"] == "done" and frame["taskId"] == "t1":
            break
    live_seqs = [f["seq"] for f in after]
    assert live_seqs == list(range(latest + 1, latest + 1 + len(live_seqs)))  # no gap, no dup
    assert injected[0] <= latest < injected[1]
    assert injected[1] in live_seqs
    full = "".join(
        e["content"] for e in page["events"] if e["type"] == "text" and e["taskId"] == "t1"
    )
    full += "".join(f["content"] for f in after if f["type"] == "text" and f["taskId"] == "t1")
    assert full == "".join(pieces)


async def test_history_survives_a_daemon_restart(start_daemon, anthropic):
    anthropic.add(Turn(text=["remember ", "me"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    live = await task_events(client, "t1")
    await client.close()
    await running.server.close()
    # Stopping released the transcript's writer thread and the agent's worker.
    assert not [t for t in threading.enumerate() if t.name.startswith("transcript")]
    assert running.daemon.services.agent.queue._worker.done()
    again = await start_agent(start_daemon, anthropic)
    client = await again.connect()
    page = await history(client)
    assert page["latestSeq"] == live[-1]["seq"]
    assert [e["content"] for e in page["events"] if e["type"] == "text"] == ["remember me"]
    assert page["events"][-1]["type"] == "done" and page["events"][-1]["status"] == "completed"
    # seq keeps increasing across the restart.
    anthropic.add(Turn(text=["more"]))
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t2"})
    events = await task_events(client, "t2")
    assert events[0]["seq"] == live[-1]["seq"] + 1


async def test_a_task_running_at_shutdown_is_failed_and_reported(start_daemon, anthropic):
    gate = asyncio.Event()
    anthropic.add(Turn(text=["half"], pause_after=4, gate=gate))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
    await client.expect_type("agent", "text", taskId="t1")
    await client.close()
    await running.server.close()
    gate.set()
    again = await start_agent(start_daemon, anthropic)
    client = await again.connect()
    page = await history(client)
    done = [e for e in page["events"] if e["type"] == "done"]
    assert done[-1]["taskId"] == "t1" and done[-1]["status"] == "failed"
    assert done[-1]["error"] in ("daemon stopped", "daemon restarted")


async def test_agent_errors_without_request_id_are_agent_error_events(daemon):
    client = await daemon.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "approve", "requestId": "nope"})
    # approve carries requestId (the permission request's id), so it gets a reply.
    reply = await client.expect(lambda f: f.get("requestId") == "nope")
    assert reply["success"] is False and reply["code"] == "NOT_FOUND"
    await client.send(
        {"channel": "agent", "type": "tool_response", "toolCallId": "x", "result": "r"}
    )
    frame = await client.expect_type("agent", "error")
    assert frame["code"] == "NOT_FOUND" and "x" in frame["error"]
    await client.send({"channel": "agent", "type": "abort", "taskId": "ghost"})
    frame = await client.expect_type("agent", "error")
    assert frame["code"] == "TASK_NOT_FOUND"
    await client.send({"channel": "agent", "type": "prompt"})
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "INVALID_MESSAGE" and "prompt" in frame["error"]


@pytest.mark.slow
async def test_sigkill_of_the_daemon_mid_stream_keeps_what_was_committed(
    start_daemon, anthropic, tmp_path, workspace
):
    pieces = [f"p{i};" for i in range(3000)]
    anthropic.add(Turn(text=pieces, chunk_size=0, frame_delay=0.002))
    data = tmp_path / "data"
    env = child_env(
        tmp_path, AETHERD_ANTHROPIC_API_KEY="k", AETHERD_ANTHROPIC_BASE_URL=anthropic.base_url
    )
    proc = subprocess.Popen(
        [
            *aetherd_command(),
            "serve",
            "--port=0",
            f"--root={workspace}",
            f"--data-dir={data}",
            f"--token={TOKEN}",
            "--workspace-id=ws-test",
            "--log-format=json",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, _ = await asyncio.to_thread(read_port, proc)
        await wait_ready(port, proc)
        client = await connect(f"http://127.0.0.1:{port}/workspaces/ws-test/ws", TOKEN)
        try:
            await history(client)
            await client.send({"channel": "agent", "type": "prompt", "prompt": "p", "taskId": "t1"})
            await client.expect(lambda f: f.get("type") == "text" and f["content"] == "p100;")
            # A history read commits everything before it: this seq is on disk now.
            committed = (await client.request("agent", "history", limit=1))["data"]["latestSeq"]
            await client.expect(lambda f: f.get("type") == "text" and f["content"] == "p300;")
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream
            await asyncio.to_thread(proc.wait, 10)
        finally:
            await client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(data / "agent.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [row[0] for row in conn.execute("SELECT seq FROM events ORDER BY seq")]
    finally:
        conn.close()
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= committed
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    page = await history(client)
    text = texts([e for e in page["events"] if e["taskId"] == "t1"])
    assert "".join(pieces).startswith(text) and "p100;" in text
    done = page["events"][-1]
    assert done["type"] == "done" and done["status"] == "failed"
    assert done["error"] == "daemon restarted" and done["seq"] == len(seqs) + 2


async def test_every_agent_frame_of_a_running_daemon_matches_the_published_schema(
    start_daemon, anthropic, workspace
):
    import jsonschema

    from aetherd.protocol.schema import build_document

    def check(message: str, frame: dict[str, Any]) -> None:
        schema = {"$ref": f"#/components/messages/{message}/payload", **document}
        errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(frame)]
        assert errors == [], f"{message}: {frame}: {errors}"

    (workspace / "a.txt").write_text("old")
    edit = ToolUse("write_file", json.dumps({"path": "a.txt", "content": "new"}))
    ask = ToolUse("ask_user", json.dumps({"question": "colour?"}))
    bash = ToolUse("bash", json.dumps({"command": "echo hi"}))
    anthropic.add(
        Turn(thinking=["hm"], text=["one"], tools=[edit]),
        Turn(tools=[ask, bash]),
        Turn(text=["two"]),
    )
    gate = asyncio.Event()
    anthropic.add(Turn(text=["stuck"], pause_after=4, gate=gate))
    running = await start_agent(start_daemon, anthropic, agent_permission_mode="ask")
    document = build_document(running.daemon.registry)
    client = await running.connect()
    check("agent.history.push", await history(client))
    queued = await client.request("agent", "prompt", prompt="go", taskId="t1")
    check("agent.prompt.reply", queued)
    request = await client.expect_type("agent", "permission_request", taskId="t1")
    page = await client.request("agent", "history", limit=50)
    check("agent.history.reply", page)
    assert [e["type"] for e in page["data"]["pending"]] == ["permission_request"]
    check("agent.approve.reply", await decide(client, "approve", request["requestId"]))
    question = await client.expect_type("agent", "tool_invocation", toolCallId=ask.id)
    answered = await client.request("agent", "tool_response", toolCallId=ask.id, result="blue")
    check("agent.tool_response.reply", answered)
    request = await client.expect_type("agent", "permission_request", taskId="t1")
    check("agent.reject.reply", await decide(client, "reject", request["requestId"], reason="no"))
    events = await task_events(client, "t1")
    assert question["status"] == "awaiting_input"
    check("agent.settings.reply", await client.request("agent", "settings"))
    check("errorReply", await client.request("agent", "abort", taskId="t1"))  # ended
    await client.send({"channel": "agent", "type": "prompt", "prompt": "wait", "taskId": "t2"})
    await client.expect_type("agent", "text", taskId="t2")
    check("agent.abort.reply", await client.request("agent", "abort", taskId="t2"))
    gate.set()
    await client.send({"channel": "agent", "type": "abort", "taskId": "nope"})
    check("agent.error.push", await client.expect_type("agent", "error"))
    seen = set()
    for event in [*events, request, question]:  # those two were taken out of the stream
        check(f"agent.{event['type']}.push", event)
        seen.add(event["type"])
    assert seen == {
        "status",
        "text",
        "thinking",
        "tool_invocation",
        "permission_request",
        "tool_result",
        "done",
    }
    late = await running.connect()
    replay = await history(late)
    check("agent.history.push", replay)
    assert {e["type"] for e in replay["events"]} == seen
