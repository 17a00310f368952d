"""`aetherd init`: a tiny init for containers, run as PID 1 in front of the daemon.

Shells in terminals leave orphans behind (`sleep 100 &` then exit). In a container
the orphans are re-parented to PID 1, which must reap them or they stay zombies. This
process:

- starts `aetherd serve …` as its only direct child;
- reaps every child that ends, the daemon's orphans included (it also marks itself a
  child subreaper, so reaping works even when it is not PID 1);
- forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the daemon;
- **keeps terminals alive through a crash of the daemon** (PROTOCOL.md §14): the
  daemon sends it a duplicate of every PTY master fd and of its listening socket over
  a SOCK_SEQPACKET socket (`AETHERD_KEEPER_FD`, SCM_RIGHTS; see
  aetherd/services/keeper.py). When the daemon dies of a signal (SIGKILL, the OOM
  killer) or exits with an error, init starts it again (at most
  `init_max_restarts` times a minute, env `AETHERD_INIT_MAX_RESTARTS`) and hands the
  fds back as systemd does (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`). The shells,
  orphaned by the crash, become init's children: init reaps them and forwards each
  exit status to the daemon (`exit` messages);
- exits with the daemon's status (128 + signal when it died of a signal) once the
  daemon stops for good: a clean exit, a forwarded SIGTERM, or too many restarts.

The daemon keeps reaping its own children (it wants their exit codes); this process
only sees the orphans, and the daemon itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
KEEPER_ENV = "AETHERD_KEEPER_FD"
RESTARTS_ENV = "AETHERD_INIT_MAX_RESTARTS"
DEFAULT_MAX_RESTARTS = 5
MAX_HELD = 4096  # fds held at most (a daemon holds at most terminal_max_sessions + 1)


def set_child_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process (prctl(2))."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def exit_status(status: int) -> int:
    """A shell-style exit code from a wait status."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 1


def _say(text: str) -> None:
    print(f"aetherd init: {text}", file=sys.stderr, flush=True)


def spawn(command: list[str], held: list[tuple[int, str]], keeper: int) -> int:
    """Fork and exec `command` with `held` fds at 3.. (named as systemd does) and the
    keeper socket after them."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:  # pragma: no cover - the child
        base = 3 + len(held) + 1
        # Out of the way first: a target 3+i may be one of the fds still to move.
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd, _ in held]
        moved_keeper = fcntl.fcntl(keeper, fcntl.F_DUPFD_CLOEXEC, base)
        for index, fd in enumerate(moved):
            os.dup2(fd, 3 + index)  # inheritable
        keeper_fd = 3 + len(held)
        os.dup2(moved_keeper, keeper_fd)
        env = dict(os.environ)
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            env.pop(key, None)
        if held:
            env["LISTEN_FDS"] = str(len(held))
            env["LISTEN_FDNAMES"] = ":".join(name for _, name in held)
            env["LISTEN_PID"] = str(os.getpid())
        env[KEEPER_ENV] = str(keeper_fd)
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        os.execvpe(command[0], command, env)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(2, f"aetherd init: cannot start {command[0]}: {exc}\n".encode())
    finally:
        os._exit(127)


class Init:
    """The supervisor's state: the daemon, the fds it holds, the exits to forward."""

    def __init__(self, command: list[str], restart: bool, max_restarts: int) -> None:
        self.command = command
        self.restart = restart
        self.max_restarts = max_restarts
        self.held: dict[str, tuple[int, int]] = {}  # name -> (fd, pid of its shell)
        self.exits: list[tuple[int, int]] = []  # (pid, status) not yet delivered
        self.restarts: deque[float] = deque()
        self.stopping = False
        self.child = 0
        self.sock: socket.socket | None = None
        self.selector = selectors.DefaultSelector()

    # -- the daemon ----------------------------------------------------------------------
    def start_daemon(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            held = [(fd, name) for name, (fd, _) in self.held.items()]
            self.child = spawn(self.command, held, theirs.fileno())
        finally:
            theirs.close()
        mine.setblocking(False)
        self.sock = mine
        self.selector.register(mine, selectors.EVENT_READ, "keeper")
        for pid, status in self.exits:
            self._send_exit(pid, status)
        self.exits.clear()

    def _drop_socket(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def _send_exit(self, pid: int, status: int) -> None:
        if self.sock is None:
            self.exits.append((pid, status))
            return
        try:
            self.sock.send(json.dumps({"op": "exit", "pid": pid, "status": status}).encode())
        except OSError:
            self.exits.append((pid, status))

    def on_keeper_message(self) -> None:
        from aetherd.services.keeper import recv_fds

        assert self.sock is not None
        try:
            data, fds = recv_fds(self.sock)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:  # the daemon closed its end (it died or is gone)
            for fd in fds:
                os.close(fd)
            self._drop_socket()
            return
        try:
            message = json.loads(data)
            op, name = message.get("op"), str(message.get("name", ""))
        except (ValueError, AttributeError):
            op, name = None, ""
        if op == "keep" and fds and name and len(self.held) < MAX_HELD:
            old = self.held.pop(name, None)
            if old is not None:
                os.close(old[0])
            self.held[name] = (fds.pop(0), int(message.get("pid") or 0))
        elif op == "drop":
            old = self.held.pop(name, None)
            if old is not None:
                os.close(old[0])
        for fd in fds:
            os.close(fd)

    # -- reaping -------------------------------------------------------------------------
    def reap(self) -> int | None:
        """Reap every child that ended; the exit code when init should exit now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            if pid == self.child:
                code = self.daemon_ended(status)
                if code is not None:
                    return code
                continue
            if any(shell == pid for _, shell in self.held.values()):
                self._send_exit(pid, status)  # a shell adopted after a crash

    def daemon_ended(self, status: int) -> int | None:
        code = exit_status(status)
        self._drop_socket()
        # Only `aetherd init [serve flags]` restarts (`init -- COMMAND` supervises as is).
        crashed = self.restart and (os.WIFSIGNALED(status) or code not in (0, 2))
        if self.stopping or not crashed:
            return code
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > 60:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            _say(f"daemon ended with {code}; {self.max_restarts} restarts this minute: giving up")
            return code
        self.restarts.append(now)
        _say(
            f"daemon ended with {code}; restarting it with {len(self.held)} fds kept "
            f"({len(self.restarts)} of {self.max_restarts} this minute)"
        )
        self.start_daemon()
        return None

    def close(self) -> None:
        self._drop_socket()
        for fd, _ in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()


def run(command: list[str], restart: bool = False, max_restarts: int = 0) -> int:
    """Run `command` as the supervised child; reap everything; return its exit code."""
    set_child_subreaper()
    init = Init(command, restart, max_restarts)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)

    def forward(signum: int, _frame: object) -> None:
        if signum in STOPPING:
            init.stopping = True
        if init.child > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init.child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    init.selector.register(wake_r, selectors.EVENT_READ, "wake")
    code: int | None = None
    try:
        init.start_daemon()
        while code is None:
            for key, _ in init.selector.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                elif key.data == "keeper" and init.sock is not None:
                    init.on_keeper_message()
            code = init.reap()
    finally:
        init.close()
    # The daemon is gone: reap what is left without waiting for the living.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return code


def max_restarts_setting() -> int:
    """`init_max_restarts` from the environment (the daemon's setting of the same name)."""
    raw = os.environ.get(RESTARTS_ENV, "")
    return int(raw) if raw.isdigit() else DEFAULT_MAX_RESTARTS


def main(argv: list[str]) -> int:
    """`aetherd init [serve flags…]` or `aetherd init -- COMMAND…`."""
    if argv and argv[0] == "--":
        command = argv[1:]
        restart = False
    else:
        command = [sys.executable, "-m", "aetherd", "serve", *argv]
        restart = True
    if not command:
        print("aetherd: error: init needs a command after --", file=sys.stderr)
        return 2
    return run(command, restart, max_restarts_setting())
