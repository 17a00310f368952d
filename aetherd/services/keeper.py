"""Keepers: something outside the daemon that holds a duplicate of every PTY master fd.

While a keeper holds a PTY's master, a daemon that dies (SIGKILL, the OOM killer) does
not close the PTY: the shell gets no SIGHUP and keeps running, its output waits in the
PTY, and the restarted daemon gets the fd back through `LISTEN_FDS`/`LISTEN_FDNAMES`.

- `InitKeeper`: `aetherd init` (aetherd/init.py). The daemon talks to it over a
  SOCK_SEQPACKET socket (`AETHERD_KEEPER_FD`): `keep` (with the fd, SCM_RIGHTS) and
  `drop` messages from the daemon; `exit` messages from init, which reaps the shells
  once they are its children (after a crash) and forwards their wait status.
- `FdStore`: systemd's file descriptor store (`sd_notify` `FDSTORE=1` with the fd,
  `FDNAME=`; `FDSTOREREMOVE=1` to drop), used when systemd announces it (`$FDSTORE`).
  systemd does not forward exit statuses: an adopted shell's exit is seen through a
  pidfd, its status is unknown.

FD names: `listen` for the listening socket, `pty-<32 hex>` for a session (a hash of
its id; the ring's metadata file of the same name holds the id).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("aetherd.keeper")

KEEPER_ENV = "AETHERD_KEEPER_FD"
LISTEN_NAME = "listen"
PTY_PREFIX = "pty-"
MAX_MESSAGE = 4096


def fd_name(session_id: str) -> str:
    """The fd store name of a session (valid for systemd: no ':' and short)."""
    return PTY_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()[:32]


def send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    """One message with `fds` attached (SCM_RIGHTS)."""
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([payload], ancillary)
    else:
        sock.send(payload)


def recv_fds(sock: socket.socket, max_fds: int = 16) -> tuple[bytes, list[int]]:
    """One message and the fds attached to it (made non-inheritable)."""
    size = array.array("i").itemsize * max_fds
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(size))
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(blob[: len(blob) - (len(blob) % got.itemsize)])
            fds.extend(got)
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, fds


class Keeper:
    """Holds duplicates of the PTY fds (base: holds nothing)."""

    name = "none"
    forwards_exits = False  # True when the keeper reports the exit status of adopted shells

    def keep(self, session_id: str, pid: int, fd: int) -> None:
        """Hold a duplicate of `fd` (session `session_id`, shell `pid`)."""

    def drop(self, session_id: str) -> None:
        """Stop holding the session's fd (it ended)."""

    def keep_listener(self, fd: int) -> None:
        """Hold the listening socket, so connections wait while the daemon restarts."""

    def close(self) -> None:
        """Release the keeper's resources in this process (not what it holds)."""


class InitKeeper(Keeper):
    """`aetherd init` as the keeper, over the inherited SOCK_SEQPACKET socket."""

    name = "init"
    forwards_exits = True

    def __init__(self, sock: socket.socket, on_exit: Callable[[int, int], None]) -> None:
        self.sock = sock
        self.on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Listen for init's `exit` messages."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_message)

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            send_fds(self.sock, json.dumps(message).encode(), fds or [])
        except OSError as exc:
            log.warning("keeper (init) unreachable: %s", exc.strerror or exc)

    def _on_message(self) -> None:
        try:
            data, fds = recv_fds(self.sock)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            os.close(fd)
        if not data:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            return
        try:
            message = json.loads(data)
            if message.get("op") == "exit":
                self.on_exit(int(message["pid"]), int(message["status"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("keeper (init) sent an unreadable message")

    def keep(self, session_id: str, pid: int, fd: int) -> None:
        self._send({"op": "keep", "name": fd_name(session_id), "pid": pid}, [fd])

    def drop(self, session_id: str) -> None:
        self._send({"op": "drop", "name": fd_name(session_id)})

    def keep_listener(self, fd: int) -> None:
        self._send({"op": "keep", "name": LISTEN_NAME, "pid": 0}, [fd])

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class FdStore(Keeper):
    """systemd's fd store, through `$NOTIFY_SOCKET` (sd_pid_notify_with_fds)."""

    name = "systemd"

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address

    def _notify(self, state: str, fds: list[int]) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                send_fds(sock, state.encode(), fds)
        except OSError as exc:
            log.warning("fd store: sd_notify failed: %s", exc.strerror or exc)

    def keep(self, session_id: str, pid: int, fd: int) -> None:
        self._notify(f"FDSTORE=1\nFDNAME={fd_name(session_id)}\nFDPOLL=0", [fd])

    def drop(self, session_id: str) -> None:
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={fd_name(session_id)}", [])

    def keep_listener(self, fd: int) -> None:
        self._notify(f"FDSTORE=1\nFDNAME={LISTEN_NAME}\nFDPOLL=0", [fd])


def from_environment(
    on_exit: Callable[[int, int], None], environ: Mapping[str, str] | None = None
) -> Keeper:
    """The keeper this daemon runs under: init's socket, systemd's fd store, or none.

    Pops `AETHERD_KEEPER_FD` (the shells must not inherit it).
    """
    env = os.environ if environ is None else environ
    raw = env.get(KEEPER_ENV, "")
    if env is os.environ:
        os.environ.pop(KEEPER_ENV, None)
    if raw.isdigit():
        fd = int(raw)
        try:
            sock = socket.socket(fileno=fd)
            os.set_inheritable(fd, False)
            sock.setblocking(False)
            return InitKeeper(sock, on_exit)
        except OSError as exc:
            log.warning("keeper fd %s unusable: %s", raw, exc)
    address = env.get("NOTIFY_SOCKET")
    if address and env.get("FDSTORE", "0").isdigit() and int(env.get("FDSTORE", "0")) > 0:
        return FdStore(address)
    return Keeper()


def named_fds(environ: Mapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The fds passed as systemd does (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), named.

    Pops the variables (the shells must not inherit them). Unnamed fds get "unknown".
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if env is os.environ:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid.isdigit() or not count.isdigit() or int(pid) != os.getpid():
        return []
    out = []
    for index in range(int(count)):
        fd = 3 + index
        os.set_inheritable(fd, False)
        out.append((fd, names[index] if index < len(names) else "unknown"))
    return out
