"""Real coding agents from the npm registry, run for real over ACP, offline.

Gemini CLI (`@google/gemini-cli`) and Claude Code's ACP adapter
(`@zed-industries/claude-code-acp`), pinned in tests/fixtures/acp-agents, run against
`FakeProvider("gemini")` / `FakeProvider("anthropic")`: servers on 127.0.0.1 that speak
each provider's streaming format. The model is scripted: read notes.txt, write
summary.txt, (Claude: run `wc -l` through Bash,) then say it is done. Each agent runs
twice: driven by a minimal ACP client in the test, and as a backend of a real
`aetherd serve` for a WebSocket client. See tests/real_agents.py for the flags and
variables, and docs/agents.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fake_providers import FakeProvider, ToolUse, Turn
from tests.real_agents import (
    GEMINI_MODEL,
    AcpError,
    AcpStdioClient,
    claude_command,
    claude_env,
    ensure_agents,
    gemini_command,
    gemini_env,
)
from tests.support import (
    WsClient,
    aetherd_command,
    child_env,
    connect,
    free_port,
    wait_ready,
)

pytestmark = pytest.mark.slow

NOTES = "The build is green.\nShip it on Friday.\n"
OLD_SUMMARY = "Summary: nothing yet.\n"
SUMMARY = "Summary: the build is green; ship Friday.\n"


def script(provider: FakeProvider) -> None:
    provider.add(
        Turn(tools=[ToolUse("read_file", json.dumps({"file_path": "notes.txt"}))]),
        Turn(
            text=["I read the notes. "],
            tools=[
                ToolUse("write_file", json.dumps({"file_path": "summary.txt", "content": SUMMARY}))
            ],
        ),
        Turn(text=["Wrote summary.txt", " from notes.txt."]),
    )


def function_responses(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool results a request sends back (its last content: the newest turn)."""
    last = body["contents"][-1]
    return [part["functionResponse"] for part in last["parts"] if "functionResponse" in part]


class Served:
    """The client side of the fs capability, on a workspace directory: what was asked."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace.resolve()
        self.log: list[str] = []

    def inside(self, path: str) -> Path:
        target = Path(path).resolve()
        assert target.is_relative_to(self.workspace), path
        return target

    async def read(self, params: dict[str, Any]) -> dict[str, Any]:
        self.log.append("read " + params["path"])
        target = self.inside(params["path"])
        if not target.exists():  # ACP's resourceNotFound
            raise AcpError({"code": -32002, "message": "Resource not found: " + params["path"]})
        return {"content": target.read_text()}

    async def write(self, params: dict[str, Any]) -> None:
        self.log.append("write " + params["path"])
        self.inside(params["path"]).write_text(params["content"])

    async def permission(self, params: dict[str, Any]) -> dict[str, Any]:
        allow = next(o for o in params["options"] if o["kind"] == "allow_once")
        return {"outcome": {"outcome": "selected", "optionId": allow["optionId"]}}


async def run_one_prompt(
    client: AcpStdioClient, served: Served, prompt: str, grace: float = 10
) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """initialize, session/new in the workspace, one session/prompt; then close the agent."""
    client.handlers = {
        "fs/read_text_file": served.read,
        "fs/write_text_file": served.write,
        "session/request_permission": served.permission,
    }
    try:
        await client.start()
        init = await client.request(
            "initialize",
            {
                "protocolVersion": 1,
                "clientCapabilities": {
                    "fs": {"readTextFile": True, "writeTextFile": True},
                    "terminal": False,
                },
            },
        )
        assert init["protocolVersion"] == 1
        session = await client.request(
            "session/new", {"cwd": str(served.workspace), "mcpServers": []}
        )
        result = await client.request(
            "session/prompt",
            {"sessionId": session["sessionId"], "prompt": [{"type": "text", "text": prompt}]},
        )
    finally:
        code = await client.close(grace)
    return init, result, code


async def test_gemini_cli_reads_and_writes_through_the_acp_client(tmp_path: Path) -> None:
    """Standalone ACP round trip: the file reads and writes come to the client (fs/*)."""
    ensure_agents()
    provider = await FakeProvider("gemini").start()
    script(provider)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text(NOTES)
    (workspace / "summary.txt").write_text(OLD_SUMMARY)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    env.update(gemini_env(tmp_path / "home", provider.base_url))
    client = AcpStdioClient(gemini_command(), workspace, env)
    served = Served(workspace)
    try:
        init, result, code = await run_one_prompt(
            client, served, "Summarize notes.txt into summary.txt"
        )
    finally:
        await provider.close()
    assert init["agentInfo"]["name"] == "gemini-cli"
    stderr = "\n".join(client.stderr[-40:])
    assert result["stopReason"] == "end_turn", stderr

    # The write went through the client, as ACP's fs capability promises. Gemini CLI
    # 0.61.0's write_file reads the old content through the client first (for the diff
    # it shows in the permission request, then again before writing); its read_file
    # reads the disk itself and never asks the client (see docs/agents.md).
    summary = workspace / "summary.txt"
    assert served.log == [f"read {summary}", f"read {summary}", f"write {summary}"], stderr
    assert summary.read_text() == SUMMARY

    # The model saw what the client served: the second request carries read_file's output.
    assert len(provider.requests) == 3
    assert all(
        p == f"/v1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse" for p in provider.paths
    )
    assert all(h.get("x-goog-api-key") == "fake-key" for h in provider.headers)
    (read_back,) = function_responses(provider.requests[1])
    assert read_back["name"] == "read_file"
    assert "Ship it on Friday." in json.dumps(read_back["response"])
    (wrote,) = function_responses(provider.requests[2])
    assert wrote["name"] == "write_file"
    assert "Successfully overwrote" in json.dumps(wrote["response"]), wrote

    # The session updates. read_file is announced by a `tool_call`; write_file, which
    # needs the user's consent, first shows up in `session/request_permission` (status
    # pending, with the diff) and then only in `tool_call_update`s: Gemini CLI 0.61.0
    # sends no `tool_call` for it.
    updates = client.updates()
    calls = [u for u in updates if u["sessionUpdate"] == "tool_call"]
    assert [(c["kind"], c["title"]) for c in calls] == [("read", "notes.txt")], calls
    (asked,) = client.requests_from_agent("session/request_permission")
    write_call = asked["toolCall"]
    assert write_call["title"] == "Writing to summary.txt"
    assert {o["kind"] for o in asked["options"]} >= {"allow_once", "reject_once"}
    diff = [c for c in write_call["content"] if c["type"] == "diff"]
    assert diff and diff[0]["oldText"] == OLD_SUMMARY and diff[0]["newText"] == SUMMARY
    completed = [
        u["toolCallId"]
        for u in updates
        if u["sessionUpdate"] == "tool_call_update" and u.get("status") == "completed"
    ]
    assert completed == [calls[0]["toolCallId"], write_call["toolCallId"]]
    text = "".join(
        u["content"]["text"] for u in updates if u["sessionUpdate"] == "agent_message_chunk"
    )
    assert text == "I read the notes. Wrote summary.txt from notes.txt."
    assert code == 0, stderr


async def test_claude_code_reads_and_writes_a_new_file_through_the_acp_client(
    tmp_path: Path,
) -> None:
    """Claude Code's ACP adapter: Read and Write (a new file) both come to the client."""
    ensure_agents()
    workspace = (tmp_path / "ws").resolve()
    workspace.mkdir()
    notes, summary = workspace / "notes.txt", workspace / "summary.txt"
    notes.write_text(NOTES)
    provider = await FakeProvider("anthropic", side_calls=True).start()
    provider.add(
        Turn(tools=[ToolUse("mcp__acp__Read", json.dumps({"file_path": str(notes)}))]),
        Turn(
            text=["I read the notes. "],
            tools=[
                ToolUse(
                    "mcp__acp__Write",
                    json.dumps({"file_path": str(summary), "content": SUMMARY}),
                )
            ],
        ),
        Turn(text=["Wrote summary.txt", " from notes.txt."]),
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    env.update(claude_env(tmp_path / "home", provider.base_url))
    client = AcpStdioClient(claude_command(), workspace, env)
    served = Served(workspace)
    try:
        init, result, _ = await run_one_prompt(
            client, served, "Summarize notes.txt into summary.txt", grace=2
        )
    finally:
        await provider.close()
    stderr = "\n".join(client.stderr[-40:])
    assert init["agentInfo"]["name"] == "@zed-industries/claude-code-acp", init
    assert result["stopReason"] == "end_turn", stderr

    # Both file tools went through the client; the new file was created by its write.
    assert served.log == [f"read {notes}", f"write {summary}"], stderr
    assert summary.read_text() == SUMMARY

    # The model saw what the client served.
    assert len(provider.requests) == 3
    assert all(h.get("x-api-key") == "sk-ant-fake-key" for h in provider.headers)
    results = [
        block
        for message in provider.requests[1]["messages"][-1:]
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    assert results and "Ship it on Friday." in json.dumps(results[0]["content"])

    # The adapter announces each tool call twice with the same id: when the model's
    # stream starts the block (no input yet), and again with the whole input.
    updates = client.updates()
    calls = [u for u in updates if u["sessionUpdate"] == "tool_call"]
    kinds = {c["toolCallId"]: c["kind"] for c in calls}
    assert list(kinds.values()) == ["read", "edit"], calls
    assert calls[-1]["rawInput"] == {"file_path": str(summary), "content": SUMMARY}
    completed = {
        u["toolCallId"]
        for u in updates
        if u["sessionUpdate"] == "tool_call_update" and u.get("status") == "completed"
    }
    assert {c["toolCallId"] for c in calls} <= completed
    text = "".join(
        u["content"]["text"] for u in updates if u["sessionUpdate"] == "agent_message_chunk"
    )
    assert text == "I read the notes. Wrote summary.txt from notes.txt."
    # Read is allowed by itself; Write asks first, with the agent's three options.
    (asked,) = client.requests_from_agent("session/request_permission")
    assert asked["toolCall"]["toolCallId"] == calls[-1]["toolCallId"]
    assert [o["kind"] for o in asked["options"]] == ["allow_always", "allow_once", "reject_once"]


# -- through the daemon ------------------------------------------------------------------

TOKEN = "real-agents-token-0123456789"
WAIT = 120.0  # a real agent's start (node, its bundle) on a loaded machine


class Serve:
    """`aetherd serve` as a real process, with agent backends, logging to a file."""

    def __init__(self, tmp_path: Path, root: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "aetherd.log"
        self._log = self.log_path.open("ab")
        argv = [
            *aetherd_command(), "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--token", TOKEN,
            "--root", str(root), "--data-dir", str(tmp_path / "data"), "--log-format", "json",
            *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=tmp_path, env=child_env(tmp_path, **env), stdout=self._log, stderr=self._log
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        """The daemon's ERROR (or worse) log lines and tracebacks: there should be none."""
        return [
            line
            for line in self.log().splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]

    async def connect(self) -> WsClient:
        await wait_ready(self.port, self.proc, WAIT)
        return await connect(f"ws://127.0.0.1:{self.port}/workspaces/local/ws", TOKEN)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


async def until_done(client: WsClient, task_id: str, approve: bool = True) -> list[dict[str, Any]]:
    """The task's events up to `done`; each permission request is approved from the socket."""
    out: list[dict[str, Any]] = []
    for _ in range(2000):
        frame = await client.expect(
            lambda f: f.get("channel") == "agent" and f.get("taskId") == task_id and "seq" in f,
            WAIT,
        )
        out.append(frame)
        if frame["type"] == "permission_request" and approve:
            # "Allow once": Gemini CLI refuses its "allow always" in a folder it does not
            # trust ("Cannot enable privileged approval modes in an untrusted folder.").
            once = next(o["optionId"] for o in frame["options"] if o["kind"] == "allow_once")
            await client.send(
                {
                    "channel": "agent",
                    "type": "approve",
                    "requestId": frame["requestId"],
                    "optionId": once,
                }
            )
        if frame["type"] == "done":
            return out
    raise AssertionError("too many events")


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def transcript(client: WsClient) -> list[dict[str, Any]]:
    """The stored events, oldest first (history pages forwards from seq 0)."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(100):
        reply = await client.request("agent", "history", WAIT, afterSeq=after)
        assert reply["success"] is True, reply
        page = reply["data"]
        events += page["events"]
        if not page["hasMore"]:
            return events
        after = page["latestSeq"]
    raise AssertionError("too many pages")


async def test_gemini_cli_as_a_daemon_backend(tmp_path: Path) -> None:
    """A real `aetherd serve` drives Gemini CLI over ACP for a WebSocket client."""
    ensure_agents()
    provider = await FakeProvider("gemini").start()
    script(provider)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "notes.txt").write_text(NOTES)
    summary = root / "summary.txt"
    summary.write_text(OLD_SUMMARY)
    inode = summary.stat().st_ino
    home = tmp_path / "home"
    env = {"HOME": str(home), **gemini_env(home, provider.base_url)}
    backend = "gemini=" + shlex.join(gemini_command())
    serve = Serve(tmp_path, root, env, "--agent-backend", backend, "--agent-permission-mode", "ask")
    try:
        client = await serve.connect()
        await client.expect_type("agent", "history", WAIT)
        prompt = "Summarize notes.txt into summary.txt"
        await client.send(
            {
                "channel": "agent",
                "type": "prompt",
                "prompt": prompt,
                "taskId": "t1",
                "backend": "gemini",
            }
        )
        events = await until_done(client, "t1")
        change = await client.expect_type("files", "change", WAIT, path="/summary.txt")
        agents = psutil.Process(serve.proc.pid).children(recursive=True)
        stored = await transcript(client)
        await client.close()
    finally:
        code = serve.stop()
        await provider.close()
    log = serve.log()
    assert events[-1]["status"] == "completed", log[-3000:]
    assert agents, "the agent ran as the daemon's child"
    _, alive = psutil.wait_procs(agents, timeout=10)
    assert alive == [], alive

    # The write is the daemon's: its atomic writer replaced the file (a new inode), where
    # Gemini CLI's own fallback would have rewritten it in place.
    assert summary.read_text() == SUMMARY
    assert summary.stat().st_ino != inode
    assert change["action"] == "modify"  # and the watcher told the socket

    # The events on the socket: the tool calls with their results, the approval the
    # socket gave, the text, and `done completed`.
    invocations = of_type(events, "tool_invocation")
    results = of_type(events, "tool_result")
    assert {e["toolCallId"] for e in invocations} == {e["toolCallId"] for e in results}
    assert len(results) == 2 and not any(e["isError"] for e in results), results
    (asked,) = of_type(events, "permission_request")
    assert "summary.txt" in json.dumps(asked)
    assert {o["kind"] for o in asked["options"]} >= {"allow_once", "reject_once"}
    assert asked["toolCallId"] == results[1]["toolCallId"]
    assert "".join(e["content"] for e in of_type(events, "text")) == (
        "I read the notes. Wrote summary.txt from notes.txt."
    )
    # The model got read_file's result, and write_file's success.
    assert "Ship it on Friday." in json.dumps(function_responses(provider.requests[1]))
    assert "Successfully overwrote" in json.dumps(function_responses(provider.requests[2]))

    # The transcript holds the same task, in order.
    task = [e for e in stored if e["taskId"] == "t1"]
    seqs = [e["seq"] for e in task]
    assert seqs == sorted(seqs) and task[-1]["type"] == "done"
    assert [e["type"] for e in task if e["type"] not in ("text", "thinking")] == [
        e["type"] for e in events if e["type"] not in ("text", "thinking")
    ]
    assert code == 0, log[-3000:]
    assert serve.errors() == []


async def test_claude_code_as_a_daemon_backend(tmp_path: Path) -> None:
    """The daemon serves Claude Code's reads and its new file through its own services."""
    ensure_agents()
    root = (tmp_path / "ws").resolve()
    root.mkdir()
    notes, summary = root / "notes.txt", root / "summary.txt"
    notes.write_text(NOTES)
    provider = await FakeProvider("anthropic", side_calls=True).start()
    read = ToolUse("mcp__acp__Read", json.dumps({"file_path": str(notes)}))
    write = ToolUse("mcp__acp__Write", json.dumps({"file_path": str(summary), "content": SUMMARY}))
    bash = ToolUse(
        "mcp__acp__Bash",
        json.dumps({"command": "wc -l notes.txt", "timeout": 60000, "description": "Count"}),
    )
    provider.add(
        Turn(tools=[read]),
        Turn(text=["I read the notes. "], tools=[write]),
        Turn(tools=[bash]),
        Turn(text=["Wrote summary.txt", " from notes.txt."]),
    )
    home = tmp_path / "home"
    env = {"HOME": str(home), **claude_env(home, provider.base_url)}
    backend = "claude=" + shlex.join(claude_command())
    serve = Serve(tmp_path, root, env, "--agent-backend", backend, "--agent-permission-mode", "ask")
    try:
        client = await serve.connect()
        await client.expect_type("agent", "history", WAIT)
        await client.send(
            {
                "channel": "agent",
                "type": "prompt",
                "prompt": "Summarize notes.txt into summary.txt",
                "taskId": "t1",
                "backend": "claude",
            }
        )
        events = await until_done(client, "t1")
        change = await client.expect_type("files", "change", WAIT, path="/summary.txt")
        agents = psutil.Process(serve.proc.pid).children(recursive=True)
        stored = await transcript(client)
        processes = await client.request("process", "list", WAIT)
        await client.close()
    finally:
        code = serve.stop()
        await provider.close()
    log = serve.log()
    assert events[-1]["status"] == "completed", log[-3000:]
    # Its Bash ran as a process of the daemon's process service (terminal/create), which
    # any client can list, and its output reached the model.
    assert processes["success"] is True, processes
    ran = [p for p in processes["data"]["processes"] if "wc -l notes.txt" in json.dumps(p)]
    assert len(ran) == 1 and ran[0]["exitCode"] == 0, processes
    assert "2 notes.txt" in json.dumps(provider.requests[3]["messages"][-1])
    # The adapter has no file access of its own in the workspace: the read and the new
    # file both went through the daemon's fs/* service; the watcher told the socket.
    assert summary.read_text() == SUMMARY
    assert change["action"] == "create"
    results = {e["toolCallId"]: e for e in of_type(events, "tool_result")}
    assert set(results) == {read.id, write.id, bash.id}
    assert not any(e["isError"] for e in results.values()), results
    assert "Ship it on Friday." in json.dumps(provider.requests[1]["messages"][-1])
    asked = of_type(events, "permission_request")
    assert [e["toolCallId"] for e in asked] == [write.id, bash.id]
    kinds = ["allow_always", "allow_once", "reject_once"]
    assert [o["kind"] for o in asked[0]["options"]] == kinds
    assert "".join(e["content"] for e in of_type(events, "text")) == (
        "I read the notes. Wrote summary.txt from notes.txt."
    )
    task = [e for e in stored if e["taskId"] == "t1"]
    assert [e["seq"] for e in task] == sorted(e["seq"] for e in task)
    assert task[-1]["type"] == "done" and task[-1]["status"] == "completed"
    # The adapter ignores the end of its stdin; the daemon still stopped it, and all
    # it had started (Claude Code's own node process), and exited cleanly.
    assert agents, "the agent ran as the daemon's child"
    _, alive = psutil.wait_procs(agents, timeout=10)
    assert alive == [], alive
    assert code == 0, log[-3000:]
    assert serve.errors() == []


async def test_aborting_gemini_cli_mid_stream(tmp_path: Path) -> None:
    """`abort` while the agent waits on its model: `session/cancel`, then `done aborted`."""
    ensure_agents()
    provider = await FakeProvider("gemini").start()
    gate = asyncio.Event()  # never set: the model stalls after its first piece of text
    provider.add(Turn(text=["Thinking about it", " forever"], pause_after=1, gate=gate))
    provider.add(Turn(text=["Back again."]))
    root = tmp_path / "ws"
    root.mkdir()
    home = tmp_path / "home"
    env = {"HOME": str(home), **gemini_env(home, provider.base_url)}
    backend = "gemini=" + shlex.join(gemini_command())
    serve = Serve(tmp_path, root, env, "--agent-backend", backend)
    try:
        client = await serve.connect()
        await client.expect_type("agent", "history", WAIT)
        prompt = {"channel": "agent", "type": "prompt", "backend": "gemini"}
        await client.send({**prompt, "prompt": "Think", "taskId": "t1"})
        first = await client.expect_type("agent", "text", WAIT, taskId="t1")
        reply = await client.request("agent", "abort", WAIT, taskId="t1")
        events = await until_done(client, "t1")
        # The agent is still usable: the next task runs (on a new process if the
        # daemon had to kill it).
        await client.send({**prompt, "prompt": "Again", "taskId": "t2"})
        again = await until_done(client, "t2")
        await client.close()
    finally:
        gate.set()
        code = serve.stop()
        await provider.close()
    log = serve.log()
    assert reply["success"] is True, reply
    assert events[-1]["type"] == "done" and events[-1]["status"] == "aborted", log[-3000:]
    assert first["content"] == "Thinking about it"
    assert not of_type(events, "text")  # nothing after the abort
    assert again[-1]["status"] == "completed", log[-3000:]
    assert "".join(e["content"] for e in of_type(again, "text")) == "Back again."
    assert code == 0, log[-3000:]
    assert serve.errors() == []
