"""systemd integration without a dependency: sd_notify datagrams and socket activation.

- `notify()` sends `READY=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=…` to `$NOTIFY_SOCKET`
  (a Unix datagram socket; a leading `@` means the abstract namespace), see sd_notify(3).
- `watchdog_interval()` reads `$WATCHDOG_USEC` (and `$WATCHDOG_PID`); the daemon pings at
  half that interval from the event loop, so a hung loop stops the pings and systemd
  restarts the service.
- `listen_fds()` takes sockets passed by socket activation (`$LISTEN_FDS`, `$LISTEN_PID`,
  fds from 3, sd_listen_fds(3)), so the port stays open across daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("aetherd.systemd")

SD_LISTEN_FDS_START = 3


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` to the service manager; False when there is none (not an error)."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc.strerror or exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when not asked."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 / 2 if value > 0 else None


async def watchdog_loop(interval: float, environ: Mapping[str, str] | None = None) -> None:
    """Ping the watchdog from the event loop until cancelled."""
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(interval)


def listen_fds(environ: Mapping[str, str] | None = None, unset: bool = True) -> list[socket.socket]:
    """Sockets handed over by socket activation, in order (empty when none were passed)."""
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    if not pid or not count or not pid.isdigit() or not count.isdigit():
        return []
    if int(pid) != os.getpid():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    if unset and environ is os.environ:
        # Children (user shells) must not believe the sockets are theirs.
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            with contextlib.suppress(KeyError):
                del os.environ[key]
    return sockets
