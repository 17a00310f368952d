"""Terminal sessions: PTYs that belong to the workspace, not to a socket.

One `TerminalSession` owns a PTY master fd and the process started on it (a shell,
or `shell -c command`). Its output goes into a byte ring (`OutputRing`) with absolute
offsets; each attached client is an `Attachment` with a cursor into that ring, read
by pulling (`Attachment.read()`), so a slow client costs no memory beyond the ring.

Flow control: the PTY is read with `loop.add_reader` (no thread per session). When
every attached client is more than `terminal_pause_bytes` behind, the reader is
removed, so the writing program blocks as it would on a real terminal; it is added
back as soon as one client catches up. A client whose cursor left the ring is moved
to the ring's start and its next chunk is marked `truncated`.

Processes: the child is started with posix_spawn (`aetherd.services.ptyspawn`; a fork
where libc cannot) in its own session, with the PTY as its controlling terminal, and
watched through a pidfd, so exits are seen without polling or blocking. Ending a session signals every process of its session (SIGHUP, then
SIGKILL after `terminal_kill_grace`); nothing here ever sleeps on the event loop
(ptyprocess's close() does, which is why it is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import struct
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.services import ptyspawn, ringfile
from aetherd.services.handover import SessionState
from aetherd.services.jail import Jail
from aetherd.services.keeper import Keeper, fd_name
from aetherd.services.ring import OutputRing
from aetherd.services.ring import _is_continuation as _is_continuation  # re-exported
from aetherd.services.ring import _utf8_cut as _utf8_cut  # re-exported
from aetherd.services.ringfile import RingFile, ring_dir
from aetherd.services.tasks import TaskSet, end_all
from aetherd.settings import Settings

log = logging.getLogger("aetherd.terminal")

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_DIMENSION = 1000
DEFAULT_COLS = 80
DEFAULT_ROWS = 24
# Bytes drained from a PTY after its process exited (bounded: a background writer
# could otherwise keep the drain going forever).
EXIT_DRAIN_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class Output:
    """Output for one client: `data` starts at byte `offset` of the session's stream."""

    offset: int
    end: int
    data: str
    truncated: bool


@dataclass(frozen=True)
class Exit:
    """How a session's process ended: `exit_code`, or None and `signal` when killed."""

    exit_code: int | None
    signal: int | None


class Attachment:
    """One client's view of a session: a cursor into its ring, read by pulling."""

    def __init__(
        self,
        session: TerminalSession,
        notify: Callable[[], None],
        cursor: int,
        truncated: bool,
    ) -> None:
        self.session = session
        self._notify = notify
        self.cursor = cursor
        self._truncated = truncated
        self.closed = False  # exit delivered, or detached

    @property
    def lag(self) -> int:
        """Bytes of output this client has not been given yet."""
        return self.session.ring.end - self.cursor

    def notify(self) -> None:
        """Tell the client's writer there is something to read."""
        if not self.closed:
            self._notify()

    def read(self) -> Output | Exit | None:
        """The next chunk of output, then the exit once everything was given; None when idle."""
        if self.closed:
            return None
        session = self.session
        ring = session.ring
        if self.cursor < ring.start:
            self._truncated = True  # fell out of the ring: resynchronise from its start
            session.manager.resyncs += 1
            session.manager.skipped_bytes += ring.start - self.cursor
            self.cursor = ring.start
        if self.cursor < ring.end:
            start, raw = ring.chunk(self.cursor, session.max_frame, session.exit is not None)
            if raw:
                truncated, self._truncated = self._truncated, False
                self.cursor = start + len(raw)
                session.client_advanced(self)
                return Output(start, self.cursor, raw.decode("utf-8", "replace"), truncated)
            if session.exit is None:
                return None
            self.cursor = ring.end
        if session.exit is not None:
            self.closed = True
            session.exit_delivered(self)
            return session.exit
        return None

    def detach(self) -> None:
        """Stop following the session (it keeps running). Idempotent."""
        if not self.closed:
            self.closed = True
            self.session.detached(self)


class TerminalSession:
    """A PTY and the process on it, its output ring and its attached clients."""

    def __init__(
        self,
        manager: TerminalManager,
        session_id: str,
        *,
        pid: int,
        fd: int | None,
        command: str | None,
        cwd: str,
        cols: int,
        rows: int,
    ) -> None:
        settings = manager.settings
        self.manager = manager
        self.id = session_id
        self.pid = pid
        self.fd: int | None = fd
        self.command = command
        self.cwd = cwd
        self.cols = cols
        self.rows = rows
        self.created_at = time.time()
        self.ring = OutputRing(settings.terminal_ring_bytes)
        self.max_frame = settings.terminal_max_frame_bytes
        self.pause_bytes = min(settings.terminal_pause_bytes, settings.terminal_ring_bytes)
        self.read_budget = settings.terminal_read_budget
        self.max_pending_input = settings.terminal_max_pending_input
        self.attachments: list[Attachment] = []
        self.exit: Exit | None = None
        self.exit_delivered_once = False
        self.exited_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._eof = False
        self._pending_input = bytearray()
        self._writing = False
        self._pidfd: int | None = None
        self._reap_handle: asyncio.TimerHandle | None = None
        self._retention_handle: asyncio.TimerHandle | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._exit_callbacks: list[Callable[[Exit], Any]] = []
        self.paused_count = 0  # how often backpressure stopped reading (for tests/metrics)
        self.adopted = False  # taken over from the previous process (a reload)
        # Not this process's child (adopted after a crash): the keeper reports the exit.
        self.orphan = False
        self.ring_file: RingFile | None = None  # the ring's mapped mirror (crash survival)
        self.kept = False  # a keeper holds a duplicate of the PTY fd

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the PTY and watching the process."""
        self._resume_reading()
        if self.orphan and self.manager.keeper.forwards_exits:
            return  # its parent is init now: init reaps it and forwards the status
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        if self._pidfd is not None:
            self._loop.add_reader(self._pidfd, self._check_exit)
        else:  # no pidfd (old kernel): poll the wait status
            self._schedule_poll()

    @property
    def alive(self) -> bool:
        """True until the process has exited."""
        return self.exit is None

    def info(self) -> dict[str, Any]:
        """The session as listed by `sessions`/`list` (snake_case; the channel renames)."""
        return {
            "session_id": self.id,
            "pid": self.pid,
            "command": self.command,
            "cwd": self.cwd,
            "cols": self.cols,
            "rows": self.rows,
            "created_at": self.created_at,
            "clients": len(self.attachments),
            "exited": self.exit is not None,
            "exit_code": self.exit.exit_code if self.exit else None,
            "signal": self.exit.signal if self.exit else None,
            "offset": self.ring.end,
        }

    def on_exit(self, callback: Callable[[Exit], Any]) -> None:
        """Call `callback(exit)` once the process has exited (at once if it already has)."""
        if self.exit is not None:
            callback(self.exit)
        else:
            self._exit_callbacks.append(callback)

    async def wait(self) -> Exit:
        """Wait for the process to exit and return how it ended."""
        await self.exited_event.wait()
        assert self.exit is not None
        return self.exit

    # -- reading -----------------------------------------------------------------------
    def _resume_reading(self) -> None:
        if not self._reading and not self._eof and self.fd is not None and self.exit is None:
            self._loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading and self.fd is not None:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _read_into_ring(self, budget: int) -> int:
        """Read what the PTY has (up to `budget`) into the ring; returns the byte count.

        A PTY read returns at most about 4 KiB, so reads are gathered and appended to
        the ring once: one ring update (and one client wake-up) per wakeup, not per read.
        """
        got = 0
        fd = self.fd
        chunks: list[bytes] = []
        while fd is not None and got < budget:
            try:
                data = os.read(fd, min(65536, budget - got))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:
                    log.warning("reading terminal %s failed: %s", self.id, exc)
                data = b""
            if not data:
                # Every slave fd is closed (EIO on Linux). The exit comes via the pidfd.
                self._eof = True
                self._pause_reading()
                break
            chunks.append(data)
            got += len(data)
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.ring.append(data)
            if self.ring_file is not None:
                self.ring_file.append(data, self.ring.end)
            self.manager.output_bytes += got
        return got

    def _on_readable(self) -> None:
        budget = self.read_budget
        if self.attachments:
            # Never read so far ahead that the fastest client's next bytes leave the ring.
            budget = min(budget, self.ring.capacity - min(a.lag for a in self.attachments))
            if budget <= 0:
                # Even the fastest client is a whole ring behind. Stop watching the fd
                # (it stays readable, so the loop would spin); client_advanced resumes.
                self._pause_reading()
                return
        if self._read_into_ring(budget):
            for attachment in self.attachments:
                attachment.notify()
            self._maybe_pause()

    def _maybe_pause(self) -> None:
        attachments = self.attachments
        if attachments and all(a.lag > self.pause_bytes for a in attachments):
            if self._reading:
                self.paused_count += 1
            self._pause_reading()

    def client_advanced(self, attachment: Attachment) -> None:
        """A client took output: resume reading once one client is no longer behind."""
        if not self._reading and attachment.lag <= self.pause_bytes:
            self._resume_reading()

    @property
    def reading(self) -> bool:
        """True while the PTY is being read (False when paused by backpressure or ended)."""
        return self._reading

    # -- handover (a reload: PROTOCOL.md section 14) -------------------------------------
    def hand_over(self, blob: bytearray) -> SessionState:
        """Stop watching the PTY and the process without ending either; the state to adopt.

        The ring's bytes and the input not yet written go to `blob`. The PTY fd stays
        open and is no longer this object's: whatever the program writes from now on
        waits in the PTY for the next process to read it.
        """
        self._pause_reading()
        if self._writing and self.fd is not None:
            self._loop.remove_writer(self.fd)
            self._writing = False
        self._stop_exit_watch()
        retention_left = None
        if self._retention_handle is not None:
            retention_left = max(0.0, self._retention_handle.when() - self._loop.time())
            self._retention_handle.cancel()
            self._retention_handle = None
        terminating = self._kill_task is not None and self.exit is None
        if self._kill_task is not None:
            self._kill_task.cancel()
        for attachment in self.attachments:
            attachment.closed = True
        self.attachments.clear()
        ring_at = len(blob)
        blob += self.ring.contents()
        pending_at = len(blob)
        blob += self._pending_input
        self._pending_input.clear()
        fd, self.fd = self.fd, None
        if self.ring_file is not None:
            self.ring_file.close(remove=False)  # the next process maps it again
            self.ring_file = None
        return SessionState(
            id=self.id,
            pid=self.pid,
            fd=fd,
            command=self.command,
            cwd=self.cwd,
            cols=self.cols,
            rows=self.rows,
            created_at=self.created_at,
            ring_start=self.ring.start,
            ring_at=ring_at,
            ring_len=len(self.ring),
            pending_at=pending_at,
            pending_len=len(blob) - pending_at,
            exited=self.exit is not None,
            exit_code=self.exit.exit_code if self.exit else None,
            exit_signal=self.exit.signal if self.exit else None,
            exit_delivered=self.exit_delivered_once,
            retention_left=retention_left,
            eof=self._eof,
            terminating=terminating,
            kept=self.kept,
            orphan=self.orphan,
        )

    def _adopted(self, state: SessionState, blob: bytes) -> None:
        """Take up where `hand_over` left off (in the new process)."""
        self.created_at = state.created_at
        self.ring.start = state.ring_start
        self.ring.append(blob[state.ring_at : state.ring_at + state.ring_len])
        self.kept = state.kept
        self.orphan = state.orphan
        if state.exited:
            self.exit = Exit(state.exit_code, state.exit_signal)
            self.exit_delivered_once = state.exit_delivered
            self._eof = True
            self.exited_event.set()
            if state.retention_left is not None:
                self._retention_handle = self._loop.call_later(
                    state.retention_left, self.manager._forget, self
                )
            else:
                self._maybe_forget()
            return
        self._eof = state.eof
        self.manager._map_ring(self)
        self.start()
        pending = blob[state.pending_at : state.pending_at + state.pending_len]
        if pending:
            self._pending_input += pending
            assert self.fd is not None
            self._loop.add_writer(self.fd, self._flush_input)
            self._writing = True
        if state.terminating:
            self.terminate()

    # -- clients -----------------------------------------------------------------------
    def attach(self, notify: Callable[[], None], resume_from: int | None = None) -> Attachment:
        """A new attachment: replay from `resume_from` (or the ring's start), then live."""
        ring = self.ring
        if resume_from is None:
            cursor, truncated = ring.start, ring.start > 0
        elif resume_from > ring.end:
            # An offset this session never reached (another incarnation of the id):
            # the client's screen has nothing to do with this stream; replay it all.
            cursor, truncated = ring.start, True
        elif resume_from < ring.start:
            cursor, truncated = ring.start, True
        else:
            cursor, truncated = resume_from, False
        if self._retention_handle is not None:
            self._retention_handle.cancel()
            self._retention_handle = None
        attachment = Attachment(self, notify, cursor, truncated)
        self.attachments.append(attachment)
        if not self._reading and attachment.lag <= self.pause_bytes:
            self._resume_reading()
        attachment.notify()
        return attachment

    def detached(self, attachment: Attachment) -> None:
        """Forget a detached client; may resume reading or start the exited-retention timer."""
        with contextlib.suppress(ValueError):
            self.attachments.remove(attachment)
        if self.exit is None:
            if not self._reading and (
                not self.attachments or any(a.lag <= self.pause_bytes for a in self.attachments)
            ):
                self._resume_reading()
        else:
            self._maybe_forget()

    def exit_delivered(self, attachment: Attachment) -> None:
        """A client received the exit; the session goes once nobody is left to tell."""
        self.exit_delivered_once = True
        with contextlib.suppress(ValueError):
            self.attachments.remove(attachment)
        self._maybe_forget()

    def _maybe_forget(self) -> None:
        if self.attachments or self.exit is None:
            return
        if self.exit_delivered_once or self._kill_task is not None:
            # Told to someone, or ended on purpose: nothing is left to keep it for.
            self.manager._forget(self)
        elif self._retention_handle is None:
            self._retention_handle = self._loop.call_later(
                self.manager.settings.terminal_exited_retention, self.manager._forget, self
            )

    # -- input and size ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue input for the PTY without blocking; LIMIT_EXCEEDED beyond the pending bound."""
        if self.exit is not None or self.fd is None:
            raise AetherError(
                ErrorCode.SESSION_NOT_FOUND, f"terminal session '{self.id}' has exited"
            )
        if not data:
            return
        if len(self._pending_input) + len(data) > self.max_pending_input:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"terminal session '{self.id}' has more than "
                f"{self.max_pending_input} bytes of input pending; the program is not reading",
                limit=self.max_pending_input,
            )
        if not self._pending_input:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                log.info("writing to terminal %s failed: %s", self.id, exc)
                return
            data = data[written:]
            if not data:
                return
        self._pending_input += data
        if not self._writing:
            self._loop.add_writer(self.fd, self._flush_input)
            self._writing = True

    def _flush_input(self) -> None:
        fd = self.fd
        if fd is None:
            self._writing = False
            return
        try:
            written = os.write(fd, self._pending_input)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("writing to terminal %s failed: %s", self.id, exc)
            written = len(self._pending_input)
        del self._pending_input[:written]
        if not self._pending_input:
            self._loop.remove_writer(fd)
            self._writing = False

    @property
    def pending_input(self) -> int:
        """Input bytes not yet accepted by the PTY."""
        return len(self._pending_input)

    def resize(self, cols: int, rows: int) -> None:
        """Set the PTY's size; the kernel sends SIGWINCH to the foreground process group."""
        if self.exit is not None or self.fd is None:
            raise AetherError(
                ErrorCode.SESSION_NOT_FOUND, f"terminal session '{self.id}' has exited"
            )
        _set_winsize(self.fd, cols, rows)
        self.cols, self.rows = cols, rows
        if self.ring_file is not None:
            self.ring_file.update(cols=cols, rows=rows)

    # -- ending ------------------------------------------------------------------------
    def _schedule_poll(self) -> None:
        self._reap_handle = self._loop.call_later(0.05, self._poll_exit)

    def _poll_exit(self) -> None:
        self._reap_handle = None
        if not self._check_exit():
            self._schedule_poll()

    def _check_exit(self) -> bool:
        """Reap the child if it has exited (never blocks); True once it has."""
        if self.exit is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            if self.orphan:  # adopted after a crash, under a keeper that cannot tell
                self._finish(Exit(None, None))
                return True
            pid, status = self.pid, 255 << 8  # reaped elsewhere; the status is lost
        if pid == 0:
            return False
        self._finish(exit_from_status(status))
        return True

    def _stop_exit_watch(self) -> None:
        """Stop watching for the child's exit: its pidfd and the fallback reap timer."""
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._reap_handle is not None:
            self._reap_handle.cancel()
            self._reap_handle = None

    def _finish(self, exit_: Exit) -> None:
        # Output written just before the exit is still in the PTY: take it first.
        if self.fd is not None and not self._eof:
            self._read_into_ring(EXIT_DRAIN_LIMIT)
        self._pause_reading()
        self.exit = exit_
        self._stop_exit_watch()
        self._close_fd()
        if self.ring_file is not None:
            # An ended session cannot be adopted after a crash: no mirror (and no fd) left.
            self.ring_file.close(remove=True)
            self.ring_file = None
        # Background jobs may outlive the shell; they belong to the session, so end them.
        self.manager._tasks.track(self._end_stragglers())
        self.exited_event.set()
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            try:
                callback(exit_)
            except Exception:
                log.exception("terminal exit callback failed")
        log.info(
            "terminal session ended",
            extra={"sessionId": self.id, "exitCode": exit_.exit_code, "signal": exit_.signal},
        )
        for attachment in list(self.attachments):
            attachment.notify()
        self._maybe_forget()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self.kept:
            self.kept = False
            self.manager.keeper.drop(self.id)
        if self._writing:
            self._loop.remove_writer(fd)
            self._writing = False
        if self._reading:
            self._loop.remove_reader(fd)
            self._reading = False
        self._pending_input.clear()
        os.close(fd)

    async def _end_stragglers(self) -> None:
        grace = self.manager.settings.terminal_kill_grace
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(_signal_session, self.pid, signal.SIGHUP):
                return
            await asyncio.sleep(min(0.05, grace / 10))
        await asyncio.to_thread(_signal_session, self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """Signal the whole session (SIGHUP now, SIGKILL after the grace period)."""
        if self.exit is not None or self._kill_task is not None:
            return
        self._kill_task = self.manager._tasks.track(self._terminate())

    async def _terminate(self) -> None:
        await asyncio.to_thread(_signal_session, self.pid, signal.SIGHUP)
        grace = self.manager.settings.terminal_kill_grace
        try:
            await asyncio.wait_for(asyncio.shield(self.exited_event.wait()), grace)
        except asyncio.TimeoutError:
            log.info("terminal session ignored SIGHUP; killing it", extra={"sessionId": self.id})
            await asyncio.to_thread(_signal_session, self.pid, signal.SIGKILL)


def exit_from_status(status: int) -> Exit:
    """An `Exit` from a wait status."""
    if os.WIFSIGNALED(status):
        return Exit(None, os.WTERMSIG(status))
    return Exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 255, None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session_members(sid: int) -> list[int]:
    """Pids of the processes whose session id is `sid` (from /proc; runs in a thread)."""
    members = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 2 (comm) may hold spaces and parentheses; the rest follows the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        # fields: state ppid pgrp session ...
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == sid:
            pid = int(name)
            if pid != me:
                members.append(pid)
    return members


def _signal_session(sid: int, sig: int) -> bool:
    """Send `sig` to every live process of session `sid`; True if there was any."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)
    members = _session_members(sid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return bool(members)


async def _signal_session_async(session: TerminalSession, sig: int) -> None:
    """`_signal_session` off the event loop (it walks /proc)."""
    await asyncio.to_thread(_signal_session, session.pid, sig)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class TerminalManager:
    """Every terminal session of the workspace, by id.

    API for other services (config's boot terminals, for instance):

    - `base_env`: a dict (or set `env_provider` to a callable returning one) added to
      every new session's environment, under the `env` of the create request;
    - `await create(session_id, command=..., cwd=..., env=..., cols=..., rows=...)`
      starts a session and returns it (`session.wait()` awaits its `Exit`,
      `session.on_exit(callback)` calls back);
    - `get(session_id)`, `sessions()`, `count()`, `close(session_id)`.
    """

    def __init__(self, settings: Settings, jail: Jail | None = None) -> None:
        self.settings = settings
        self.jail = jail or Jail(settings.root)
        self.base_env: dict[str, str] = {}
        self.env_provider: Callable[[], Mapping[str, str]] | None = None
        self._sessions: dict[str, TerminalSession] = {}
        self._tasks = TaskSet()
        self._shell_path: str | None = None
        self._stopping = False
        self.output_bytes = 0  # read from every PTY
        self.resyncs = 0  # clients resynchronised from a ring they had fallen out of
        self.skipped_bytes = 0  # output those clients never received
        # Set before start() by a reload: the sessions the previous process handed over.
        self.handover: tuple[list[SessionState], bytes] | None = None
        self.adopted = 0  # sessions taken over from the previous process
        self.keeper: Keeper = Keeper()  # holds PTY fd duplicates (set by the app)
        self.ring_dir: Path | None = None  # where rings are mirrored (None: not mirrored)
        # Set before start() after a crash: (fd, fd name) of PTYs a keeper handed back.
        self.orphans: list[tuple[int, str]] = []
        self._keeper_exits: dict[int, int] = {}  # pid -> wait status, not yet matched
        self.reloaded = False  # this process was started by a reload with readable state
        self.adoption_failures = 0  # handed-over sessions that could not be taken over

    # -- service lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the shell once (a missing shell fails at create, with a clear error)."""
        self._shell_path = shutil.which(self.settings.terminal_shell)
        if self.settings.terminal_ring_files and self.ring_dir is None:
            try:
                self.ring_dir = ring_dir(self.settings.runtime_path)
            except OSError as exc:
                log.warning("terminal rings are not mirrored to files: %s", exc)
        if self.handover is not None:
            states, blob = self.handover
            self.handover = None
            self.reloaded = True
            self.adopt(states, blob)
        if self.orphans:
            orphans, self.orphans = self.orphans, []
            self.adopt_orphans(orphans)
        self._remove_stale_rings()

    # -- crash survival ----------------------------------------------------------------
    def _map_ring(self, session: TerminalSession) -> None:
        """Mirror `session`'s ring into its mapped file (rewritten whole from memory)."""
        if self.ring_dir is None:
            return
        meta = {
            "id": session.id,
            "pid": session.pid,
            "command": session.command,
            "cwd": session.cwd,
            "cols": session.cols,
            "rows": session.rows,
            "created_at": session.created_at,
            "daemon": os.getpid(),
        }
        try:
            ring_file = RingFile(
                self.ring_dir / fd_name(session.id), session.ring.capacity, meta, session.ring.end
            )
        except (OSError, ValueError) as exc:
            log.warning("terminal %s: ring not mirrored: %s", session.id, exc)
            return
        if len(session.ring):
            ring_file.append(session.ring.contents(), session.ring.end)
        session.ring_file = ring_file

    def _keep(self, session: TerminalSession) -> None:
        if session.fd is not None and not session.kept:
            self.keeper.keep(session.id, session.pid, session.fd)
            session.kept = self.keeper.name != "none"

    def adopt_orphans(self, fds: list[tuple[int, str]]) -> int:
        """Take over sessions whose PTY fds a keeper handed back after a crash.

        The ring and the metadata come from the mapped files; the shell is no longer
        this process's child (its exit comes from the keeper, or is seen through a
        pidfd without a status). A session that cannot be checked is dropped whole.
        """
        count = 0
        for fd, name in fds:
            found = ringfile.read(self.ring_dir / name) if self.ring_dir is not None else None
            problem = None
            meta: dict[str, Any] = {}
            if found is None:
                problem = "no ring file"
            else:
                meta, start, data = found
                problem = self._orphan_problem(fd, meta)
            if problem is not None:
                self.adoption_failures += 1
                log.warning("terminal fd %s (%s) not adopted: %s", fd, name, problem)
                with contextlib.suppress(OSError):
                    os.close(fd)
                if self.ring_dir is not None:
                    self.keeper.drop(str(meta.get("id", "")))
                continue
            os.set_blocking(fd, False)
            session = TerminalSession(
                self,
                str(meta["id"]),
                pid=int(meta["pid"]),
                fd=fd,
                command=meta.get("command"),
                cwd=str(meta.get("cwd", "/")),
                cols=int(meta.get("cols", DEFAULT_COLS)),
                rows=int(meta.get("rows", DEFAULT_ROWS)),
            )
            session.created_at = float(meta.get("created_at", session.created_at))
            session.ring.start = start
            session.ring.append(data)
            session.orphan = session.adopted = session.kept = True
            self._sessions[session.id] = session
            self._map_ring(session)
            session.start()
            self.adopted += 1
            count += 1
            status = self._keeper_exits.pop(session.pid, None)
            if status is not None:
                session._finish(exit_from_status(status))
        if count:
            log.info("adopted %d terminal sessions after a crash", count)
        return count

    def _orphan_problem(self, fd: int, meta: dict[str, Any]) -> str | None:
        try:
            session_id, pid = str(meta["id"]), int(meta["pid"])
        except (KeyError, TypeError, ValueError):
            return "unreadable metadata"
        if not SESSION_ID_RE.match(session_id) or session_id in self._sessions:
            return "invalid or duplicate id"
        try:
            if not os.isatty(fd):
                return "not a terminal"
        except OSError as exc:
            return str(exc)
        # The shell leads its own session: a recycled pid would not.
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            if pid in self._keeper_exits:
                return None  # it ended while the daemon was down; init has its status
            return f"pid {pid} is gone"
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 4 or int(fields[3]) != pid:
            return f"pid {pid} does not lead its session"
        return None

    def keeper_exit(self, pid: int, status: int) -> None:
        """The keeper reaped `pid` (a shell adopted after a crash): finish its session."""
        for session in self._sessions.values():
            if session.pid == pid and session.orphan and session.exit is None:
                session._finish(exit_from_status(status))
                return
        self._keeper_exits[pid] = status
        while len(self._keeper_exits) > 4 * self.settings.terminal_max_sessions:
            self._keeper_exits.pop(next(iter(self._keeper_exits)))

    def _remove_stale_rings(self) -> None:
        """Delete ring files no live daemon owns (sessions that did not survive)."""
        if self.ring_dir is None:
            return
        mine = {fd_name(session.id) for session in self._sessions.values()}
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.ring_dir):
                stem_name = entry.rsplit(".", 1)[0]
                if stem_name in mine or not entry.endswith(".json"):
                    continue
                found = ringfile.read(self.ring_dir / stem_name)
                owner = found[0].get("daemon") if found else None
                if isinstance(owner, int) and owner != os.getpid() and _alive(owner):
                    continue  # another daemon's session, sharing the runtime directory
                for suffix in (".json", ".ring"):
                    with contextlib.suppress(OSError):
                        os.unlink(self.ring_dir / (stem_name + suffix))

    def hand_over(self) -> tuple[list[SessionState], bytes]:
        """Give up every session without ending it, for the next process (a reload).

        Returns each session's state and a blob with the rings' bytes. The PTY fds stay
        open (the caller makes them inheritable); the processes keep running. After
        this, `stop()` has nothing left to end and `create` answers BUSY.
        """
        self._stopping = True
        blob = bytearray()
        states = [session.hand_over(blob) for session in self._sessions.values()]
        self._sessions.clear()
        self._tasks.cancel()  # stragglers' signals and closes: the next process finishes them
        return states, bytes(blob)

    def adopt(self, states: list[SessionState], blob: bytes) -> int:
        """Take over the sessions a previous process handed over; returns how many.

        Each live session is checked first: its fd must be a terminal and its pid a
        child of this process (the same process, after execv). A session that fails
        the check is dropped whole (its fd closed), never half adopted.
        """
        for state in states:
            problem = self._adoption_problem(state)
            if problem is not None:
                self.adoption_failures += 1
                log.warning("terminal session %s not adopted: %s", state.id, problem)
                if state.fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(state.fd)
                continue
            if state.fd is not None:
                os.set_inheritable(state.fd, False)
                os.set_blocking(state.fd, False)
            session = TerminalSession(
                self,
                state.id,
                pid=state.pid,
                fd=state.fd,
                command=state.command,
                cwd=state.cwd,
                cols=state.cols,
                rows=state.rows,
            )
            self._sessions[state.id] = session
            session.adopted = True
            session._adopted(state, blob)
            self._keep(session)
            self.adopted += 1
        return self.adopted

    def _adoption_problem(self, state: SessionState) -> str | None:
        if not SESSION_ID_RE.match(state.id):
            return "invalid id"
        if state.id in self._sessions:
            return "duplicate id"
        if len(self._sessions) >= self.settings.terminal_max_sessions:
            return "too many sessions"
        if state.exited:
            return None
        if state.fd is None:
            return "no PTY fd"
        try:
            if not os.isatty(state.fd):
                return f"fd {state.fd} is not a terminal"
            if state.orphan:  # init's child since a crash: it must still lead its session
                return self._orphan_problem(state.fd, {"id": "-", "pid": state.pid})
            # Not reaped here (WNOWAIT): the session reaps it and reports the exit.
            os.waitid(os.P_PID, state.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return f"pid {state.pid} is not a child of this process"
        except OSError as exc:
            return f"fd {state.fd}: {exc.strerror or exc}"
        return None

    async def stop(self) -> None:
        """End every session: SIGHUP, then SIGKILL after the grace period; reap and close."""
        self._stopping = True
        grace = self.settings.terminal_kill_grace
        stuck = await end_all(
            list(self._sessions.values()), _signal_session_async, signal.SIGHUP, grace, 2.0
        )
        for session in stuck:
            log.error("terminal session %s did not die after SIGKILL", session.id)
        for session in list(self._sessions.values()):
            for attachment in list(session.attachments):
                attachment.detach()
            session._close_fd()
        self._sessions.clear()
        await self._tasks.drain(grace + 1)

    def _forget(self, session: TerminalSession) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            session._close_fd()
            if session.ring_file is not None:
                session.ring_file.close(remove=True)
                session.ring_file = None

    # -- queries -----------------------------------------------------------------------
    @property
    def background_tasks(self) -> int:
        """Signalling/reaping tasks still running (0 once every ended session is cleaned up)."""
        return len(self._tasks)

    def metrics(self) -> Iterator[Sample]:
        """Sessions, output, and output skipped by resyncs (read at scrape time)."""
        live = self.count()
        yield Sample(
            "aetherd_terminal_sessions", "Terminal sessions, by state", live, {"state": "live"}
        )
        yield Sample(
            "aetherd_terminal_sessions",
            "Terminal sessions, by state",
            len(self._sessions) - live,
            {"state": "exited"},
        )
        yield Sample(
            "aetherd_terminal_output_bytes",
            "Bytes read from terminal PTYs",
            self.output_bytes,
            kind="counter",
        )
        yield Sample(
            "aetherd_terminal_adopted_sessions",
            "Terminal sessions taken over from the previous process (reload)",
            self.adopted,
            kind="counter",
        )
        yield Sample(
            "aetherd_terminal_adoption_failures",
            "Handed-over terminal sessions that could not be taken over",
            self.adoption_failures,
            kind="counter",
        )
        yield Sample(
            "aetherd_terminal_resyncs",
            "Slow clients resynchronised from the ring",
            self.resyncs,
            kind="counter",
        )
        yield Sample(
            "aetherd_terminal_skipped_bytes",
            "Output a resynchronised client never received",
            self.skipped_bytes,
            kind="counter",
        )

    def count(self) -> int:
        """Live (not exited) sessions."""
        return sum(1 for s in self._sessions.values() if s.alive)

    def sessions(self) -> list[TerminalSession]:
        """Every session held, live or exited-retained, oldest first."""
        return list(self._sessions.values())

    def get(self, session_id: str) -> TerminalSession:
        """The session called `session_id`, or SESSION_NOT_FOUND."""
        session = self._sessions.get(session_id)
        if session is None:
            raise AetherError(ErrorCode.SESSION_NOT_FOUND, f"no terminal session '{session_id}'")
        return session

    def find(self, session_id: str) -> TerminalSession | None:
        """The session called `session_id`, if any."""
        return self._sessions.get(session_id)

    # -- creating ----------------------------------------------------------------------
    def session_env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        """The environment of a new session: daemon env, TERM, base env, then `extra`."""
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("AETHERD_"):
                del env[key]  # never hand the daemon's settings (tokens) to a shell
        env["TERM"] = "xterm-256color"
        env.update(self.base_env)
        if self.env_provider is not None:
            env.update(self.env_provider())
        if extra:
            env.update(extra)
        return env

    async def create(
        self,
        session_id: str,
        *,
        command: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        cols: int | None = None,
        rows: int | None = None,
    ) -> TerminalSession:
        """Start a new session (CONFLICT if the id is held, LIMIT_EXCEEDED when full)."""
        if self._stopping:
            raise AetherError(ErrorCode.BUSY, "the daemon is shutting down")
        if not SESSION_ID_RE.match(session_id):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'sessionId': 1 to 128 characters of [A-Za-z0-9._:-]",
                field="sessionId",
            )
        if session_id in self._sessions:
            raise AetherError(ErrorCode.CONFLICT, f"terminal session '{session_id}' exists")
        if len(self._sessions) >= self.settings.terminal_max_sessions:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"too many terminal sessions (limit {self.settings.terminal_max_sessions})",
                limit=self.settings.terminal_max_sessions,
            )
        for key, value in (env or {}).items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise AetherError(
                    ErrorCode.INVALID_MESSAGE,
                    f"invalid field 'env': bad variable {key[:64]!r} (no '=' or NUL allowed)",
                    field="env",
                )
        cols = cols or DEFAULT_COLS
        rows = rows or DEFAULT_ROWS
        real_cwd = self.jail.resolve(cwd or "/")
        if not real_cwd.is_dir():
            code = ErrorCode.NOT_DIRECTORY if real_cwd.exists() else ErrorCode.NOT_FOUND
            raise AetherError(code, f"cwd {cwd!r} is not a directory in the workspace")
        if self._shell_path is None:
            self._shell_path = shutil.which(self.settings.terminal_shell)
        shell = self._shell_path
        if shell is None:
            raise AetherError(
                ErrorCode.INTERNAL_ERROR, f"shell {self.settings.terminal_shell!r} not found"
            )
        # An interactive shell needs no flag: its stdin is a terminal.
        argv = [shell, "-c", command] if command is not None else [shell]
        pid, fd = _spawn(argv, self.session_env(env), str(real_cwd), cols, rows)
        session = TerminalSession(
            self,
            session_id,
            pid=pid,
            fd=fd,
            command=command if command is not None else self.settings.terminal_shell,
            cwd=self._wire_path(real_cwd),
            cols=cols,
            rows=rows,
        )
        self._sessions[session_id] = session
        self._map_ring(session)
        self._keep(session)
        session.start()
        log.info("terminal session started", extra={"sessionId": session_id, "pid": pid})
        return session

    def discard(self, session_id: str) -> None:
        """Drop an exited session so its id can be used again (a restarted boot terminal).

        Clients still attached keep their view of it: they get its remaining output and
        its `close`, then detach; a new session with the same id is unaffected.
        """
        session = self._sessions.get(session_id)
        if session is not None and not session.alive:
            self._forget(session)

    def _wire_path(self, real: Path) -> str:
        rel = os.path.relpath(real, self.jail.root)
        return "/" if rel == "." else "/" + rel

    async def close(self, session_id: str) -> Exit:
        """End a session and wait for its exit (SIGHUP, SIGKILL after the grace period)."""
        session = self.get(session_id)
        if session.exit is None:
            session.terminate()
            return await session.wait()
        exit_ = session.exit
        for attachment in list(session.attachments):
            attachment.notify()
        if not session.attachments:
            self._forget(session)
        return exit_


# Signals the child starts with at their default disposition: Python ignores SIGPIPE and
# SIGXFSZ, and exec keeps what is ignored; SIGHUP is ignored while the daemon re-executes.
CHILD_DEFAULT_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
)


def _spawn(argv: list[str], env: dict[str, str], cwd: str, cols: int, rows: int) -> tuple[int, int]:
    """Start `argv` on a new PTY, in its own session with the PTY as controlling terminal.

    The size is set on the PTY before the child starts, so the program sees it from its
    first instruction and a resize right after create cannot be overwritten. The child is
    started with posix_spawn (`aetherd.services.ptyspawn`: no copy of the daemon's page
    tables), or forked where libc lacks what that needs, or when posix_spawn fails (the
    forked child then writes why to the terminal and exits 127).
    """
    master, slave = os.openpty()  # both non-inheritable
    try:
        _set_winsize(slave, cols, rows)
        if ptyspawn.available():
            try:
                pid = ptyspawn.spawn_on_pty(argv, env, cwd, os.ttyname(slave))
            except OSError as exc:
                log.info("posix_spawn of %s failed (%s); forking instead", argv[0], exc)
            else:
                os.close(slave)
                os.set_blocking(master, False)
                return pid, master
        pid = os.fork()
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(master)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for target in (0, 1, 2):
                os.dup2(slave, target)  # dup2 makes them inheritable
            if slave > 2:
                os.close(slave)
            for sig in CHILD_DEFAULT_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                os.write(2, f"aetherd: cannot start {argv[0]}: {exc}\r\n".encode())
        finally:
            os._exit(127)
    os.close(slave)
    os.set_blocking(master, False)
    return pid, master
