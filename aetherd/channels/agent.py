"""The agent channel (PROTOCOL.md section 4): thin handlers over `services.agent`.

Replay on connect: the connection's subscriber is registered BEFORE the history is
read. Events that arrive meanwhile are held back; once the history frame (covering
everything up to `latestSeq`) is queued, the held events with `seq > latestSeq` follow
and the subscriber goes live. No gap, no duplicate.

A handler failure on a frame without `requestId` is pushed to that connection as an
agent `error` event (`error`, `code`), since it belongs to no task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import Field

from aetherd.errors import AetherError
from aetherd.protocol import Channel, Message
from aetherd.protocol.context import Context

channel = Channel("agent")


class AgentPrompt(Message):
    """`prompt`: start (or queue) a task."""

    prompt: str
    task_id: str | None = None


class AgentSettings(Message):
    """`settings`: persist the agent's defaults."""

    provider: str | None = None
    model: str | None = None
    permission_mode: str | None = None


class AgentAbort(Message):
    """`abort`: cancel a task."""

    task_id: str


class AgentToolResponse(Message):
    """`tool_response`: answer an `ask_user` call."""

    tool_call_id: str
    result: str


class AgentApprove(Message):
    """`approve`: allow a pending permission request (its id travels as `requestId`)."""

    request_id: str


class AgentReject(Message):
    """`reject`: deny a pending permission request, optionally saying why."""

    request_id: str
    reason: str | None = None


class AgentHistory(Message):
    """`history`: page back through the transcript."""

    before_seq: int | None = Field(None, ge=1, le=2**63 - 1)
    limit: int | None = Field(None, ge=1, le=2**63 - 1)


async def _guard(ctx: Context, func: Callable[[], Awaitable[Any]]) -> Any:
    """Run `func`; without a requestId, report a failure as an agent `error` event."""
    try:
        return await func()
    except AetherError as err:
        if ctx.request_id is not None:
            raise
        frame = {"channel": "agent", "type": "error", "error": err.message, "code": err.code.value}
        frame.update(err.extra)
        ctx.peer.send(frame)
        return None


@channel.handler("prompt", AgentPrompt, concurrent=True)
async def prompt(ctx: Context, msg: AgentPrompt) -> Any:
    """Queue a task; `data: {taskId, status}`."""

    async def run() -> Any:
        result = await ctx.services.agent.prompt(msg.prompt, msg.task_id)
        if result.get("code") and ctx.request_id is not None:
            # The task failed at once (no key): its `done` is out; the reply fails too.
            raise AetherError(result["code"], result["error"], taskId=result["taskId"])
        return result

    return await _guard(ctx, run)


@channel.handler("settings", AgentSettings, concurrent=True)
async def settings(ctx: Context, msg: AgentSettings) -> Any:
    """Persist defaults; `data: {provider, model, permissionMode}` in force."""

    async def run() -> Any:
        return await ctx.services.agent.update_settings(
            msg.provider, msg.model, msg.permission_mode
        )

    return await _guard(ctx, run)


@channel.handler("abort", AgentAbort, concurrent=True)
async def abort(ctx: Context, msg: AgentAbort) -> Any:
    """Cancel a task; the reply follows its `done`."""

    async def run() -> Any:
        return await ctx.services.agent.abort(msg.task_id)

    return await _guard(ctx, run)


@channel.handler("tool_response", AgentToolResponse)
async def tool_response(ctx: Context, msg: AgentToolResponse) -> Any:
    """Answer an `ask_user` call."""

    async def run() -> Any:
        return ctx.services.agent.answer(msg.tool_call_id, msg.result)

    return await _guard(ctx, run)


@channel.handler("approve", AgentApprove)
async def approve(ctx: Context, msg: AgentApprove) -> Any:
    """Allow a pending permission request."""

    async def run() -> Any:
        return ctx.services.agent.decide(msg.request_id, True)

    return await _guard(ctx, run)


@channel.handler("reject", AgentReject)
async def reject(ctx: Context, msg: AgentReject) -> Any:
    """Deny a pending permission request; the reason goes back to the model."""

    async def run() -> Any:
        return ctx.services.agent.decide(msg.request_id, False, msg.reason)

    return await _guard(ctx, run)


@channel.handler("history", AgentHistory, concurrent=True)
async def history(ctx: Context, msg: AgentHistory) -> Any:
    """A page of older events: `data: {events, latestSeq, hasMore, pending}`."""

    async def run() -> Any:
        return await ctx.services.agent.history(msg.before_seq, msg.limit)

    return await _guard(ctx, run)


@channel.on_connect
async def push_history(ctx: Context) -> None:
    """Subscribe, then push `history`, then the events that arrived meanwhile."""
    runner = ctx.services.agent
    peer = ctx.peer
    held: list[tuple[int, str]] = []
    state: dict[str, Any] = {"live": False, "latest": 0}

    def deliver(event: dict[str, Any], text: str) -> None:
        if state["live"]:
            if event["seq"] > state["latest"]:
                peer.send(text)
        else:
            held.append((event["seq"], text))

    peer.add_cleanup(runner.subscribe(deliver))
    try:
        page = await runner.history()
    except BaseException:
        # No history: still deliver live events rather than hold them forever.
        for _seq, text in held:
            peer.send(text)
        held.clear()
        state["live"] = True
        raise
    latest = page["latestSeq"]
    peer.send({"channel": "agent", "type": "history", **page})
    state["latest"] = latest
    for seq, text in held:
        if seq > latest:
            peer.send(text)
            latest = seq
    held.clear()
    state["latest"] = latest
    state["live"] = True
