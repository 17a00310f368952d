"""Reload: the daemon re-executes itself (same pid) and hands everything over (§14).

On SIGHUP (sent by `aetherd reload`, systemd's `ExecReload=`, or anyone):

1. **Check.** The new code is checked in a child first: the same interpreter and
   argv with `AETHERD_RELOAD_CHECK=1`, which imports the daemon, loads the settings
   and exits. If it fails (the new code does not import, the settings are bad), the
   reload is refused: this process keeps serving and logs why.
2. **Hand over.** Stop accepting (the listening socket stays open through a
   duplicate, so new connections wait in its backlog), close every WebSocket with
   1012, take every terminal session and every process off the event loop
   (`TerminalManager.hand_over`, `ProcessManager.hand_over`), stop the other services,
   write the state (`aetherd.services.handover`).
3. **Exec.** Make the listening socket, the PTY fds and the processes' pipes
   inheritable and `execv` the same command line. The pid stays, so the shells and
   processes stay this process's children and systemd / `aetherd init` see no exit.

The data directory's `daemon.json` names the running daemon (`pid`), counts
`generation`s (every start and every reload) and records why the last reload was
refused; `aetherd reload` reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aetherd.metrics import Sample

log = logging.getLogger("aetherd.reload")

CHECK_ENV = "AETHERD_RELOAD_CHECK"
RECORD = "daemon.json"
# How much of a failed check's output goes into the log line.
CHECK_OUTPUT_CHARS = 400


# -- the daemon record in the data dir ------------------------------------------------------
def read_record(data_dir: Path) -> dict[str, Any]:
    """`daemon.json` of `data_dir` ({} when absent or unreadable)."""
    try:
        data = json.loads((data_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(data_dir: Path, **fields: Any) -> None:
    """Update `daemon.json` atomically (temp file, rename), keeping the fields not given."""
    record = read_record(data_dir)
    record.update(fields)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, data_dir / RECORD)


def process_is_aetherd(pid: int) -> bool:
    """True if `pid` runs and its command line mentions aetherd (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"aetherd" in cmdline


def process_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (its command line is briefly
    unreadable while it execs, so that is not looked at)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    return bool(fields) and fields[0] not in (b"Z", b"X")


# -- the state of this process's reloads ----------------------------------------------------
class ReloadState:
    """Generation, start time and reload outcomes of this daemon (for /info and /metrics)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.generation = 0
        self.started_at = time.time()
        self.reloaded = False  # this process was started by a reload
        self.restored_sessions = 0
        self.refused = 0  # reloads refused by the check, in this process
        self.in_progress = False
        # The code this process runs, as files (taken once ready): see code_fingerprint.
        self.fingerprint: Fingerprint | None = None

    def begin(self, reloaded: bool) -> None:
        """Count this start (fresh or reload) in the persisted generation."""
        self.reloaded = reloaded
        previous = read_record(self.data_dir).get("generation")
        self.generation = previous + 1 if isinstance(previous, int) and previous >= 0 else 0

    def publish(self, host: str, port: int, version: str) -> None:
        """Record this process as the running daemon (once it is ready)."""
        write_record(
            self.data_dir,
            pid=os.getpid(),
            generation=self.generation,
            startedAt=self.started_at,
            host=host,
            port=port,
            version=version,
            reloadError=None,
        )

    def stopped(self) -> None:
        """Record that no daemon runs (a clean stop; a reload keeps the pid)."""
        with contextlib.suppress(OSError):
            write_record(self.data_dir, pid=None)

    def metrics(self) -> Iterator[Sample]:
        """Generation and refused reloads (the adoptions are the terminal manager's)."""
        yield Sample(
            "aetherd_daemon_generation",
            "Starts and reloads this workspace's daemon has been through",
            self.generation,
        )
        yield Sample(
            "aetherd_reloads_refused",
            "Reloads refused because the new code failed its check",
            self.refused,
            kind="counter",
        )


# -- the check ------------------------------------------------------------------------------
def command_line() -> list[str]:
    """The command line to re-execute: this interpreter and its original arguments."""
    return [sys.executable, *sys.orig_argv[1:]]


async def check_new_code(timeout: float) -> str | None:
    """Run the new code's check in a child; None when it passed, else why it failed."""
    env = {**os.environ, CHECK_ENV: "1"}
    try:
        proc = await asyncio.create_subprocess_exec(
            *command_line(),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return f"cannot start {sys.executable}: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return f"the check did not finish within {timeout:g} s"
    if proc.returncode == 0:
        return None
    text = out.decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    return f"the new code failed its check (exit {proc.returncode}): {last[-CHECK_OUTPUT_CHARS:]}"


Fingerprint = tuple[tuple[str, int, int, int, int], ...]
# ctime comes from the kernel's coarse clock, which lags time.time() by up to a tick.
CLOCK_SLACK = 0.05


def code_fingerprint(since: float | None = None) -> Fingerprint | None:
    """What the code of this process is made of, as files: (path, ctime, mtime, size,
    inode) of the interpreter, of every loaded module's file and its directory, of the
    `sys.path` entries and of the `.pth` files in them.

    Taken before the daemon reports ready, it covers every module a start imports (the
    ones the check child would import). An upgrade (pip, `packaging/install.sh`)
    rewrites a file or adds one to a directory (which changes the directory's ctime and
    mtime), so a reload that finds the same fingerprint would run the same code, which
    started fine. With `since` (when this process began its imports): None when a file
    changed after it, since what was imported may not be what is there now.
    """
    paths = {sys.executable, *(entry for entry in sys.path if entry)}
    # Every file of aetherd, also those imported on first use (the agent, git and search
    # services and their channels: aetherd.daemon), which are not loaded yet.
    package = os.path.dirname(os.path.abspath(__file__))
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        paths.add(directory)
        paths.update(os.path.join(directory, name) for name in files if name.endswith(".py"))
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            paths.add(path)
            paths.add(os.path.dirname(path))
    for entry in list(sys.path):
        if entry and entry.endswith("-packages"):
            with contextlib.suppress(OSError):
                paths.update(str(p) for p in Path(entry).glob("*.pth"))
    limit = None if since is None else int((since - CLOCK_SLACK) * 1e9)
    out = []
    for path in sorted(paths):
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, -1, -1, -1, -1))
            continue
        if limit is not None and st.st_ctime_ns >= limit:
            log.info("%s changed after the daemon started: the next reload checks in a child", path)
            return None
        out.append((path, st.st_ctime_ns, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def check_settings_here() -> str | None:
    """The check without a child, for code that has not changed: the settings as the
    next process would load them (its command line, environment and settings file as
    they are now). None when they pass, else why not."""
    from aetherd.app import check_environment
    from aetherd.cli import settings_for
    from aetherd.errors import SettingsError

    try:
        check_environment(settings_for(sys.argv[1:]))
    except SettingsError as exc:
        return f"the new settings failed their check: {exc}"
    return None


async def check_reload(timeout: float, fingerprint: Fingerprint | None) -> tuple[str | None, str]:
    """Check what the next process will run: (None when it may go, else why not; how).

    Unchanged code (`fingerprint` still holds) only needs its settings checked, here
    (milliseconds: "settings"); anything else is checked in a child ("child",
    `check_new_code`).
    """
    if fingerprint is not None and sys.argv[1:2] == ["serve"]:
        if await asyncio.to_thread(code_fingerprint) == fingerprint:
            log.info("reload check: the code is unchanged; checking the settings")
            return await asyncio.to_thread(check_settings_here), "settings"
    return await check_new_code(timeout), "child"


def run_check(settings: Any) -> int:
    """`AETHERD_RELOAD_CHECK=1 aetherd serve …`: import everything, check the settings, exit.

    Binds nothing and writes nothing: the old daemon is still serving.
    """
    from aetherd.app import check_environment
    from aetherd.channels import CHANNELS
    from aetherd.daemon import import_lazy_modules
    from aetherd.protocol import Registry
    from aetherd.protocol.registry import LazyChannel

    check_environment(settings)
    for channel in Registry(CHANNELS).channels.values():
        if isinstance(channel, LazyChannel):
            channel.load()  # what the daemon imports on first use must import too
    import_lazy_modules()
    print("aetherd: reload check passed", flush=True)
    return 0


# -- the exec -------------------------------------------------------------------------------
class Reexec:
    """What `serve()` returns when it stopped for a reload: everything `execv` needs."""

    def __init__(
        self,
        state_path: Path,
        fds: list[int],
        pids: list[int],
        extra_env: dict[str, str] | None = None,
        extra_fds: list[int] | None = None,
    ) -> None:
        self.state_path = state_path
        self.fds = fds
        self.pids = pids
        self.extra_env = extra_env or {}
        self.extra_fds = extra_fds or []

    def exec(self) -> None:
        """Replace this process with the new code; returns only if execv failed."""
        from aetherd.services.handover import envelope

        for fd in self.fds + self.extra_fds:
            os.set_inheritable(fd, True)
        os.environ.update(envelope(self.state_path, self.fds, self.pids))
        os.environ.update(self.extra_env)
        # A SIGHUP arriving before the new process installs its handler must not kill
        # it: an ignored signal stays ignored across execv (shells reset it, see _spawn).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        argv = command_line()
        try:
            os.execv(argv[0], argv)
        except OSError as exc:  # pragma: no cover - the check ran this very command
            print(f"aetherd: reload: execv failed: {exc}", file=sys.stderr, flush=True)


def inherited_listener(fd: int | None) -> socket.socket | None:
    """The listening socket handed over as `fd`, or None if it is not one."""
    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening:
        sock.detach()
        return None
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


async def end_abandoned(pids: list[int], grace: float) -> None:
    """End and reap the children of sessions that could not be adopted (a clean restart).

    SIGHUP to each session, SIGKILL to what is left after `grace`, then reap.
    """
    from aetherd.services.terminal import _signal_session

    def reaped(pid: int) -> bool:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return done == pid

    live = [pid for pid in pids if not reaped(pid)]
    for pid in live:
        await asyncio.to_thread(_signal_session, pid, signal.SIGHUP)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        live = [pid for pid in live if not reaped(pid)]
    for pid in live:
        await asyncio.to_thread(_signal_session, pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        live = [pid for pid in live if not reaped(pid)]


# -- `aetherd reload` -----------------------------------------------------------------------
def reload_main(argv: list[str]) -> int:
    """`aetherd reload [--data-dir DIR] [--timeout S]`: SIGHUP the daemon and wait for it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="aetherd reload",
        description="Re-execute the running daemon (found through its data dir) and wait "
        "until it serves again; terminal sessions keep running.",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="env AETHERD_DATA_DIR")
    parser.add_argument("--settings", type=Path, default=None, help="YAML settings file")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None:
        from aetherd.errors import SettingsError
        from aetherd.settings import default_data_dir, load_settings

        try:
            data_dir = load_settings(settings_file=args.settings).data_dir
        except SettingsError:
            env = os.environ.get("AETHERD_DATA_DIR")
            data_dir = Path(env) if env else default_data_dir()
    data_dir = data_dir.expanduser().absolute()
    record = read_record(data_dir)
    pid = record.get("pid")
    if not isinstance(pid, int) or not process_is_aetherd(pid):
        print(f"aetherd: error: no running daemon found in {data_dir}", file=sys.stderr)
        return 1
    generation = record.get("generation", -1)
    asked = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        record = read_record(data_dir)
        error = record.get("reloadError")
        if isinstance(error, dict) and error.get("at", 0) >= asked:
            print(f"aetherd: error: reload refused: {error.get('reason')}", file=sys.stderr)
            return 1
        if record.get("pid") == pid and record.get("generation", -1) != generation:
            print(f"aetherd: reloaded (pid {pid}, generation {record.get('generation')})")
            return 0
        if not process_running(pid):
            print("aetherd: error: the daemon exited during the reload", file=sys.stderr)
            return 1
    print(f"aetherd: error: no reload within {args.timeout:g} s", file=sys.stderr)
    return 1
