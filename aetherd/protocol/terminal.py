"""The terminal channel's frames (docs/protocol.md section 2), in both directions.

Client → server: `create`, `input`, `resize`, `close`, `detach`, `list`.
Server → client: `output`, `close` and `sessions` pushes; the replies of `create`,
`close` and `list`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from aetherd.protocol.models import Frame, Message, Model, omitted

__all__ = [
    "Dimension",
    "SessionId",
    "TerminalClose",
    "TerminalCloseResult",
    "TerminalCreate",
    "TerminalCreateResult",
    "TerminalInput",
    "TerminalListResult",
    "TerminalOutput",
    "TerminalResize",
    "TerminalSessionInfo",
    "TerminalSessionRef",
    "TerminalSessions",
]

SessionId = Annotated[
    str, Field(strict=True, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
Dimension = Annotated[int, Field(strict=True, ge=1, le=1000)]


# -- client → server --------------------------------------------------------------------


class TerminalCreate(Message):
    """`create`: start a session, or attach to the live one with this id."""

    session_id: SessionId
    cols: Dimension | None = None
    rows: Dimension | None = None
    cwd: Annotated[str, Field(strict=True, max_length=4096)] | None = None
    env: dict[str, Annotated[str, Field(strict=True)]] | None = None
    command: Annotated[str, Field(strict=True, max_length=65536)] | None = None
    resume_from: Annotated[int, Field(strict=True, ge=0)] | None = None


class TerminalInput(Message):
    """`input`: bytes for the PTY, as a string."""

    session_id: SessionId
    data: Annotated[str, Field(strict=True)]


class TerminalResize(Message):
    """`resize`: the new size of the PTY."""

    session_id: SessionId
    cols: Dimension
    rows: Dimension


class TerminalSessionRef(Message):
    """`close` and `detach`: name a session."""

    session_id: SessionId


# -- server → client: reply data --------------------------------------------------------


class TerminalSessionInfo(Model):
    """A session as listed in `sessions` and in the `list` reply."""

    session_id: str
    pid: int
    command: str
    cwd: str = Field(description="Workspace path; `/` is the root")
    cols: int
    rows: int
    created_at: str = Field(description="ISO 8601 UTC with milliseconds and `Z`")
    clients: int = Field(description="Attached sockets")
    exited: bool
    exit_code: int | None = Field(description="null while running, or when a signal killed it")
    signal: int | None = Field(description="The signal that killed the shell, else null")
    offset: int = Field(description="The end of the output so far (for `resumeFrom`)")


class TerminalCreateResult(TerminalSessionInfo):
    """The reply of `create`: the session, and whether it already existed."""

    attached: bool


class TerminalCloseResult(Model):
    """The reply of `close`, once the shell has exited."""

    session_id: str
    exit_code: int | None
    signal: int | None


class TerminalListResult(Model):
    """The reply of `list`."""

    sessions: list[TerminalSessionInfo]


# -- server → client: pushes ------------------------------------------------------------


class TerminalOutput(Frame):
    """`output`: the session's output from byte `offset` of its stream.

    `truncated: true` marks the first frame of a replay whose start has left the ring;
    otherwise the field is absent. `channels/terminal.py` builds this frame by hand on
    its hot path; a test proves the bytes equal `encode(TerminalOutput(...))`.
    """

    channel: Literal["terminal"] = "terminal"
    type: Literal["output"] = "output"
    session_id: str
    offset: int = Field(ge=0)
    data: str
    truncated: Literal[True] | None = omitted()


class TerminalClose(Frame):
    """`close`: how the session ended, after all of its output."""

    channel: Literal["terminal"] = "terminal"
    type: Literal["close"] = "close"
    session_id: str
    exit_code: int | None
    signal: int | None


class TerminalSessions(Frame):
    """`sessions`: pushed first on every connection, the sessions it can attach to."""

    channel: Literal["terminal"] = "terminal"
    type: Literal["sessions"] = "sessions"
    sessions: list[TerminalSessionInfo]
