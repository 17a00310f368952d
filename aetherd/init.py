"""`aetherd init`: a tiny init for containers, run as PID 1 in front of the daemon.

Shells in terminals leave orphans behind (`sleep 100 &` then exit). In a container
the orphans are re-parented to PID 1, which must reap them or they stay zombies. This
process:

- starts `aetherd serve …` as its only direct child;
- reaps every child that ends, the daemon's orphans included (it also marks itself a
  child subreaper, so reaping works even when it is not PID 1);
- forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the daemon;
- exits with the daemon's status (128 + signal when it died of a signal).

The daemon keeps reaping its own children (it wants their exit codes); this process
only ever sees the orphans, and the daemon itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


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


def run(command: list[str]) -> int:
    """Run `command` as the supervised child; reap everything; return its exit code."""
    set_child_subreaper()
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    code: int | None = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break  # nothing left to reap
        if pid == child.pid:
            code = exit_status(status)
            child.returncode = code
            break
    # The daemon is gone: reap what is left without waiting for the living.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return code if code is not None else 1


def main(argv: list[str]) -> int:
    """`aetherd init [serve flags…]` or `aetherd init -- COMMAND…`."""
    if argv and argv[0] == "--":
        command = argv[1:]
    else:
        command = [sys.executable, "-m", "aetherd", "serve", *argv]
    if not command:
        print("aetherd: error: init needs a command after --", file=sys.stderr)
        return 2
    return run(command)
