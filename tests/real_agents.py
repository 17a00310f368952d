"""Real coding agents from the npm registry, run offline against a fake model server.

tests/fixtures/acp-agents pins them (package.json + package-lock.json; `.ci/run` runs
`npm ci --prefix tests/fixtures/acp-agents`, and `ensure_agents()` does it when the
install is missing). Today: `@google/gemini-cli` in its ACP mode (`gemini --acp`).

How Gemini CLI 0.61.0 is pointed at the fake server, read from its bundle
(bundle/chunk-*.js, `createContentGeneratorConfig` and `createContentGenerator`):
- `GOOGLE_GEMINI_BASE_URL` set makes the auth type `gateway` (in ACP mode,
  `AcpSessionManager.newSession` picks it when no auth type is saved in the settings),
  and the `@google/genai` client then sends every request to that base URL;
- `GEMINI_API_KEY` is sent as the `x-goog-api-key` header;
- `-m MODEL` names the model: with the default `auto`, a routing classifier makes one
  more (non-streaming) request before each turn;
- `GEMINI_CLI_HOME` is where it keeps `.gemini/settings.json` and its state (a fresh
  directory per test); the settings below turn off auto-update, update notices, usage
  statistics and telemetry;
- `GEMINI_CLI_NO_RELAUNCH=1`: it does not re-spawn itself in a child node process (so the
  agent's pid is the process that speaks ACP).

And `@zed-industries/claude-code-acp` (Zed's ACP adapter around the Claude Agent SDK,
which bundles Claude Code's cli.js; `claude-code-acp`, no flags), read from its dist/ and
the SDK's cli.js:
- `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY` (sent as `x-api-key`);
- `CLAUDE_CONFIG_DIR` for its state (a fresh directory per test);
- `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`: no telemetry, error reports, update checks;
- `IS_SANDBOX=1` (see `claude_env`).
Besides the turns, it sends `POST /v1/messages/count_tokens` and one non-streaming
`/v1/messages` request (max_tokens 1) per session, which `FakeProvider` answers aside.
It keeps running when its stdin closes, so `close()` kills it after `grace` seconds.

This module also holds `AcpStdioClient`, a minimal ACP client (JSON-RPC 2.0, one JSON
object per line, over the agent's stdio) that the tests use to drive an agent without
the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "fixtures" / "acp-agents"
GEMINI_JS = FIXTURE / "node_modules" / "@google" / "gemini-cli" / "bundle" / "gemini.js"
GEMINI_VERSION = "0.61.0"
GEMINI_MODEL = "gemini-2.5-flash"

CLAUDE_JS = FIXTURE / "node_modules" / "@zed-industries" / "claude-code-acp" / "dist" / "index.js"
CLAUDE_ACP_VERSION = "0.16.2"

GEMINI_SETTINGS = {
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
}


def ensure_agents() -> None:
    """The fixture's node_modules, installed from its package-lock when missing."""
    if not (GEMINI_JS.exists() and CLAUDE_JS.exists()):
        npm = shutil.which("npm")
        assert npm, "npm is required for the real-agent tests"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=FIXTURE,
            check=True,
            timeout=600,
            stdout=subprocess.DEVNULL,
        )
    assert GEMINI_JS.exists() and CLAUDE_JS.exists()


def node() -> str:
    path = shutil.which("node")
    assert path, "node is required for the real-agent tests"
    return path


def gemini_command() -> list[str]:
    """The command line of Gemini CLI in ACP mode."""
    return [node(), str(GEMINI_JS), "--acp", "-m", GEMINI_MODEL]


def gemini_env(home: Path, base_url: str) -> dict[str, str]:
    """The variables Gemini CLI needs to run offline against `base_url` (see above)."""
    (home / ".gemini").mkdir(parents=True, exist_ok=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(GEMINI_SETTINGS))
    return {
        "GEMINI_CLI_HOME": str(home),
        "GOOGLE_GEMINI_BASE_URL": base_url,
        "GEMINI_API_KEY": "fake-key",
        "GEMINI_CLI_NO_RELAUNCH": "1",
        "NO_COLOR": "1",
    }


def claude_command() -> list[str]:
    """The command line of Claude Code's ACP adapter."""
    return [node(), str(CLAUDE_JS)]


def claude_env(home: Path, base_url: str) -> dict[str, str]:
    """The variables Claude Code's ACP adapter needs to run offline against `base_url`."""
    (home / ".claude").mkdir(parents=True, exist_ok=True)
    return {
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-fake-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # As root, the adapter offers "bypass permissions" (and starts Claude Code with
        # --dangerously-skip-permissions) when IS_SANDBOX is any non-empty value, while
        # Claude Code accepts that flag as root only with IS_SANDBOX=1 and otherwise
        # exits: session/new then fails with "Internal error". Make both agree.
        "IS_SANDBOX": "1",
        "NO_COLOR": "1",
    }


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AcpError(Exception):
    """An error answer to a request."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


class AcpStdioClient:
    """Drives one agent process over ACP: requests, notifications, and the agent's requests.

    `handlers` answer the agent's requests by method (`fs/read_text_file`, ...); a
    method without one gets `-32601`. Every message received is kept in `received`.
    """

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.command = command
        self.cwd = cwd
        self.env = env
        self.handlers: dict[str, Handler] = {}
        self.received: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._answering: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=8 * 1024 * 1024,
            start_new_session=True,
        )
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(message) + "\n").encode())
        await self._proc.stdin.drain()

    async def request(self, method: str, params: dict[str, Any], timeout: float = 120) -> Any:
        self._next += 1
        ident = self._next
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._send({"jsonrpc": "2.0", "id": ident, "method": method, "params": params})
        return await asyncio.wait_for(future, timeout)

    async def _answer(self, message: dict[str, Any]) -> None:
        handler = self.handlers.get(message["method"])
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        if handler is None:
            reply["error"] = {"code": -32601, "message": f"no method {message['method']}"}
        else:
            try:
                reply["result"] = await handler(message.get("params") or {})
            except AcpError as exc:
                reply["error"] = exc.error
            except Exception as exc:  # the agent gets the error, the test sees it in received
                reply["error"] = {"code": -32603, "message": str(exc)}
        await self._send(reply)

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            message = json.loads(line)
            self.received.append(message)
            if "method" in message and "id" in message:
                task = asyncio.create_task(self._answer(message))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            elif "method" not in message:
                future = self._pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(AcpError(message["error"]))
                    else:
                        future.set_result(message.get("result"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EOFError("the agent closed its stdout"))

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for line in self._proc.stderr:
            if len(self.stderr) < 2000:
                self.stderr.append(line.decode(errors="replace").rstrip())

    def updates(self) -> list[dict[str, Any]]:
        """The `session/update` payloads received so far, in order."""
        return [m["params"]["update"] for m in self.received if m.get("method") == "session/update"]

    def requests_from_agent(self, method: str) -> list[dict[str, Any]]:
        return [m["params"] for m in self.received if m.get("method") == method and "id" in m]

    async def close(self, grace: float = 10) -> int | None:
        """Close stdin (ACP's end of session), wait `grace` seconds, then kill the group."""
        proc = self._proc
        if proc is None:
            return None
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await asyncio.wait_for(proc.wait(), 10)
        with contextlib.suppress(ProcessLookupError):  # whatever it left in its group
            os.killpg(proc.pid, 9)
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        return proc.returncode
