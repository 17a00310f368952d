"""The ACP wire types the daemon reads: lenient pydantic models (camelCase on the wire).

Only what the client side needs: the agent's replies to `initialize`, `session/new`,
`session/load` and `session/prompt`, its `session/update` notifications, and its
requests (`session/request_permission`, `fs/*`, `terminal/*`). Unknown fields are
kept (`extra="allow"`), so a newer agent's additions never fail validation; a
missing required field does, and the request gets JSON-RPC "invalid params".
Field names follow https://agentclientprotocol.com (protocol version 1).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PROTOCOL_VERSION = 1


class AcpModel(BaseModel):
    """camelCase aliases, unknown fields kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


# -- replies to our requests -------------------------------------------------------------


class AgentCapabilities(AcpModel):
    """What the agent can do (only `loadSession` matters here)."""

    load_session: bool = False


class InitializeResult(AcpModel):
    """`initialize` → the agent's version and capabilities."""

    protocol_version: int | str = PROTOCOL_VERSION
    agent_capabilities: AgentCapabilities = Field(default_factory=AgentCapabilities)
    auth_methods: list[dict[str, Any]] = Field(default_factory=list)


class NewSessionResult(AcpModel):
    """`session/new` → the session's id."""

    session_id: str = Field(min_length=1, max_length=1024)


class PromptResult(AcpModel):
    """`session/prompt` → why the turn ended; `usage` when the agent reports it."""

    stop_reason: str
    usage: dict[str, Any] | None = None


# -- notifications -----------------------------------------------------------------------


class SessionNotification(AcpModel):
    """`session/update`: one update of a session (`update.sessionUpdate` names its kind)."""

    session_id: str
    update: dict[str, Any]


class ContentBlock(AcpModel):
    """A content block; only `text` is shown as text."""

    type: str
    text: str | None = None


class ContentChunk(AcpModel):
    """`agent_message_chunk`, `agent_thought_chunk`, `user_message_chunk`."""

    session_update: str
    content: ContentBlock


class ToolCallInfo(AcpModel):
    """`tool_call` / `tool_call_update` (every field but the id optional on updates)."""

    tool_call_id: str = Field(min_length=1, max_length=1024)
    title: str | None = None
    kind: str | None = None
    status: str | None = None
    raw_input: Any = None
    raw_output: Any = None
    content: list[dict[str, Any]] | None = None
    locations: list[dict[str, Any]] | None = None


class PlanEntry(AcpModel):
    """One entry of the agent's plan."""

    content: str
    priority: str = "medium"
    status: str = "pending"


class PlanUpdate(AcpModel):
    """`plan`: the whole plan, as it is now."""

    entries: list[PlanEntry]


# -- the agent's requests ----------------------------------------------------------------


class PermissionOption(AcpModel):
    """One answer the agent offers (`kind`: allow_once, allow_always, reject_once, reject_always)."""

    option_id: str = Field(min_length=1, max_length=1024)
    name: str = ""
    kind: str = ""


class RequestPermission(AcpModel):
    """`session/request_permission`."""

    session_id: str
    tool_call: ToolCallInfo
    options: list[PermissionOption] = Field(max_length=64)


class ReadTextFile(AcpModel):
    """`fs/read_text_file`: `line` is 1-based, `limit` counts lines."""

    session_id: str
    path: str
    line: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=0)


class WriteTextFile(AcpModel):
    """`fs/write_text_file`."""

    session_id: str
    path: str
    content: str


class EnvVariable(AcpModel):
    """One variable of `terminal/create`'s `env`."""

    name: str
    value: str


class CreateTerminal(AcpModel):
    """`terminal/create`."""

    session_id: str
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVariable] = Field(default_factory=list)
    cwd: str | None = None
    output_byte_limit: int | None = Field(None, ge=0)


class TerminalRef(AcpModel):
    """`terminal/output`, `terminal/wait_for_exit`, `terminal/kill`, `terminal/release`."""

    session_id: str
    terminal_id: str
