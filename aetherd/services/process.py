"""Processes without a terminal: separate stdout and stderr, stdin, signals, exit codes.

`ProcessManager` runs commands (`/bin/sh -c COMMAND`, or an `argv` without a shell) in
their own session and process group, in the workspace root or a jailed `cwd`, with the
workspace config's `env`. It knows nothing of sockets; the process channel
(`aetherd/channels/process.py`) and in-process users (agents) share it.

What a process is lives in one plain record, `ProcessState`: ids, pid, the pipe fds,
the two output rings, stdin's pending input, the timeout and the exit. Nothing is
hidden in a closure (no Popen object either: the pid is reaped with `waitpid`), so a
reload can hand the fds and the rings over: `ManagedProcess.release()` gives the
record back with its fds open, `ProcessManager.adopt(state)` drives it again, and
`ProcessManager.hand_over()` / `adopt_handed()` carry the records across the exec as
plain data (`aetherd.services.handover.ProcessHandover`). Live processes are recorded
in the runtime directory (`aetherd.services.orphans`), so that the daemon started
after a crash ends the groups the dead one left running.
`ManagedProcess` adds the event-loop machinery around one record (readers, timers,
attachments).

The terminal service's ideas, without its PTY: each stream (stdout, stderr) goes
into its own `OutputRing` with absolute byte offsets; clients attach with a cursor per
stream and pull (`Attachment.read()`), so a slow client costs no memory beyond the
rings; an exited process keeps its output and exit for `process_exited_retention`.

Processes: forked and executed by `subprocess.Popen` (in C, `start_new_session`,
signals restored to their defaults, every other fd closed), on pipes this module owns
and reads with `loop.add_reader`; the exit is seen through a pidfd (or a 50 ms poll of
`waitpid(WNOHANG)`) and reaped with `waitpid`, never by blocking. The exit is reported once the leader has
exited and both pipes are at EOF; background children that keep a pipe open get
`process_exit_drain` seconds, then the pipes are closed and the group is ended.
Nothing here sleeps on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import re
import secrets
import signal as signals
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.services.handover import ProcessHandover, StreamHandover
from aetherd.services.jail import Jail
from aetherd.services.orphans import ProcessRecords, group_alive
from aetherd.services.ring import OutputRing
from aetherd.services.tasks import TaskSet, end_all
from aetherd.settings import Settings

log = logging.getLogger("aetherd.process")

PROCESS_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SHELL = "/bin/sh"
StreamName = Literal["stdout", "stderr"]
STREAMS: tuple[StreamName, StreamName] = ("stdout", "stderr")
Encoding = Literal["utf-8", "base64"]
# Signals by name: SIGINT, SIGTERM, ... and the real-time ones (SIGRTMIN, SIGRTMAX).
SIGNAL_NAMES = {s.name: int(s) for s in signals.Signals if s.name.startswith("SIG")}
MAX_SIGNAL = int(getattr(signals, "SIGRTMAX", 64))


def parse_signal(value: str | int) -> int:
    """A signal number from a name (`"SIGINT"`) or a number; INVALID_MESSAGE otherwise."""
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value if 1 <= value <= MAX_SIGNAL else None
    else:
        number = SIGNAL_NAMES.get(value)
    if number is None:
        shown = repr(value)[:40]
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid field 'signal': {shown} is not a signal name such as 'SIGINT' "
            f"or a number from 1 to {MAX_SIGNAL}",
            field="signal",
        )
    return number


# -- the record -----------------------------------------------------------------------


@dataclass
class StreamState:
    """One output stream: its pipe (None once closed) and its ring."""

    name: StreamName
    fd: int | None
    ring: OutputRing
    eof: bool = False


@dataclass(frozen=True)
class ProcessExitInfo:
    """How a process ended: `exit_code`, or None and `signal` when a signal killed it."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_ms: int


@dataclass
class ProcessState:
    """Everything a process is, in one plain record (what a daemon reload would hand over).

    `argv` is what was executed (`/bin/sh -c COMMAND` for a command); `command` and
    `request_argv` are what the client asked for, one of them None.
    """

    process_id: str
    pid: int
    argv: list[str]
    command: str | None
    request_argv: list[str] | None
    cwd: str  # a workspace path, `/` is the root
    encoding: Encoding
    started_at: float  # wall clock
    started_monotonic: float
    stdout: StreamState
    stderr: StreamState
    stdin_fd: int | None  # our end of stdin's pipe; None without stdin or once closed
    stdin_requested: bool
    pidfd: int | None = None
    pending_input: bytearray = field(default_factory=bytearray)
    close_stdin_after_input: bool = False
    timeout: float | None = None
    timed_out: bool = False
    leader_status: tuple[int | None, int | None] | None = None  # (exit code, signal)
    exit: ProcessExitInfo | None = None
    wait: bool = False  # started with `wait: true`

    def stream(self, name: StreamName) -> StreamState:
        """The state of `stdout` or `stderr`."""
        return self.stdout if name == "stdout" else self.stderr


# -- what clients read ---------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """Output for one client: `data` (text, or base64) from byte `offset` of `stream`."""

    stream: StreamName
    offset: int
    end: int
    data: str
    truncated: bool


@dataclass(frozen=True)
class ExecResult:
    """A finished process as `wait: true` answers it."""

    process_id: str
    pid: int
    exit: ProcessExitInfo
    stdout: str
    stderr: str
    truncated: bool


class Attachment:
    """One client's view of a process: a cursor per stream, read by pulling."""

    def __init__(
        self,
        process: ManagedProcess,
        notify: Callable[[], None],
        cursors: dict[StreamName, int],
        truncated: dict[StreamName, bool],
    ) -> None:
        self.process = process
        self._notify = notify
        self.cursors = cursors
        self._truncated = truncated
        self._next: int = 0  # which stream goes first: alternates, so neither starves
        self.closed = False  # exit delivered, or detached

    @property
    def lag(self) -> int:
        """Bytes of output (both streams) this client has not been given yet."""
        state = self.process.state
        return sum(state.stream(n).ring.end - self.cursors[n] for n in STREAMS)

    def notify(self) -> None:
        """Tell the client's writer there is something to read."""
        if not self.closed:
            self._notify()

    def _read_stream(self, name: StreamName) -> Output | None:
        process = self.process
        stream = process.state.stream(name)
        ring = stream.ring
        cursor = self.cursors[name]
        if cursor < ring.start:
            self._truncated[name] = True  # fell out of the ring: resynchronise
            process.manager.skipped_bytes += ring.start - cursor
            cursor = ring.start
        if self._truncated[name] and cursor == ring.start and process.state.encoding != "base64":
            cursor = ring.text_start()  # a character that lost its head to the ring: skip it
        if cursor >= ring.end:
            self.cursors[name] = cursor
            return None
        if process.state.encoding == "base64":
            start, raw = ring.raw(cursor, process.max_frame)
            text = base64.b64encode(raw).decode("ascii")
        else:
            start, raw = ring.chunk(cursor, process.max_frame, stream.eof)
            text = raw.decode("utf-8", "replace")
        if not raw:
            # Only an incomplete character so far: it waits for the rest (or the EOF).
            self.cursors[name] = start
            return None
        end = start + len(raw)
        self.cursors[name] = end
        truncated, self._truncated[name] = self._truncated[name], False
        return Output(name, start, end, text, truncated)

    def read(self) -> Output | ProcessExitInfo | None:
        """The next chunk of either stream, then the exit once all was given; None when idle."""
        if self.closed:
            return None
        first = self._next
        self._next ^= 1
        for index in (first, first ^ 1):
            item = self._read_stream(STREAMS[index])
            if item is not None:
                return item
        state = self.process.state
        if state.exit is not None and all(
            self.cursors[n] >= state.stream(n).ring.end for n in STREAMS
        ):
            self.closed = True
            self.process.detached(self)
            return state.exit
        return None

    def detach(self) -> None:
        """Stop following the process (it keeps running). Idempotent."""
        if not self.closed:
            self.closed = True
            self.process.detached(self)


# -- one process at run time ---------------------------------------------------------------


class ManagedProcess:
    """A `ProcessState` and the event-loop machinery that drives it."""

    def __init__(self, manager: ProcessManager, state: ProcessState) -> None:
        settings = manager.settings
        self.manager = manager
        self.state = state
        self.max_frame = settings.process_max_frame_bytes
        self.read_budget = settings.process_read_budget
        self.max_pending_input = settings.process_max_pending_input
        self.attachments: list[Attachment] = []
        self.exited_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reading: set[StreamName] = set()
        self._writing = False
        self._poll_handle: asyncio.TimerHandle | None = None
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._drain_handle: asyncio.TimerHandle | None = None
        self._retention_handle: asyncio.TimerHandle | None = None
        self._exit_callbacks: list[Callable[[ProcessExitInfo], Any]] = []
        self._terminating = False  # SIGTERM sent; SIGKILL follows after the grace
        self._group_task: asyncio.Task[Any] | None = None  # ending the group's leftovers

    # -- identity ----------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The process id of the protocol (not the pid)."""
        return self.state.process_id

    @property
    def pid(self) -> int:
        """The operating system's pid (also the process group id)."""
        return self.state.pid

    @property
    def alive(self) -> bool:
        """True until the exit has been recorded (leader gone and pipes drained)."""
        return self.state.exit is None

    @property
    def stdin_open(self) -> bool:
        """True while `input` is accepted."""
        state = self.state
        return state.stdin_fd is not None and not state.close_stdin_after_input

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the pipes, watching the exit and the timeout.

        Also resumes a record taken over from `release()`: the timeout keeps its
        original deadline (the monotonic clock is system-wide), pending input is
        flushed, and a leader already reaped only waits for its pipes.
        """
        state = self.state
        if state.exit is not None:
            self._finished()
            return
        for name in STREAMS:
            self._resume_reading(name)
        if state.leader_status is not None:
            self._drain_handle = self._loop.call_later(
                self.manager.settings.process_exit_drain, self._drain_expired
            )
        else:
            if state.pidfd is None:
                try:
                    state.pidfd = os.pidfd_open(self.pid)
                except (AttributeError, OSError):
                    state.pidfd = None
            if state.pidfd is not None:
                self._loop.add_reader(state.pidfd, self._check_exit)
            else:
                self._schedule_poll()
            if state.timeout is not None and not state.timed_out:
                elapsed = time.monotonic() - state.started_monotonic
                self._timeout_handle = self._loop.call_later(
                    max(0.0, state.timeout - elapsed), self._on_timeout
                )
        if state.pending_input or state.close_stdin_after_input:
            self._flush_input()

    def release(self) -> ProcessState:
        """Stop driving the process without ending it, and return its record.

        For a hand-over (a daemon reload): readers, writers, timers and attachments
        are dropped and the manager forgets it; the pipe fds and the pidfd stay open in
        the record, for `ProcessManager.adopt` (here or in the next daemon).
        """
        state = self.state
        for name in STREAMS:
            self._pause_reading(name)
        if self._writing and state.stdin_fd is not None:
            self._loop.remove_writer(state.stdin_fd)
        self._writing = False
        if state.pidfd is not None:
            self._loop.remove_reader(state.pidfd)
        for handle in (
            self._poll_handle,
            self._timeout_handle,
            self._drain_handle,
            self._retention_handle,
        ):
            if handle is not None:
                handle.cancel()
        self._poll_handle = self._timeout_handle = None
        self._drain_handle = self._retention_handle = None
        for attachment in list(self.attachments):
            attachment.detach()
        if self.manager._processes.get(self.id) is self:
            del self.manager._processes[self.id]
        return state

    def hand_over(self, blob: bytearray) -> ProcessHandover:
        """`release()` for the next daemon process (a reload): the record as plain data.

        The rings' bytes and the input not yet written go to `blob`; the pipe fds stay
        open (the caller makes them inheritable). The pidfd is closed: the next process
        opens its own.
        """
        retention_left = None
        if self._retention_handle is not None:
            retention_left = max(0.0, self._retention_handle.when() - self._loop.time())
        group_left = self._group_task is not None and not self._group_task.done()
        state = self.release()
        pidfd, state.pidfd = state.pidfd, None
        if pidfd is not None:
            os.close(pidfd)

        def stream(name: StreamName) -> StreamHandover:
            s = state.stream(name)
            at = len(blob)
            blob.extend(s.ring.contents())
            return StreamHandover(
                fd=s.fd, eof=s.eof, ring_start=s.ring.start, ring_at=at, ring_len=len(s.ring)
            )

        out, err = stream("stdout"), stream("stderr")
        pending_at = len(blob)
        blob.extend(state.pending_input)
        exit_ = state.exit
        return ProcessHandover(
            id=state.process_id,
            pid=state.pid,
            argv=state.argv,
            command=state.command,
            request_argv=state.request_argv,
            cwd=state.cwd,
            encoding=state.encoding,
            started_at=state.started_at,
            started_monotonic=state.started_monotonic,
            stdout=out,
            stderr=err,
            stdin_fd=state.stdin_fd,
            stdin_requested=state.stdin_requested,
            pending_at=pending_at,
            pending_len=len(state.pending_input),
            close_stdin_after_input=state.close_stdin_after_input,
            timeout=state.timeout,
            timed_out=state.timed_out,
            terminating=self._terminating and state.leader_status is None,
            leader_status=state.leader_status,
            exited=exit_ is not None,
            exit_code=exit_.exit_code if exit_ else None,
            exit_signal=exit_.signal if exit_ else None,
            duration_ms=exit_.duration_ms if exit_ else None,
            wait=state.wait,
            retention_left=retention_left,
            group_left=group_left,
        )

    def on_exit(self, callback: Callable[[ProcessExitInfo], Any]) -> None:
        """Call `callback(exit)` once the exit is recorded (at once if it already is)."""
        if self.state.exit is not None:
            callback(self.state.exit)
        else:
            self._exit_callbacks.append(callback)

    async def wait(self) -> ProcessExitInfo:
        """Wait for the exit (after all output) and return it."""
        await self.exited_event.wait()
        assert self.state.exit is not None
        return self.state.exit

    # -- reading -----------------------------------------------------------------------
    def _resume_reading(self, name: StreamName) -> None:
        stream = self.state.stream(name)
        if name not in self._reading and stream.fd is not None and not stream.eof:
            self._loop.add_reader(stream.fd, self._on_readable, name)
            self._reading.add(name)

    def _pause_reading(self, name: StreamName) -> None:
        stream = self.state.stream(name)
        if name in self._reading:
            self._reading.discard(name)
            if stream.fd is not None:
                self._loop.remove_reader(stream.fd)

    def _read_into_ring(self, name: StreamName, budget: int) -> int:
        """Read what the pipe has (up to `budget`) into the ring; returns the byte count."""
        stream = self.state.stream(name)
        got = 0
        chunks: list[bytes] = []
        while stream.fd is not None and got < budget:
            try:
                data = os.read(stream.fd, min(65536, budget - got))
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("reading %s of process %s failed: %s", name, self.id, exc)
                data = b""
            if not data:
                self._close_stream(name)
                break
            chunks.append(data)
            got += len(data)
        if chunks:
            stream.ring.append(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            self.manager.output_bytes += got
        return got

    def _on_readable(self, name: StreamName) -> None:
        self._read_into_ring(name, self.read_budget)
        for attachment in self.attachments:
            attachment.notify()
        self._maybe_finish()

    def _close_stream(self, name: StreamName) -> None:
        """EOF (or given up on): stop reading and close our end of the pipe."""
        stream = self.state.stream(name)
        self._pause_reading(name)
        stream.eof = True
        fd, stream.fd = stream.fd, None
        if fd is not None:
            os.close(fd)

    # -- clients -----------------------------------------------------------------------
    def attach(
        self, notify: Callable[[], None], resume_from: Mapping[str, int] | None = None
    ) -> Attachment:
        """A new attachment: replay each stream from `resume_from` (or its ring's start)."""
        cursors: dict[StreamName, int] = {}
        truncated: dict[StreamName, bool] = {}
        for name in STREAMS:
            ring = self.state.stream(name).ring
            wanted = None if resume_from is None else resume_from.get(name)
            if wanted is None:
                cursors[name], truncated[name] = ring.start, ring.start > 0
            elif wanted > ring.end:
                # An offset this process never reached (another process of the same
                # id): the client's copy belongs to another stream; replay all we have.
                cursors[name], truncated[name] = ring.start, True
            elif wanted < ring.start:
                cursors[name], truncated[name] = ring.start, True
            else:
                cursors[name], truncated[name] = wanted, False
        attachment = Attachment(self, notify, cursors, truncated)
        self.attachments.append(attachment)
        attachment.notify()
        return attachment

    def detached(self, attachment: Attachment) -> None:
        """Forget a client that detached or was given the exit."""
        with contextlib.suppress(ValueError):
            self.attachments.remove(attachment)

    # -- input and signals -----------------------------------------------------------------
    def write(self, data: bytes, eof: bool = False) -> None:
        """Queue `data` for stdin without blocking, then close stdin if `eof`."""
        state = self.state
        if not state.stdin_requested:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"process '{self.id}' was started without stdin (start it with stdin: true)",
                field="processId",
            )
        if state.exit is not None:
            raise AetherError(ErrorCode.CONFLICT, f"process '{self.id}' has exited")
        if not self.stdin_open:
            raise AetherError(ErrorCode.CONFLICT, f"the stdin of process '{self.id}' is closed")
        if len(state.pending_input) + len(data) > self.max_pending_input:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"process '{self.id}' has more than {self.max_pending_input} bytes of input "
                "pending; it is not reading its stdin",
                limit=self.max_pending_input,
            )
        state.pending_input += data
        if eof:
            state.close_stdin_after_input = True
        self._flush_input()

    def _flush_input(self) -> None:
        state = self.state
        fd = state.stdin_fd
        if fd is None:
            return
        while state.pending_input:
            try:
                written = os.write(fd, state.pending_input)
            except BlockingIOError:
                break
            except OSError as exc:
                # The process closed its stdin (EPIPE) or is gone: input has nowhere to go.
                if exc.errno != errno.EPIPE:
                    log.info("writing to process %s failed: %s", self.id, exc)
                state.pending_input.clear()
                state.close_stdin_after_input = True
                break
            del state.pending_input[:written]
        if state.pending_input:
            if not self._writing:
                self._loop.add_writer(fd, self._flush_input)
                self._writing = True
            return
        if self._writing:
            self._loop.remove_writer(fd)
            self._writing = False
        if state.close_stdin_after_input:
            self._close_stdin()

    def _close_stdin(self) -> None:
        state = self.state
        fd, state.stdin_fd = state.stdin_fd, None
        state.pending_input.clear()
        if fd is None:
            return
        if self._writing:
            self._loop.remove_writer(fd)
            self._writing = False
        os.close(fd)

    @property
    def pending_input(self) -> int:
        """Input bytes not yet taken by the process."""
        return len(self.state.pending_input)

    def send_signal(self, sig: int) -> None:
        """Signal the process group; CONFLICT once the exit is recorded."""
        if self.state.exit is not None:
            raise AetherError(ErrorCode.CONFLICT, f"process '{self.id}' has exited")
        self._signal_group(sig)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    # -- timeout and ending ------------------------------------------------------------
    def _on_timeout(self) -> None:
        self._timeout_handle = None
        if self.state.leader_status is not None:
            return
        self.state.timed_out = True
        log.info("process timed out; terminating it", extra={"processId": self.id})
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM to the group now, SIGKILL after the kill grace if the leader lives on."""
        self._terminating = True
        self._signal_group(signals.SIGTERM)
        self.manager._tasks.track(self._kill_after_grace())

    async def _kill_after_grace(self) -> None:
        grace = self.manager.settings.process_kill_grace
        try:
            await asyncio.wait_for(asyncio.shield(self.exited_event.wait()), grace)
        except asyncio.TimeoutError:
            log.info("process ignored SIGTERM; killing it", extra={"processId": self.id})
            self._signal_group(signals.SIGKILL)

    def _schedule_poll(self) -> None:
        self._poll_handle = self._loop.call_later(0.05, self._poll_exit)

    def _poll_exit(self) -> None:
        self._poll_handle = None
        if not self._check_exit():
            self._schedule_poll()

    def _reap(self) -> int | None:
        """The leader's exit code (negative: the signal that killed it), or None if running."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 255  # reaped elsewhere; the status is lost
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def _check_exit(self) -> bool:
        """Reap the leader if it has exited (never blocks); True once it has."""
        state = self.state
        if state.leader_status is not None:
            return True
        code = self._reap()
        if code is None:
            return False
        state.leader_status = (None, -code) if code < 0 else (code, None)
        if state.pidfd is not None:
            self._loop.remove_reader(state.pidfd)
            os.close(state.pidfd)
            state.pidfd = None
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None
        # Output written just before the exit may still be in the pipes: take it.
        for name in STREAMS:
            if self.state.stream(name).fd is not None:
                self._read_into_ring(name, self.read_budget)
        if not self._maybe_finish():
            # A background child still holds a pipe: give it a moment, then end it.
            self._drain_handle = self._loop.call_later(
                self.manager.settings.process_exit_drain, self._drain_expired
            )
        return True

    def _drain_expired(self) -> None:
        self._drain_handle = None
        for name in STREAMS:
            if self.state.stream(name).fd is not None:
                self._read_into_ring(name, self.read_budget)
                self._close_stream(name)
        self._maybe_finish()

    def _maybe_finish(self) -> bool:
        """Record the exit once the leader is reaped and both pipes are closed."""
        state = self.state
        if state.exit is not None:
            return True
        if state.leader_status is None or not (state.stdout.eof and state.stderr.eof):
            return False
        exit_code, sig = state.leader_status
        duration = int((time.monotonic() - state.started_monotonic) * 1000)
        exit_ = ProcessExitInfo(exit_code, sig, state.timed_out, duration)
        state.exit = exit_
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._close_stdin()
        # Whatever is left of the group (background jobs) ends with the process.
        self._group_task = self.manager._tasks.track(self.manager.end_group(self.pid))
        if self.manager.records is not None:
            self.manager.records.remove(self.pid)
        self.exited_event.set()
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            try:
                callback(exit_)
            except Exception:
                log.exception("process exit callback failed")
        log.info(
            "process ended",
            extra={
                "processId": self.id,
                "exitCode": exit_code,
                "signal": sig,
                "timedOut": state.timed_out,
            },
        )
        self._finished()
        return True

    def _finished(self) -> None:
        """Tell the attached clients, and keep the exited process for the retention."""
        self.exited_event.set()
        for attachment in list(self.attachments):
            attachment.notify()
        if self._retention_handle is None:
            self._retention_handle = self._loop.call_later(
                self.manager.settings.process_exited_retention, self.manager._forget, self
            )

    def close(self) -> None:
        """Release every fd and timer (the process must have exited, or be abandoned)."""
        for handle in (
            self._poll_handle,
            self._timeout_handle,
            self._drain_handle,
            self._retention_handle,
        ):
            if handle is not None:
                handle.cancel()
        self._poll_handle = self._timeout_handle = None
        self._drain_handle = self._retention_handle = None
        for name in STREAMS:
            if self.state.stream(name).fd is not None:
                self._close_stream(name)
        self._close_stdin()
        pidfd, self.state.pidfd = self.state.pidfd, None
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)

    # -- results -----------------------------------------------------------------------
    def stream_text(self, name: StreamName, limit: int) -> tuple[str, bool]:
        """The end of a stream (at most `limit` bytes) in the process's encoding."""
        ring = self.state.stream(name).ring
        contents = ring.contents()
        truncated = ring.start > 0 or len(contents) > limit
        if len(contents) > limit:
            contents = contents[len(contents) - limit :]
        if self.state.encoding == "base64":
            return base64.b64encode(contents).decode("ascii"), truncated
        if truncated:
            skip = 0  # a character that lost its head to the cap is dropped whole
            while skip < 3 and skip < len(contents) and 0x80 <= contents[skip] <= 0xBF:
                skip += 1
            contents = contents[skip:]
        return contents.decode("utf-8", "replace"), truncated

    def result(self) -> ExecResult:
        """The `wait: true` answer of an exited process."""
        assert self.state.exit is not None
        limit = self.manager.settings.process_wait_output_bytes
        stdout, cut_out = self.stream_text("stdout", limit)
        stderr, cut_err = self.stream_text("stderr", limit)
        return ExecResult(self.id, self.pid, self.state.exit, stdout, stderr, cut_out or cut_err)

    def info(self) -> dict[str, Any]:
        """The process as `list` shows it (snake_case; the channel renames)."""
        state = self.state
        exit_ = state.exit
        return {
            "process_id": state.process_id,
            "pid": state.pid,
            "command": state.command,
            "argv": state.request_argv,
            "cwd": state.cwd,
            "started_at": state.started_at,
            "exited": exit_ is not None,
            "exit_code": exit_.exit_code if exit_ else None,
            "signal": exit_.signal if exit_ else None,
            "stdin": self.stdin_open,
            "clients": len(self.attachments),
            "offsets": {n: state.stream(n).ring.end for n in STREAMS},
        }


# -- the manager ---------------------------------------------------------------------------


class ProcessManager:
    """Every process of the workspace, by id.

    API (for the channel and in-process users):

    - `spawn(command=... | argv=..., process_id=, cwd=, env=, stdin=, timeout=,
      encoding=, wait=)` starts a process now and returns its `ManagedProcess`;
    - `await run(...)` spawns, waits, and returns the `ExecResult`;
    - `get(process_id)` (NOT_FOUND), `find`, `processes()`, `count()`;
    - `base_env` / `env_provider`: added to every new process's environment, under the
      request's `env` (the config channel's `env` comes through `env_provider`).
    """

    def __init__(self, settings: Settings, jail: Jail | None = None) -> None:
        self.settings = settings
        self.jail = jail or Jail(settings.root)
        self.base_env: dict[str, str] = {}
        self.env_provider: Callable[[], Mapping[str, str]] | None = None
        self._processes: dict[str, ManagedProcess] = {}
        self._tasks = TaskSet()
        self._stopping = False
        self.output_bytes = 0  # read from every pipe
        self.skipped_bytes = 0  # output slow clients never received (fell out of a ring)
        self.started = 0
        # Set before start() by a reload: the processes the previous process handed over.
        self.handover: tuple[list[ProcessHandover], bytes] | None = None
        self.adopted = 0  # processes taken over from the previous process
        self.adoption_failures = 0  # handed-over processes that could not be taken over
        # Live processes recorded in the runtime directory, for the daemon after a crash.
        self.records: ProcessRecords | None = None
        self.orphans_ended = 0  # groups a daemon that died left running, ended at start

    # -- service lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Adopt the processes a reload handed over; end those a crashed daemon left."""
        if self.handover is not None:
            states, blob = self.handover
            self.handover = None
            self.adopt_handed(states, blob)
        try:
            self.records = ProcessRecords.open(self.settings.runtime_path)
        except OSError as exc:
            log.warning("processes are not recorded for after a crash: %s", exc)
            return
        leftovers = self.records.leftovers()
        if leftovers:
            log.warning(
                "ending %d processes left running by a daemon that died: %s",
                len(leftovers),
                ", ".join(process_id for _, process_id in leftovers)[:400],
            )
        for pgid, _ in leftovers:
            self.orphans_ended += 1
            self._tasks.track(self.end_group(pgid))

    # -- handover (a reload: PROTOCOL.md section 14) -----------------------------------
    def hand_over(self, blob: bytearray) -> list[ProcessHandover]:
        """Give up every process without ending it, for the next daemon process.

        Rings and pending input go to `blob`; the pipe fds stay open for the caller to
        pass on. After this `spawn` answers BUSY and `stop()` has nothing left to end.
        """
        self._stopping = True
        states = [process.hand_over(blob) for process in list(self._processes.values())]
        self._processes.clear()
        self._tasks.cancel()  # SIGKILLs due and groups being ended: the next process re-arms them
        return states

    def adopt_handed(self, states: list[ProcessHandover], blob: bytes) -> int:
        """Take over the processes a previous daemon process handed over; returns how many.

        Each is checked whole first (its pipes are pipes, its pid a child of this
        process); one that fails is dropped: its fds closed, its group killed and reaped.
        """
        count = 0
        for handed in states:
            fds = [
                fd for fd in (handed.stdout.fd, handed.stderr.fd, handed.stdin_fd) if fd is not None
            ]
            problem = self._adoption_problem(handed, fds)
            if problem is not None:
                self.adoption_failures += 1
                log.warning("process %s not adopted: %s", handed.id, problem)
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if handed.leader_status is None and _is_child(handed.pid):
                    self._tasks.track(self._end_abandoned(handed.pid))  # never another's group
                continue
            for fd in fds:
                os.set_inheritable(fd, False)
                os.set_blocking(fd, False)
            process = self.adopt(self._state_from(handed, blob))
            if handed.exited and handed.retention_left is not None:
                # The retention clock carries on where it was, not from the start.
                if process._retention_handle is not None:
                    process._retention_handle.cancel()
                process._retention_handle = process._loop.call_later(
                    handed.retention_left, self._forget, process
                )
            if handed.terminating and process.state.leader_status is None:
                process.terminate()
            if handed.group_left:
                process._group_task = self._tasks.track(self.end_group(handed.pid))
            count += 1
        self.adopted += count
        if count:
            log.info("adopted %d processes", count)
        return count

    def _adoption_problem(self, handed: ProcessHandover, fds: list[int]) -> str | None:
        if not PROCESS_ID_RE.match(handed.id):
            return "invalid id"
        if handed.id in self._processes:
            return "duplicate id"
        if len(self._processes) >= self.settings.process_max:
            return "too many processes"
        try:
            for fd in fds:
                if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                    return f"fd {fd} is not a pipe"
        except OSError as exc:
            return exc.strerror or str(exc)
        # Not reaped here: the adopted process reaps it and reports its exit.
        if handed.leader_status is None and not _is_child(handed.pid):
            return f"pid {handed.pid} is not a child of this process"
        return None

    def _state_from(self, handed: ProcessHandover, blob: bytes) -> ProcessState:
        capacity = (
            self.settings.process_wait_output_bytes
            if handed.wait
            else self.settings.process_ring_bytes
        )

        def stream(name: StreamName, h: StreamHandover) -> StreamState:
            ring = OutputRing(capacity)
            ring.start = h.ring_start
            ring.append(blob[h.ring_at : h.ring_at + h.ring_len])
            return StreamState(name, h.fd, ring, h.eof)

        exit_ = None
        if handed.exited:
            exit_ = ProcessExitInfo(
                handed.exit_code, handed.exit_signal, handed.timed_out, handed.duration_ms or 0
            )
        return ProcessState(
            process_id=handed.id,
            pid=handed.pid,
            argv=list(handed.argv),
            command=handed.command,
            request_argv=handed.request_argv,
            cwd=handed.cwd,
            encoding=handed.encoding,
            started_at=handed.started_at,
            started_monotonic=handed.started_monotonic,
            stdout=stream("stdout", handed.stdout),
            stderr=stream("stderr", handed.stderr),
            stdin_fd=handed.stdin_fd,
            stdin_requested=handed.stdin_requested,
            pending_input=bytearray(
                blob[handed.pending_at : handed.pending_at + handed.pending_len]
            ),
            close_stdin_after_input=handed.close_stdin_after_input,
            timeout=handed.timeout,
            timed_out=handed.timed_out,
            leader_status=handed.leader_status,
            exit=exit_,
            wait=handed.wait,
        )

    async def _end_abandoned(self, pid: int) -> None:
        """End a child that could not be adopted: its group SIGKILLed, the leader reaped."""
        _killpg(pid, signals.SIGKILL)
        for _ in range(200):  # SIGKILL cannot be ignored: 10 s at most, bounded anyway
            if _reaped(pid):
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """End every process: SIGTERM to each group, SIGKILL after the grace; reap, close."""
        self._stopping = True
        grace = self.settings.process_kill_grace
        stuck = await end_all(
            list(self._processes.values()),
            _signal_process,
            signals.SIGTERM,
            grace,
            2.0 + self.settings.process_exit_drain,
        )
        for process in stuck:
            log.error("process %s did not end after SIGKILL", process.id)
        for process in list(self._processes.values()):
            for attachment in list(process.attachments):
                attachment.detach()
            process.close()
        self._processes.clear()
        await self._tasks.drain(grace + 1)

    async def end_group(self, pgid: int) -> None:
        """End what is left of a process group: SIGTERM, then SIGKILL after the grace."""
        if not group_alive(pgid):
            return
        _killpg(pgid, signals.SIGTERM)
        deadline = time.monotonic() + self.settings.process_kill_grace
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if not group_alive(pgid):
                return
        _killpg(pgid, signals.SIGKILL)

    def _record(self, process: ManagedProcess) -> None:
        if self.records is None:
            return
        try:
            self.records.add(process.id, process.pid)
        except OSError as exc:
            log.warning("process %s not recorded for after a crash: %s", process.id, exc)

    def _forget(self, process: ManagedProcess) -> None:
        if self._processes.get(process.id) is process:
            del self._processes[process.id]
        if not process.alive:
            process.close()

    # -- queries -----------------------------------------------------------------------
    @property
    def background_tasks(self) -> int:
        """Signalling tasks still running (0 once every ended group is cleaned up)."""
        return len(self._tasks)

    def count(self) -> int:
        """Live (not exited) processes."""
        return sum(1 for p in self._processes.values() if p.alive)

    def processes(self) -> list[ManagedProcess]:
        """Every process held, live or exited-retained, oldest first."""
        return list(self._processes.values())

    def find(self, process_id: str) -> ManagedProcess | None:
        """The process called `process_id`, if any."""
        return self._processes.get(process_id)

    def get(self, process_id: str) -> ManagedProcess:
        """The process called `process_id`, or NOT_FOUND."""
        process = self._processes.get(process_id)
        if process is None:
            raise AetherError(ErrorCode.NOT_FOUND, f"no process '{process_id}'")
        return process

    def metrics(self) -> Iterator[Sample]:
        """Processes by state, and output read (read at scrape time)."""
        live = self.count()
        help_ = "Processes of the process channel, by state"
        yield Sample("aetherd_processes", help_, live, {"state": "live"})
        yield Sample("aetherd_processes", help_, len(self._processes) - live, {"state": "exited"})
        yield Sample(
            "aetherd_process_output_bytes",
            "Bytes read from process stdout and stderr pipes",
            self.output_bytes,
            kind="counter",
        )
        yield Sample(
            "aetherd_process_adopted",
            "Processes taken over from the previous daemon process (a reload)",
            self.adopted,
            kind="counter",
        )
        yield Sample(
            "aetherd_process_orphans_ended",
            "Process groups a daemon that died left running, ended at start",
            self.orphans_ended,
            kind="counter",
        )
        yield Sample(
            "aetherd_process_adoption_failures",
            "Handed-over processes that failed their check and were ended",
            self.adoption_failures,
            kind="counter",
        )

    # -- starting ----------------------------------------------------------------------
    def process_env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        """The environment of a new process: daemon env (no AETHERD_*), base env, `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHERD_")}
        env.update(self.base_env)
        if self.env_provider is not None:
            env.update(self.env_provider())
        if extra:
            env.update(extra)
        return env

    def _new_id(self) -> str:
        while True:
            process_id = "proc-" + secrets.token_hex(6)
            if process_id not in self._processes:
                return process_id

    def _make_room(self) -> None:
        """LIMIT_EXCEEDED when `process_max` are live; else evict the oldest exited one."""
        limit = self.settings.process_max
        if len(self._processes) < limit:
            return
        if self.count() >= limit:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"too many processes (limit {limit})",
                limit=limit,
            )
        oldest = next(p for p in self._processes.values() if not p.alive)
        self._forget(oldest)

    def spawn(
        self,
        *,
        command: str | None = None,
        argv: Sequence[str] | None = None,
        process_id: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        encoding: Encoding = "utf-8",
        wait: bool = False,
    ) -> ManagedProcess:
        """Start a process now (in its own session and group) and return it."""
        if self._stopping:
            raise AetherError(ErrorCode.BUSY, "the daemon is shutting down")
        if (command is None) == (argv is None):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "give exactly one of 'command' (run by /bin/sh -c) and 'argv'",
                field="command" if command is None else "argv",
            )
        if command is not None and ("\x00" in command or not command):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'command': empty, or holds a NUL character",
                field="command",
            )
        if argv is not None and (not argv or not argv[0] or any("\x00" in a for a in argv)):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'argv': empty, an empty program name, or a NUL character",
                field="argv",
            )
        if process_id is None:
            process_id = self._new_id()
        elif not PROCESS_ID_RE.match(process_id):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'processId': 1 to 128 characters of [A-Za-z0-9._:-]",
                field="processId",
            )
        for key, value in (env or {}).items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise AetherError(
                    ErrorCode.INVALID_MESSAGE,
                    f"invalid field 'env': bad variable {key[:64]!r} (no '=' or NUL allowed)",
                    field="env",
                )
        if timeout is not None and not timeout > 0:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE, "invalid field 'timeout': must be > 0", field="timeout"
            )
        real_cwd = self.jail.resolve(cwd or "/")
        if not real_cwd.is_dir():
            code = ErrorCode.NOT_DIRECTORY if real_cwd.exists() else ErrorCode.NOT_FOUND
            raise AetherError(code, f"cwd {cwd!r} is not a directory in the workspace")
        existing = self._processes.get(process_id)
        if existing is not None:
            if existing.alive:
                raise AetherError(ErrorCode.CONFLICT, f"process '{process_id}' is running")
            self._forget(existing)  # an exited one: its id is free again
        self._make_room()
        run_argv = [SHELL, "-c", command] if command is not None else list(argv or ())
        ring_bytes = (
            self.settings.process_wait_output_bytes if wait else self.settings.process_ring_bytes
        )
        pid, stdin_fd, out_fd, err_fd = _spawn(
            run_argv, self.process_env(env), str(real_cwd), stdin
        )
        now = time.time()
        state = ProcessState(
            process_id=process_id,
            pid=pid,
            argv=run_argv,
            command=command,
            request_argv=list(argv) if argv is not None else None,
            cwd=self.jail.to_wire(real_cwd),
            encoding=encoding,
            started_at=now,
            started_monotonic=time.monotonic(),
            stdout=StreamState("stdout", out_fd, OutputRing(ring_bytes)),
            stderr=StreamState("stderr", err_fd, OutputRing(ring_bytes)),
            stdin_fd=stdin_fd,
            stdin_requested=stdin,
            timeout=timeout,
            wait=wait,
        )
        process = ManagedProcess(self, state)
        self._processes[process_id] = process
        self.started += 1
        self._record(process)
        process.start()
        log.info("process started", extra={"processId": process_id, "pid": pid})
        return process

    def adopt(self, state: ProcessState) -> ManagedProcess:
        """Drive a process record released by `ManagedProcess.release` (a hand-over).

        The process must be a child of this daemon (a reload that re-executes keeps
        its children); its rings, offsets, stdin and timeout carry on as they were.
        """
        if state.process_id in self._processes:
            raise AetherError(ErrorCode.CONFLICT, f"process '{state.process_id}' exists")
        process = ManagedProcess(self, state)
        self._processes[state.process_id] = process
        process.start()
        return process

    async def run(self, **kwargs: Any) -> ExecResult:
        """Spawn (as `spawn` takes it), wait for the exit, and return the result."""
        process = self.spawn(wait=True, **kwargs)
        await process.wait()
        return process.result()


async def _signal_process(process: ManagedProcess, sig: int) -> None:
    process._signal_group(sig)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _is_child(pid: int) -> bool:
    """True if `pid` is a child of this process not reaped yet (nothing is reaped here)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _reaped(pid: int) -> bool:
    """Reap `pid` if it has exited (never blocks); True once it is gone."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _spawn(
    argv: list[str], env: dict[str, str], cwd: str, stdin: bool
) -> tuple[int, int | None, int, int]:
    """Start `argv` in a new session on pipes; returns (pid, stdin fd, stdout fd, stderr fd).

    `subprocess.Popen` is only the fork and exec (in C, signals restored, other fds
    closed): the pid is ours to reap with `waitpid`, so its `returncode` is set at once
    and Popen's finaliser never reaps the child behind our back. The process is then
    just a pid and three fds, which a reload can hand over.

    The parent keeps the non-blocking ends; the child's ends are closed here once it has
    them. A program that cannot be run is NOT_FOUND (no such file) or PERMISSION_DENIED.
    """
    opened: list[int] = []
    try:
        out_r, out_w = os.pipe()
        opened += [out_r, out_w]
        err_r, err_w = os.pipe()
        opened += [err_r, err_w]
        in_r: int | None = None
        in_w: int | None = None
        if stdin:
            in_r, in_w = os.pipe()
            opened += [in_r, in_w]
        try:
            popen = subprocess.Popen(
                argv,
                stdin=in_r if in_r is not None else subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                restore_signals=True,
            )
        except FileNotFoundError:
            raise AetherError(ErrorCode.NOT_FOUND, f"no such program: {argv[0][:200]!r}") from None
        except PermissionError:
            raise AetherError(
                ErrorCode.PERMISSION_DENIED, f"cannot run {argv[0][:200]!r}: permission denied"
            ) from None
        except OSError as exc:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE, f"cannot run {argv[0][:200]!r}: {exc.strerror}"
            ) from None
    except BaseException:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    for child_end in (out_w, err_w, in_r):
        if child_end is not None:
            os.close(child_end)
    for our_end in (out_r, err_r, in_w):
        if our_end is not None:
            os.set_blocking(our_end, False)
    popen.returncode = 0  # reaped by ManagedProcess through its pidfd, never by Popen
    return popen.pid, in_w, out_r, err_r
