"""The agent channel's messages, both ways (docs/protocol.md section 4).

Client → server: `AgentPrompt`, `AgentSettings`, `AgentAbort`, `AgentToolResponse`,
`AgentApprove`, `AgentReject`, `AgentHistory`, `AgentSubscribe`, `AgentUnsubscribe`.

Server → client: the transcript events (`status`, `text`, `thinking`,
`tool_invocation`, `permission_request`, `tool_result`, `done`), each
`{channel: "agent", type, taskId, seq, createdAt, ...}`; the `history` frame; and the
`error` event (a failure that belongs to no task).

Inside a `history` page (`events`, `pending`) the same events appear without
`channel`: their `channel` field is None there and left out. `event_item()` reads a
stored event (as the transcript returns it) into its model; an event of a type this
daemon does not know (a transcript from another version) is kept as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from aetherd.errors import ErrorCode
from aetherd.protocol.models import Frame, Message, Model, omitted

MAX_SEQ = 2**63 - 1  # seq is an SQLite INTEGER
MAX_TASK_ID = 128
MAX_MODEL = 256
MAX_ID = 1024  # tool call and permission request ids (made by a model, or uuid hex by us)
MAX_BACKEND = 64  # = the name rule of aetherd.settings.BACKEND_NAME
Provider = Literal["anthropic", "openai", "openrouter"]  # = aetherd.agent.defaults.PROVIDERS
PermissionMode = Literal["auto", "ask", "full"]  # = aetherd.agent.permissions.MODES

# -- client → server --------------------------------------------------------------------


class AgentPrompt(Message):
    """`prompt`: start (or queue) a task."""

    prompt: str
    task_id: str | None = Field(None, min_length=1, max_length=MAX_TASK_ID)
    backend: str | None = Field(None, min_length=1, max_length=MAX_BACKEND)


class AgentSettings(Message):
    """`settings`: persist the agent's defaults."""

    provider: Provider | None = None
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL)
    permission_mode: PermissionMode | None = None
    backend: str | None = Field(None, min_length=1, max_length=MAX_BACKEND)


class AgentAbort(Message):
    """`abort`: cancel a task."""

    task_id: str = Field(min_length=1, max_length=MAX_TASK_ID)


class AgentToolResponse(Message):
    """`tool_response`: answer an `ask_user` call."""

    tool_call_id: str = Field(min_length=1, max_length=MAX_ID)
    result: str


class AgentApprove(Message):
    """`approve`: allow a pending permission request (its id travels as `requestId`);
    `optionId` picks one of an ACP agent's allow options."""

    request_id: str = Field(min_length=1, max_length=MAX_ID)
    option_id: str | None = Field(None, min_length=1, max_length=MAX_ID)


class AgentReject(Message):
    """`reject`: deny a pending permission request, optionally saying why."""

    request_id: str = Field(min_length=1, max_length=MAX_ID)
    reason: str | None = None


class AgentHistory(Message):
    """`history`: page back (`beforeSeq`) or forward (`afterSeq`) through the transcript."""

    before_seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    after_seq: int | None = Field(None, ge=0, le=MAX_SEQ)
    limit: int | None = Field(None, ge=1, le=MAX_SEQ)


ALL_TASKS = "*"


class AgentSubscribe(Message):
    """`subscribe`: narrow this socket's live agent events to one task (`"*"`: all)."""

    task_id: str = Field(ALL_TASKS, min_length=1, max_length=MAX_TASK_ID)


class AgentUnsubscribe(Message):
    """`unsubscribe`: receive the live events of every task again."""


# -- reply data ------------------------------------------------------------------------


class PromptReply(Model):
    """`prompt` → the task and its status (`queued`)."""

    task_id: str
    status: str


class SettingsReply(Model):
    """`settings` → the settings in force."""

    provider: str
    model: str
    permission_mode: str
    backend: str = "builtin"


class AbortReply(Model):
    """`abort` → sent after the task's `done`."""

    task_id: str
    status: Literal["aborted"] = "aborted"


class ToolResponseReply(Model):
    """`tool_response` → the call answered and its task."""

    tool_call_id: str
    task_id: str


class SubscribeReply(Model):
    """`subscribe` / `unsubscribe` → the task whose live events this socket gets (`"*"`: all)."""

    task_id: str


class DecisionReply(Model):
    """`approve` / `reject` → the request decided, its task, and the decision."""

    request_id: str
    task_id: str
    approved: bool


# -- events (stored in the transcript, pushed live, replayed in history) -----------------


class AgentEvent(Frame):
    """What every transcript event carries. `channel` is left out inside a history page."""

    channel: Literal["agent"] | None = omitted("agent")  # type: ignore[assignment]
    type: str
    task_id: str | None
    seq: int = Field(ge=0, le=MAX_SEQ)
    created_at: str


class AgentStatus(AgentEvent):
    """`status`: a task's status; `prompt` travels with `queued`."""

    type: Literal["status"] = "status"
    status: str
    prompt: str | None = omitted()


class AgentText(AgentEvent):
    """`text`: a piece of the model's answer, in content block `messageId`."""

    type: Literal["text"] = "text"
    message_id: str
    content: str


class AgentThinking(AgentEvent):
    """`thinking`: a piece of the model's thinking, in content block `messageId`."""

    type: Literal["thinking"] = "thinking"
    message_id: str
    content: str


class AgentToolInvocation(AgentEvent):
    """`tool_invocation`: a tool call in `status`; `progress` is a piece of bash output."""

    type: Literal["tool_invocation"] = "tool_invocation"
    tool_call_id: str
    name: str
    input: dict[str, Any]
    status: str
    progress: str | None = omitted()


class PermissionOptionItem(Model):
    """One of an ACP agent's answers to a permission request."""

    option_id: str
    name: str
    kind: str


class AgentPermissionRequest(AgentEvent):
    """`permission_request`: a tool call waiting for approval (`approve` / `reject`);
    `options` when an ACP agent asks."""

    type: Literal["permission_request"] = "permission_request"
    request_id: str
    tool_call_id: str
    name: str
    input: dict[str, Any]
    description: str
    options: list[PermissionOptionItem] | None = omitted()


class PlanEntry(Model):
    """One entry of an ACP agent's plan."""

    content: str
    priority: str
    status: str


class AgentPlan(AgentEvent):
    """`plan`: an ACP agent's whole plan, as it is now."""

    type: Literal["plan"] = "plan"
    entries: list[PlanEntry]


class AgentToolResult(AgentEvent):
    """`tool_result`: a tool call's `result`, or its `error` when `isError`."""

    type: Literal["tool_result"] = "tool_result"
    tool_call_id: str
    name: str
    is_error: bool
    result: str | None = omitted()
    error: str | None = omitted()


class Usage(Model):
    """Tokens summed over a task's model calls."""

    input_tokens: int
    output_tokens: int


class AgentDone(AgentEvent):
    """`done`: a task ended, with its usage, and `error` and `code` when it failed."""

    type: Literal["done"] = "done"
    status: str
    usage: Usage
    error: str | None = omitted()
    code: str | None = omitted()


class AgentOtherEvent(AgentEvent):
    """A stored event of a type this daemon does not emit (another version's): replayed
    as it was stored."""

    model_config = ConfigDict(extra="allow")


KnownEvent = Annotated[
    AgentStatus
    | AgentText
    | AgentThinking
    | AgentToolInvocation
    | AgentPermissionRequest
    | AgentToolResult
    | AgentDone
    | AgentPlan,
    Field(discriminator="type"),
]
EventItem = (
    AgentStatus
    | AgentText
    | AgentThinking
    | AgentToolInvocation
    | AgentPermissionRequest
    | AgentToolResult
    | AgentDone
    | AgentPlan
    | AgentOtherEvent
)
EVENT_TYPES: tuple[type[AgentEvent], ...] = (
    AgentStatus,
    AgentText,
    AgentThinking,
    AgentToolInvocation,
    AgentPermissionRequest,
    AgentToolResult,
    AgentDone,
    AgentPlan,
)
# Built on first use, like the models (defer_build): not on an idle daemon's start.
_known: TypeAdapter[Any] = TypeAdapter(KnownEvent, config=ConfigDict(defer_build=True))


def event_item(stored: dict[str, Any], *, frame: bool = False) -> EventItem:
    """A stored event (`{type, taskId, seq, createdAt, ...}`) as its model.

    `frame=True` gives the push frame (`channel: "agent"` first); otherwise the item of
    a history page (no `channel`). A stored event that does not fit its model (another
    version's) is kept as it was stored.
    """
    data = {"channel": "agent" if frame else None, **stored}
    try:
        event: EventItem = _known.validate_python(data)
    except ValidationError:
        return AgentOtherEvent.model_validate(data)
    return event


class HistoryReply(Model):
    """A page of the transcript: the `history` reply's data and the `history` frame's body."""

    events: list[EventItem]
    latest_seq: int
    has_more: bool
    pending: list[EventItem]


class AgentHistoryFrame(Frame):
    """`history`: pushed on connect (not stored)."""

    channel: Literal["agent"] = "agent"
    type: Literal["history"] = "history"
    events: list[EventItem]
    latest_seq: int
    has_more: bool
    pending: list[EventItem]


class AgentErrorEvent(Frame):
    """`error`: a failure of a frame without `requestId` (not stored, no `seq`); extra
    fields of the error (`taskId`, `field`, ...) follow."""

    model_config = ConfigDict(extra="allow")

    channel: Literal["agent"] = "agent"
    type: Literal["error"] = "error"
    error: str
    code: ErrorCode


PUSHES: tuple[type[Frame], ...] = (*EVENT_TYPES, AgentHistoryFrame, AgentErrorEvent)
