"""The process channel's frames (docs/protocol.md section 10), in both directions.

Client → server: `start`, `input`, `signal`, `attach`, `detach`, `list`.
Server → client: the `output` and `exit` pushes; the replies of `start` (at once, or
when the process has exited with `wait: true`) and `list`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from aetherd.protocol.models import Frame, Message, Model, omitted

__all__ = [
    "ProcessAttach",
    "ProcessExec",
    "ProcessExit",
    "ProcessInfo",
    "ProcessInput",
    "ProcessListResult",
    "ProcessOutput",
    "ProcessRef",
    "ProcessSignal",
    "ProcessStart",
    "ProcessStarted",
    "ResumeFrom",
    "ResumeOffsets",
]

ProcessId = Annotated[
    str, Field(strict=True, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
Offset = Annotated[int, Field(strict=True, ge=0)]
StreamName = Literal["stdout", "stderr"]
Encoding = Literal["utf-8", "base64"]


# -- client → server --------------------------------------------------------------------


class ProcessStart(Message):
    """`start`: run `command` with `/bin/sh -c`, or `argv` without a shell."""

    command: Annotated[str, Field(strict=True, min_length=1, max_length=65536)] | None = None
    argv: (
        Annotated[
            list[Annotated[str, Field(strict=True, max_length=65536)]],
            Field(min_length=1, max_length=4096),
        ]
        | None
    ) = None
    process_id: ProcessId | None = None
    cwd: Annotated[str, Field(strict=True, max_length=4096)] | None = None
    env: dict[str, Annotated[str, Field(strict=True)]] | None = None
    stdin: Annotated[bool, Field(strict=True)] = False
    timeout: Annotated[float, Field(strict=True, gt=0, le=10_000_000)] | None = None
    wait: Annotated[bool, Field(strict=True)] = False
    encoding: Encoding = "utf-8"


class ProcessInput(Message):
    """`input`: text for the process's stdin (UTF-8), then optionally close it."""

    process_id: ProcessId
    data: Annotated[str, Field(strict=True)] = ""
    eof: Annotated[bool, Field(strict=True)] = False


class ProcessSignal(Message):
    """`signal`: a signal for the process group, by name (`"SIGINT"`) or number."""

    process_id: ProcessId
    signal: Annotated[str, Field(strict=True, max_length=32)] | Annotated[int, Field(strict=True)]


class ResumeFrom(Message):
    """Where a client's copy of each stream ends (byte offsets)."""

    stdout: Offset = 0
    stderr: Offset = 0


class ProcessAttach(Message):
    """`attach`: replay each stream (from `resumeFrom`), then stream live."""

    process_id: ProcessId
    resume_from: ResumeFrom | None = None


class ProcessRef(Message):
    """`detach`: name a process."""

    process_id: ProcessId


# -- server → client: reply data --------------------------------------------------------


class ProcessStarted(Model):
    """The reply of `start` without `wait`: sent before any `output` of the process."""

    process_id: str
    pid: int


class ProcessExec(Model):
    """The reply of `start` with `wait: true`, once the process has exited."""

    process_id: str
    pid: int
    exit_code: int | None = Field(description="null when a signal killed it")
    signal: int | None
    timed_out: bool
    duration_ms: int
    stdout: str = Field(description="The end of stdout (text, or base64 with that encoding)")
    stderr: str = Field(description="The end of stderr (text, or base64 with that encoding)")
    truncated: bool = Field(description="True when either stream lost its head to the cap")


class ResumeOffsets(Model):
    """The end of each stream so far (what `attach` takes as `resumeFrom`)."""

    stdout: int
    stderr: int


class ProcessInfo(Model):
    """A process as listed by `list`."""

    process_id: str
    pid: int
    command: str | None = Field(description="The shell command, or null for `argv`")
    argv: list[str] | None = Field(description="The argv, or null for `command`")
    cwd: str = Field(description="Workspace path; `/` is the root")
    started_at: str = Field(description="ISO 8601 UTC with milliseconds and `Z`")
    exited: bool
    exit_code: int | None
    signal: int | None
    stdin: bool = Field(description="True while stdin is open for `input`")
    clients: int = Field(description="Attached sockets")
    offsets: ResumeOffsets = Field(description="The end of each stream so far")


class ProcessListResult(Model):
    """The reply of `list`: live and retained processes, oldest first."""

    processes: list[ProcessInfo]


# -- server → client: pushes ------------------------------------------------------------


class ProcessOutput(Frame):
    """`output`: bytes of one stream from byte `offset` of that stream."""

    channel: Literal["process"] = "process"
    type: Literal["output"] = "output"
    process_id: str
    stream: StreamName
    offset: int = Field(ge=0)
    data: str
    truncated: Literal[True] | None = omitted()


class ProcessExit(Frame):
    """`exit`: how the process ended, after all of its output."""

    channel: Literal["process"] = "process"
    type: Literal["exit"] = "exit"
    process_id: str
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_ms: int
