"""The agent channel (docs/protocol.md section 4): thin handlers over `services.agent`.

The service emits domain events (`aetherd.agent.events`); this module turns each
recorded event into its frame (`aetherd.protocol.agent`), encoded once per event
however many connections receive it.

Replay on connect: the connection's subscriber is registered BEFORE the history is
read. Events that arrive meanwhile are held back; once the history frame (covering
everything up to `latestSeq`) is queued, the held events with `seq > latestSeq` follow
and the subscriber goes live. No gap, no duplicate.

A handler failure on a frame without `requestId` is pushed to that connection as an
agent `error` event (`error`, `code`), since it belongs to no task.

A lazy channel (`aetherd.channels`): imported at the first connection (its history
push), which also builds and starts the agent service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aetherd.agent.events import Recorded
from aetherd.agent.runner import AgentRunner, HistoryPage
from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, dumps, encode
from aetherd.protocol.agent import (
    ALL_TASKS,
    MAX_SEQ,
    PUSHES,
    AbortReply,
    AgentAbort,
    AgentApprove,
    AgentErrorEvent,
    AgentHistory,
    AgentHistoryFrame,
    AgentPrompt,
    AgentReject,
    AgentSettings,
    AgentSubscribe,
    AgentToolResponse,
    AgentUnsubscribe,
    DecisionReply,
    HistoryReply,
    PromptReply,
    SettingsReply,
    SubscribeReply,
    ToolResponseReply,
    event_item,
)
from aetherd.protocol.context import Context, Slot

channel = Channel("agent", pushes=PUSHES)

T = TypeVar("T")
FRAME_KEY = "agent.frame"  # where a recorded event keeps its encoded frame


def frame_text(recorded: Recorded) -> str:
    """The event's push frame, encoded once and kept on the recorded event."""
    text = recorded.cache.get(FRAME_KEY)
    if text is None:
        text = recorded.cache[FRAME_KEY] = encode(event_item(recorded.record(), frame=True))
    return str(text)


def history_frame_text(page: HistoryPage) -> str:
    """The `history` frame pushed on connect, encoded by hand: the hot path.

    A page can hold 10,000 events; validating each into its model tripled the time to
    the client's first screen (bench/agent.py). The stored events already have the
    wire form of their models (`tests/protocol/test_agent_frames.py` proves the bytes
    equal `encode(AgentHistoryFrame(...))`, for every event type and for transcripts
    written before the models), so they are serialised as they are. Text that cannot
    be encoded takes the model path, which replaces it.
    """
    text = dumps(
        {
            "channel": "agent",
            "type": "history",
            "events": page.events,
            "latestSeq": page.latest_seq,
            "hasMore": page.has_more,
            "pending": page.pending,
        }
    )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        body = history_reply(page)
        return encode(
            AgentHistoryFrame(
                events=body.events,
                latest_seq=body.latest_seq,
                has_more=body.has_more,
                pending=body.pending,
            )
        )
    return text


def history_reply(page: HistoryPage) -> HistoryReply:
    """A transcript page as the `history` reply's data."""
    return HistoryReply(
        events=[event_item(e) for e in page.events],
        latest_seq=page.latest_seq,
        has_more=page.has_more,
        pending=[event_item(e) for e in page.pending],
    )


async def _guard(ctx: Context, func: Callable[[], Awaitable[T]]) -> T | None:
    """Run `func`; without a requestId, report a failure as an agent `error` event.

    The agent is built on first use (`aetherd.daemon`): started here if need be.
    """
    await ctx.services.ensure("agent")
    try:
        return await func()
    except AetherError as err:
        if ctx.request_id is not None:
            raise
        ctx.peer.send(AgentErrorEvent(error=err.message, code=err.code, **err.extra))
        return None


@channel.handler(
    "prompt",
    AgentPrompt,
    reply=PromptReply | None,
    errors=(
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.CONFLICT,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.PROVIDER_NOT_CONFIGURED,
    ),
    concurrent=True,
)
async def prompt(ctx: Context, msg: AgentPrompt) -> PromptReply | None:
    """Queue a task; `data: {taskId, status}`."""

    async def run() -> PromptReply:
        queued = await ctx.services.agent.prompt(msg.prompt, msg.task_id, msg.backend)
        if queued.code is not None and ctx.request_id is not None:
            # The task failed at once (no key): its `done` is out; the reply fails too.
            raise AetherError(
                ErrorCode(queued.code), queued.error or queued.code, taskId=queued.task_id
            )
        return PromptReply(task_id=queued.task_id, status=queued.status)

    return await _guard(ctx, run)


@channel.handler(
    "settings",
    AgentSettings,
    reply=SettingsReply | None,
    errors=(ErrorCode.INVALID_MESSAGE,),
    concurrent=True,
)
async def settings(ctx: Context, msg: AgentSettings) -> SettingsReply | None:
    """Persist defaults; `data: {provider, model, permissionMode}` in force."""

    async def run() -> SettingsReply:
        now = await ctx.services.agent.update_settings(
            msg.provider, msg.model, msg.permission_mode, msg.backend
        )
        return SettingsReply(
            provider=now.provider,
            model=now.model,
            permission_mode=now.permission_mode,
            backend=now.backend,
        )

    return await _guard(ctx, run)


@channel.handler(
    "abort",
    AgentAbort,
    reply=AbortReply | None,
    errors=(ErrorCode.TASK_NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.INVALID_MESSAGE),
    concurrent=True,
)
async def abort(ctx: Context, msg: AgentAbort) -> AbortReply | None:
    """Cancel a task; the reply follows its `done`."""

    async def run() -> AbortReply:
        return AbortReply(task_id=await ctx.services.agent.abort(msg.task_id))

    return await _guard(ctx, run)


@channel.handler(
    "tool_response",
    AgentToolResponse,
    reply=ToolResponseReply | None,
    errors=(ErrorCode.NOT_FOUND,),
)
async def tool_response(ctx: Context, msg: AgentToolResponse) -> ToolResponseReply | None:
    """Answer an `ask_user` call."""

    async def run() -> ToolResponseReply:
        task_id = ctx.services.agent.answer(msg.tool_call_id, msg.result)
        return ToolResponseReply(tool_call_id=msg.tool_call_id, task_id=task_id)

    return await _guard(ctx, run)


async def _decide(
    ctx: Context,
    request_id: str,
    approved: bool,
    reason: str | None,
    option_id: str | None = None,
) -> DecisionReply | None:
    async def run() -> DecisionReply:
        task_id = ctx.services.agent.decide(request_id, approved, reason, option_id)
        return DecisionReply(request_id=request_id, task_id=task_id, approved=approved)

    return await _guard(ctx, run)


@channel.handler(
    "approve",
    AgentApprove,
    reply=DecisionReply | None,
    errors=(ErrorCode.NOT_FOUND, ErrorCode.INVALID_MESSAGE),
)
async def approve(ctx: Context, msg: AgentApprove) -> DecisionReply | None:
    """Allow a pending permission request (with one of an ACP agent's `optionId`s)."""
    return await _decide(ctx, msg.request_id, True, None, msg.option_id)


@channel.handler("reject", AgentReject, reply=DecisionReply | None, errors=(ErrorCode.NOT_FOUND,))
async def reject(ctx: Context, msg: AgentReject) -> DecisionReply | None:
    """Deny a pending permission request; the reason goes back to the model."""
    return await _decide(ctx, msg.request_id, False, msg.reason)


@channel.handler(
    "history",
    AgentHistory,
    reply=HistoryReply | None,
    errors=(ErrorCode.INVALID_MESSAGE,),
    concurrent=True,
)
async def history(ctx: Context, msg: AgentHistory) -> HistoryReply | None:
    """A page of older (`beforeSeq`) or newer (`afterSeq`) events:
    `data: {events, latestSeq, hasMore, pending}`."""

    async def run() -> HistoryReply:
        page = await ctx.services.agent.history(msg.before_seq, msg.limit, msg.after_seq)
        return history_reply(page)

    return await _guard(ctx, run)


class TaskFilter:
    """Which task's live events a connection receives: `task_id` None means every task."""

    __slots__ = ("task_id",)

    def __init__(self) -> None:
        self.task_id: str | None = None

    def wants(self, recorded: Recorded) -> bool:
        """True when `recorded` goes to this connection. An event of no task always does."""
        return self.task_id is None or recorded.task_id in (None, self.task_id)


FILTER: Slot[TaskFilter] = Slot("agent.filter", TaskFilter)


@channel.handler("subscribe", AgentSubscribe, reply=SubscribeReply | None)
async def subscribe(ctx: Context, msg: AgentSubscribe) -> SubscribeReply | None:
    """Narrow the live events this socket gets to `taskId` (`"*"`: all); `data: {taskId}`."""
    ctx.peer.slot(FILTER).task_id = None if msg.task_id == ALL_TASKS else msg.task_id
    return SubscribeReply(task_id=msg.task_id)


@channel.handler("unsubscribe", AgentUnsubscribe, reply=SubscribeReply | None)
async def unsubscribe(ctx: Context, msg: AgentUnsubscribe) -> SubscribeReply | None:
    """Receive the live events of every task again; `data: {taskId: "*"}`."""
    ctx.peer.slot(FILTER).task_id = None
    return SubscribeReply(task_id=ALL_TASKS)


HISTORY_PARAM = "agentHistory"


def connect_history(value: str | None) -> tuple[bool, int | None]:
    """What `?agentHistory=` asks of the connect push: (push at all, after which seq).

    Absent or `all`: the v1 push, `(True, None)`. `none`: no push, `(False, None)`.
    `after:SEQ`: the events after SEQ, `(True, SEQ)`. Anything else raises ValueError.
    """
    if value is None or value == "all":
        return True, None
    if value == "none":
        return False, None
    prefix, _, number = value.partition(":")
    if prefix == "after" and number.isascii() and number.isdigit() and len(number) <= 19:
        seq = int(number)
        if seq <= MAX_SEQ:
            return True, seq
    raise ValueError(
        f"invalid query parameter '{HISTORY_PARAM}': expected 'all', 'none' or "
        f"'after:SEQ' (SEQ from 0 to {MAX_SEQ}); the whole history follows"
    )


@channel.on_connect
async def push_history(ctx: Context) -> None:
    """Subscribe, then push `history`, then the events that arrived meanwhile.

    `?agentHistory=none` skips the push (the subscriber goes live at once);
    `?agentHistory=after:SEQ` pushes only the events after SEQ, oldest first.
    """
    runner: AgentRunner = await ctx.services.ensure("agent")  # built on first use
    peer = ctx.peer
    wanted = peer.slot(FILTER).wants
    try:
        push, after_seq = connect_history(peer.query.get(HISTORY_PARAM))
    except ValueError as exc:
        error = {"error": str(exc), "code": ErrorCode.INVALID_MESSAGE, "field": HISTORY_PARAM}
        peer.send(AgentErrorEvent.model_validate(error))
        push, after_seq = True, None
    held: list[Recorded] = []
    state: dict[str, Any] = {"live": not push, "latest": 0}

    def deliver(recorded: Recorded) -> None:
        if not wanted(recorded):
            return
        if state["live"]:
            if recorded.seq > state["latest"]:
                peer.send(frame_text(recorded))
        else:
            held.append(recorded)

    peer.add_cleanup(runner.subscribe(deliver))
    if not push:
        return
    try:
        page = await runner.history(after_seq=after_seq)
    except BaseException:
        # No history: still deliver live events rather than hold them forever.
        for recorded in held:
            if wanted(recorded):
                peer.send(frame_text(recorded))
        held.clear()
        state["live"] = True
        raise
    latest = page.latest_seq
    peer.send(history_frame_text(page))
    state["latest"] = latest
    for recorded in held:
        if recorded.seq > latest and wanted(recorded):
            peer.send(frame_text(recorded))
            latest = recorded.seq
    held.clear()
    state["latest"] = latest
    state["live"] = True
