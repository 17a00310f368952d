"""The state a daemon hands to the next one when it re-executes itself (PROTOCOL.md §14).

Two parts, written by the old process just before `execv` and read once by the new one:

- the **envelope**, in the environment: `AETHERD_HANDOVER` (the state file's path),
  `AETHERD_HANDOVER_FDS` (the inherited descriptors, the listening socket first) and
  `AETHERD_HANDOVER_PIDS` (the child processes behind them). Its form never changes,
  so any version can clean up after any other: close the fds, end and reap the pids;
- the **state file** (JSON, mode 0600 in the private runtime directory) with a
  `version`, and a blob beside it holding the rings' bytes. A version this code cannot
  read is a clean restart (one log line), never a half-adopted session.

Plain data and files only: no sockets, no event loop. `aetherd.reload` does the exec.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

HANDOVER_VERSION = 2
# Versions this code adopts. Version 1 is version 2 with no processes (its `processes`
# list was always empty). A version 1 reader refuses version 2, so going back to an
# older daemon is a clean restart rather than processes nobody drives or reaps.
READS = (1, 2)
ENV_FILE = "AETHERD_HANDOVER"
ENV_FDS = "AETHERD_HANDOVER_FDS"
ENV_PIDS = "AETHERD_HANDOVER_PIDS"
# A state file older than this is not ours to adopt (a leftover from a crash).
MAX_STATE_BYTES = 64 * 1024 * 1024


class SessionState(BaseModel):
    """One terminal session as handed over."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # built on a reload only

    id: str = Field(min_length=1, max_length=128)
    pid: int = Field(gt=0)
    fd: int | None = Field(None, ge=0)  # None once exited (the PTY was closed)
    command: str | None
    cwd: str
    cols: int = Field(ge=1)
    rows: int = Field(ge=1)
    created_at: float
    ring_start: int = Field(ge=0)  # absolute offset of the ring's first byte
    ring_at: int = Field(ge=0)  # where the ring's bytes start in the blob
    ring_len: int = Field(ge=0)
    pending_at: int = Field(ge=0)  # input not yet written to the PTY, in the blob
    pending_len: int = Field(ge=0)
    exited: bool
    exit_code: int | None
    exit_signal: int | None
    exit_delivered: bool
    retention_left: float | None  # seconds left on the exited-retention clock
    eof: bool
    terminating: bool  # a close was under way: the new daemon finishes it
    kept: bool = False  # a keeper holds a duplicate of the fd already
    orphan: bool = False  # adopted after a crash: not this process's child


class StreamHandover(BaseModel):
    """One output stream of a process: its pipe and its ring."""

    model_config = ConfigDict(extra="forbid")

    fd: int | None = Field(None, ge=0)  # our read end; None once at EOF (closed)
    eof: bool
    ring_start: int = Field(ge=0)  # absolute offset of the ring's first byte
    ring_at: int = Field(ge=0)  # where the ring's bytes start in the blob
    ring_len: int = Field(ge=0)


class ProcessHandover(BaseModel):
    """One process of the process channel (PROTOCOL.md section 10) as handed over."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    pid: int = Field(gt=0)
    argv: list[str] = Field(min_length=1)
    command: str | None
    request_argv: list[str] | None
    cwd: str
    encoding: Literal["utf-8", "base64"]
    started_at: float
    started_monotonic: float  # CLOCK_MONOTONIC is system-wide: it survives the exec
    stdout: StreamHandover
    stderr: StreamHandover
    stdin_fd: int | None = Field(None, ge=0)  # our write end; None without stdin or closed
    stdin_requested: bool
    pending_at: int = Field(ge=0)  # stdin input not yet written, in the blob
    pending_len: int = Field(ge=0)
    close_stdin_after_input: bool
    timeout: float | None
    timed_out: bool
    terminating: bool  # SIGTERM sent, SIGKILL due after the grace: the new daemon re-arms
    leader_status: tuple[int | None, int | None] | None  # reaped leader: (exit code, signal)
    exit_code: int | None
    exit_signal: int | None
    exited: bool  # the exit is recorded (leader reaped, pipes drained)
    duration_ms: int | None
    wait: bool
    retention_left: float | None  # seconds left on the exited-retention clock
    group_left: bool  # exited, but members of its group remain: the new daemon ends them


class HandoverState(BaseModel):
    """The state file (version 2: terminals and processes)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # built on a reload only

    version: int
    pid: int
    written_at: float
    listen_fd: int = Field(ge=0)
    terminals: list[SessionState]
    processes: list[ProcessHandover] = []


def runtime_dir(path: Path) -> Path:
    """Create the private runtime directory (0700) if needed; refuse one others can enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path`, mode 0600, never through a symlink."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_state(directory: Path, state: HandoverState, blob: bytes) -> Path:
    """Write the state file and its blob into `directory`; return the state file's path."""
    runtime_dir(directory)
    path = directory / f"handover-{state.pid}.json"
    write_private(path.with_suffix(".blob"), blob)
    write_private(path, state.model_dump_json().encode())
    return path


def envelope(path: Path, fds: list[int], pids: list[int]) -> dict[str, str]:
    """The environment variables that carry the handover across `execv`."""
    return {
        ENV_FILE: str(path),
        ENV_FDS: ",".join(str(fd) for fd in fds),
        ENV_PIDS: ",".join(str(pid) for pid in pids),
    }


def _ints(text: str | None) -> list[int]:
    out = []
    for part in (text or "").split(","):
        if part.strip().isdigit():
            out.append(int(part))
    return out


class Taken:
    """What a new process found in its environment: the envelope, and the state if readable."""

    def __init__(self, path: Path | None, fds: list[int], pids: list[int]) -> None:
        self.path = path
        self.fds = fds
        self.pids = pids
        self.state: HandoverState | None = None
        self.blob = b""
        self.refused: str | None = None  # why the state was not adopted

    @property
    def listen_fd(self) -> int | None:
        """The inherited listening socket (first fd of the envelope)."""
        return self.fds[0] if self.fds else None


def take(environ: dict[str, str] | Any = None) -> Taken | None:
    """Pop the envelope from `environ` (os.environ) and read the state it points to.

    None when this process was not started by a reload. Otherwise a `Taken` whose
    `state` is None, with `refused` saying why, when the state cannot be used. The files
    are removed either way: a state is read once.
    """
    environ = os.environ if environ is None else environ
    if ENV_FILE not in environ:
        return None
    path = Path(environ.pop(ENV_FILE))
    taken = Taken(path, _ints(environ.pop(ENV_FDS, "")), _ints(environ.pop(ENV_PIDS, "")))
    blob_path = path.with_suffix(".blob")
    try:
        raw = path.read_bytes()[: MAX_STATE_BYTES + 1]
        blob = blob_path.read_bytes()
    except OSError as exc:
        taken.refused = f"cannot read the handover state {path}: {exc.strerror or exc}"
        return taken
    finally:
        for leftover in (path, blob_path):
            with contextlib.suppress(OSError):
                leftover.unlink()
    try:
        data = json.loads(raw)
    except ValueError:
        taken.refused = "the handover state is not valid JSON"
        return taken
    version = data.get("version") if isinstance(data, dict) else None
    if version not in READS:
        readable = " and ".join(str(v) for v in READS)
        taken.refused = (
            f"handover state version {version!r} is not readable by this version (reads {readable})"
        )
        return taken
    try:
        state = HandoverState.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        taken.refused = f"the handover state is malformed at {where}: {err['msg']}"
        return taken
    if state.pid != os.getpid():
        taken.refused = f"the handover state belongs to pid {state.pid}, not this process"
        return taken
    for session in state.terminals:
        if session.ring_at + session.ring_len > len(blob) or (
            session.pending_at + session.pending_len > len(blob)
        ):
            taken.refused = f"the handover blob is shorter than session {session.id!r} needs"
            return taken
    for process in state.processes:
        spans = [
            (process.stdout.ring_at, process.stdout.ring_len),
            (process.stderr.ring_at, process.stderr.ring_len),
            (process.pending_at, process.pending_len),
        ]
        if any(at + length > len(blob) for at, length in spans):
            taken.refused = f"the handover blob is shorter than process {process.id!r} needs"
            return taken
    taken.state = state
    taken.blob = blob
    return taken
