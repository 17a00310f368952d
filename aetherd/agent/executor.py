"""Tool execution for one model tool call: parse, ask when the mode says so, run, report.

`ToolExecutor.call()` takes a tool call as the provider returned it and gives back
the neutral tool result for the next model call. On the way it emits the call's
events: `tool_invocation` (running, awaiting_approval, awaiting_input, progress),
`permission_request`, and `tool_result`. The tools themselves are in
`aetherd.agent.tools`; who may answer a waiting call is `aetherd.agent.pending`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from aetherd.agent.events import EventLog, PermissionRequest, ToolInvocation, ToolResult
from aetherd.agent.pending import PendingBook, Waiting
from aetherd.agent.permissions import approval_reason, describe
from aetherd.agent.tools import TOOL_NAMES, ToolError, Tools

T = TypeVar("T")


class ToolExecutor:
    """Runs a task's tool calls through the permission check and the tools."""

    def __init__(
        self,
        events: EventLog,
        pending: PendingBook,
        tools: Tools,
        *,
        timeout: float,
        progress_interval: float,
        progress_max: int,
    ) -> None:
        self.events = events
        self.pending = pending
        self.tools = tools
        self.timeout = timeout
        self.progress_interval = progress_interval
        self.progress_max = progress_max

    async def call(
        self, task_id: str, permission_mode: str, call: dict[str, Any]
    ) -> dict[str, Any]:
        """Run one tool call (`{id, name, arguments}`); returns `{id, name, content, is_error}`.

        Sets `call["id"]` (made up when the model sent none) and `call["input"]` (the
        parsed arguments) for the conversation.
        """
        call_id = call.get("id") or uuid.uuid4().hex
        call["id"] = call_id
        name = call.get("name") or ""
        raw = call.get("arguments") or ""
        args: Any
        problem = None
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            args, problem = {}, f"the arguments are not valid JSON ({exc}); send a JSON object"
        if problem is None and not isinstance(args, dict):
            args, problem = {}, "the arguments must be a JSON object"
        call["input"] = args
        if problem is None and name not in TOOL_NAMES:
            problem = f"there is no tool {name!r}; the tools are {', '.join(sorted(TOOL_NAMES))}"
        if problem is not None:
            self._invocation(task_id, call_id, name, args, "running")
            return self._result(task_id, call_id, name, problem, True)

        reason = approval_reason(permission_mode, name, args)
        if reason is not None:
            request_id = uuid.uuid4().hex
            self._invocation(task_id, call_id, name, args, "awaiting_approval")
            asked = self.events.emit(
                task_id,
                PermissionRequest(request_id, call_id, name, args, describe(name, args, reason)),
            )
            decision = await self._wait(task_id, self.pending.approval(request_id, call_id, asked))
            if not decision.approved:
                why = decision.reason
                text = "the user rejected this tool call" + (f": {why}" if why else "")
                return self._result(task_id, call_id, name, text, True)

        if name == "ask_user":
            asked = self._invocation(task_id, call_id, name, args, "awaiting_input")
            answer = await self._wait(task_id, self.pending.question(call_id, asked))
            return self._result(task_id, call_id, name, answer, False)

        self._invocation(task_id, call_id, name, args, "running")
        try:
            if name == "bash":
                progress = Progress(
                    lambda text: self._invocation(task_id, call_id, name, args, "running", text),
                    self.progress_interval,
                    self.progress_max,
                )
                try:
                    text, is_error = await self.tools.bash(args, progress.add)
                finally:
                    progress.close()
            else:
                text = await asyncio.wait_for(self.tools.run(name, args), self.timeout)
                is_error = False
        except ToolError as err:
            text, is_error = str(err), True
        except asyncio.TimeoutError:
            text, is_error = f"the tool timed out after {self.timeout:g}s", True
        except OSError as exc:
            text, is_error = f"the tool failed: {exc}", True
        return self._result(task_id, call_id, name, text, is_error)

    async def _wait(self, task_id: str, waiting: Waiting[T]) -> T:
        """The task waits for a person (already registered, so answerable at once):
        `status awaiting_input`, the answer, then `status running` again."""
        try:
            await self.events.set_status(task_id, "awaiting_input")
            result = await self.pending.wait(waiting)
        finally:
            self.pending.discard(waiting)
        await self.events.set_status(task_id, "running")
        return result

    def _invocation(
        self,
        task_id: str,
        call_id: str,
        name: str,
        args: dict[str, Any],
        status: str,
        progress: str | None = None,
    ) -> Any:
        return self.events.emit(task_id, ToolInvocation(call_id, name, args, status, progress))

    def _result(
        self, task_id: str, call_id: str, name: str, text: str, is_error: bool
    ) -> dict[str, Any]:
        self.events.emit(task_id, ToolResult(call_id, name, text, is_error))
        return {"id": call_id, "name": name, "content": text, "is_error": is_error}


class Progress:
    """Coalesces a running bash's output into `emit(piece)` calls.

    At most one call per `interval` seconds, and at most `budget` characters in all
    (the full, capped output is in the `tool_result`)."""

    def __init__(self, emit: Callable[[str], Any], interval: float, budget: int) -> None:
        self.emit = emit
        self.interval = interval
        self.budget = budget
        self.parts: list[str] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        """Buffer output; schedule a flush."""
        if not text or self.budget <= 0:
            return
        text = text[: self.budget]
        self.budget -= len(text)
        self.parts.append(text)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Emit what is buffered."""
        self.timer = None
        if not self.parts:
            return
        text = "".join(self.parts)
        self.parts.clear()
        self.emit(text)

    def close(self) -> None:
        """Flush the rest and stop."""
        if self.timer is not None:
            self.timer.cancel()
        self.flush()
