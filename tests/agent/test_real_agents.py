"""A real coding agent from the npm registry, run for real over ACP, offline.

Gemini CLI (`@google/gemini-cli`, pinned in tests/fixtures/acp-agents) runs in its ACP
mode against `FakeProvider("gemini")`, a server on 127.0.0.1 that speaks the Gemini
API's streaming format. The model is scripted: call `read_file` on notes.txt, then
`write_file` for summary.txt, then say it is done. See tests/real_agents.py for the
flags and variables, and docs/agents.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    provider = await FakeProvider("anthropic").start()
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
