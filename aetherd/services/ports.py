"""Listening-port discovery: which TCP ports listen, who owns them, and ending them.

The scanner knows nothing about WebSockets. It keeps the set of listening TCP ports
(IPv4 and IPv6, LISTEN state), keyed by port number, and tells subscribers when a
port opens, closes, or changes what it reports (`PortEvent`).

How it stays cheap enough to run every `port_scan_interval` forever:

- The listening sockets come from netlink `sock_diag` asking for the LISTEN state
  only; the kernel then walks its small listening hash and never the table of
  established connections. Reading `/proc/net/tcp{,6}` walks the whole hash table
  and costs milliseconds even with no connections (measured on this machine, see
  docs/performance.md); it remains the fallback when netlink is unavailable, and
  then runs in a thread.
- A socket inode is mapped to its process only when a port appears (or its sockets
  are replaced), by reading `/proc/<pid>/fd` links, in a thread. Never on every scan.
- Nothing is scanned while nobody holds demand (`hold()`): no connection, no
  service that asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.settings import Settings

log = logging.getLogger("aetherd.ports")

NEVER_REPORTED = frozenset({22, 2222, 3001})
"""Ports never reported (PROTOCOL.md section 5, [docs])."""

TCP_LISTEN = 10  # the kernel's TCP_LISTEN state ("0A" in /proc/net/tcp)


# -- Listening sockets -------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """One listening socket: its port, bind address (text) and socket inode."""

    port: int
    address: str
    inode: int


def _v4_text(word_hex: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(word_hex, 16)))


def _v6_text(words_hex: bytes) -> str:
    words = [int(words_hex[i : i + 8], 16) for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words))


def parse_proc_net_tcp(data: bytes) -> list[Listener]:
    """The LISTEN sockets of one `/proc/net/tcp` or `/proc/net/tcp6` text.

    Addresses are printed as 32-bit words in host byte order: one word for IPv4,
    four for IPv6. Malformed lines are skipped.
    """
    found: list[Listener] = []
    for line in data.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != b"0A":
            continue
        try:
            addr_hex, port_hex = parts[1].split(b":")
            port = int(port_hex, 16)
            inode = int(parts[9])
            if len(addr_hex) == 8:
                address = _v4_text(addr_hex)
            elif len(addr_hex) == 32:
                address = _v6_text(addr_hex)
            else:
                continue
        except (ValueError, OSError):
            continue
        found.append(Listener(port, address, inode))
    return found


PROC_READ = 4096  # bytes per read(); the kernel's seq_file hands out about a page anyway
# A read of PROC_READ bytes from a seq_file comes back full (a page less the part of a
# line that did not fit: 4,050 bytes for /proc/net/tcp here) unless the table ended.
# A shorter one is therefore the last: asking again would only make the kernel walk
# its established hash once more (2.6 ms here) to answer "nothing".
PROC_LAST_READ = PROC_READ // 2
# Socket states that can appear in the listening section of /proc/net/tcp: LISTEN, and
# SYN_RECV (kernels before 4.4 list a listener's pending requests right after it).
_LISTEN_SECTION_STATES = (b"0A", b"03")


def _past_listeners(line: bytes) -> bool:
    """Whether `line` is a socket of the established part of /proc/net/tcp{,6}."""
    parts = line.split(None, 4)
    return len(parts) > 3 and parts[0].endswith(b":") and parts[3] not in _LISTEN_SECTION_STATES


def read_listen_section(path: Path) -> bytes:
    """The complete lines of a `/proc/net/tcp{,6}` file up to its established part.

    The kernel lists every listening socket first (its listening hash), then walks its
    whole established hash (262,144 buckets here, even when empty) to list the rest.
    The listening part is all the scanner needs, so reading stops at the first line of
    the other part, or at a short read (the end of the table, see PROC_LAST_READ):
    measured here, under 3 ms a scan instead of 9 ms (docs/performance.md).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = bytearray()
        line_start = 0  # where the first line not yet looked at begins
        for _ in range(1 << 20):  # bounded: 4 GiB of socket lines
            chunk = os.read(fd, PROC_READ)
            if not chunk:
                return bytes(data)
            data += chunk
            for _ in range(len(chunk) + 1):  # bounded: one round per complete line
                line_end = data.find(b"\n", line_start)
                if line_end < 0:
                    break
                if _past_listeners(bytes(data[line_start:line_end])):
                    return bytes(data[:line_start])
                line_start = line_end + 1
            if len(chunk) < PROC_LAST_READ:
                break
        return bytes(data[:line_start])
    finally:
        os.close(fd)


def read_proc_listeners(proc_root: Path = Path("/proc")) -> list[Listener]:
    """Every LISTEN socket from `/proc/net/tcp` and `/proc/net/tcp6` (blocking: milliseconds)."""
    found: list[Listener] = []
    for name in ("tcp", "tcp6"):
        try:
            data = read_listen_section(proc_root / "net" / name)
        except OSError:
            continue  # no IPv6 in this kernel, for example
        found.extend(parse_proc_net_tcp(data))
    return found


class NetlinkListeners:
    """LISTEN sockets from netlink `sock_diag` (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY).

    Asking for the LISTEN state alone makes the kernel walk only its listening hash,
    so a dump costs tens of microseconds however many connections exist.
    """

    _NETLINK_SOCK_DIAG = 4
    _SOCK_DIAG_BY_FAMILY = 20
    _NLM_F_REQUEST_DUMP = 0x1 | 0x300
    _NLMSG_ERROR = 2
    _NLMSG_DONE = 3
    _HEADER = struct.Struct("=IHHII")  # nlmsghdr
    _REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2 with an empty inet_diag_sockid
    _INODE_OFFSET = 16 + 68  # nlmsghdr + inet_diag_msg up to idiag_inode

    def __init__(self, timeout: float = 1.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, self._NETLINK_SOCK_DIAG)
        self._sock.settimeout(timeout)
        self._seq = 0

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()

    def read(self) -> list[Listener]:
        """Every LISTEN socket, IPv4 then IPv6. Raises OSError when netlink fails."""
        return self._dump(socket.AF_INET) + self._dump(socket.AF_INET6)

    def _dump(self, family: int) -> list[Listener]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = self._REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
        header = self._HEADER.pack(
            self._HEADER.size + len(body),
            self._SOCK_DIAG_BY_FAMILY,
            self._NLM_F_REQUEST_DUMP,
            self._seq,
            0,
        )
        self._sock.send(header + body)
        addr_len = 4 if family == socket.AF_INET else 16
        found: list[Listener] = []
        for _ in range(100_000):  # bounded: one datagram per round
            data = self._sock.recv(1 << 17)
            offset = 0
            while offset + self._HEADER.size <= len(data):
                length, kind, _flags, seq, _pid = self._HEADER.unpack_from(data, offset)
                if length < self._HEADER.size:
                    raise OSError("malformed netlink message")
                if seq != self._seq:
                    offset += (length + 3) & ~3
                    continue
                if kind == self._NLMSG_DONE:
                    return found
                if kind == self._NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + 16)
                    raise OSError(-errno, "sock_diag dump failed")
                if kind == self._SOCK_DIAG_BY_FAMILY and length >= self._INODE_OFFSET + 4:
                    state = data[offset + 17]
                    if state == TCP_LISTEN:
                        (port,) = struct.unpack_from(">H", data, offset + 20)
                        src = data[offset + 24 : offset + 24 + addr_len]
                        (inode,) = struct.unpack_from("=I", data, offset + self._INODE_OFFSET)
                        found.append(Listener(port, socket.inet_ntop(family, src), inode))
                offset += (length + 3) & ~3
        raise OSError("netlink dump did not end")


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.x.y.z)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _address_rank(address: str) -> tuple[bool, bool, bool, str]:
    """Sort key: the widest bind first (wildcard, then other non-loopback; IPv4 first)."""
    try:
        ip = ipaddress.ip_address(address)
        unspecified = ip.is_unspecified
    except ValueError:
        unspecified = False
    return (is_loopback(address), not unspecified, ":" in address, address)


# -- Processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """Who owns a port. Every field is None when it cannot be read."""

    pid: int | None = None
    process: str | None = None
    command: str | None = None


UNKNOWN_PROCESS = ProcessInfo()


def _pids(proc_root: Path) -> list[int]:
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    return [int(name) for name in names if name.isdigit()]


def _socket_inodes_of(pid: int, proc_root: Path) -> set[int]:
    """The socket inodes `pid` holds; empty when it vanished or may not be read."""
    fd_dir = proc_root / str(pid) / "fd"
    inodes: set[int] = set()
    try:
        with os.scandir(fd_dir) as entries:
            for entry in entries:
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue  # the fd closed meanwhile
                if target.startswith("socket:["):
                    with contextlib.suppress(ValueError):
                        inodes.add(int(target[8:-1]))
    except OSError:
        pass  # vanished (FileNotFoundError/ProcessLookupError) or not ours (PermissionError)
    return inodes


def parent_pid(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """The parent of `pid`, or None when it cannot be read."""
    stat = _read_stat(pid, proc_root)
    return int(stat[1]) if stat else None


def _read_stat(pid: int, proc_root: Path) -> list[str] | None:
    """`/proc/<pid>/stat` fields after the command name: [state, ppid, ...]; None if gone."""
    try:
        # The command name in it may hold any bytes: decode leniently.
        text = (proc_root / str(pid) / "stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    _, _, rest = text.rpartition(")")
    fields = rest.split()
    return fields if len(fields) > 20 else None


def process_identity(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The start time of `pid` (unique with the pid), or None when it is gone or a zombie."""
    stat = _read_stat(pid, proc_root)
    if stat is None or stat[0] in ("Z", "X", "x"):
        return None
    return stat[19]  # field 22 of stat: starttime


def socket_owners(
    inodes: Collection[int],
    pids: Iterable[int] | None = None,
    *,
    proc_root: Path = Path("/proc"),
    first_only: bool = True,
) -> dict[int, list[int]]:
    """Map socket inodes to the pids holding them, by reading `/proc/<pid>/fd` links.

    `pids` defaults to every process, newest (highest pid) first, so that a server
    that just started is found early; with `first_only` the walk stops as soon as
    every inode has one holder. A process that exits during the walk, or whose fds
    may not be read, is skipped: its inodes simply have no holder. Never raises.
    """
    wanted = set(inodes)
    owners: dict[int, list[int]] = {}
    if not wanted:
        return owners
    candidates = sorted(_pids(proc_root), reverse=True) if pids is None else pids
    for pid in candidates:
        held = _socket_inodes_of(pid, proc_root) & wanted
        for inode in held:
            owners.setdefault(inode, []).append(pid)
        if first_only and len(owners) == len(wanted):
            break
    for holders in owners.values():
        holders.sort()
    return owners


def topmost_holder(pid: int, inodes: Collection[int], proc_root: Path = Path("/proc")) -> int:
    """Walk up from `pid` while the parent holds one of `inodes` too (a pre-fork master)."""
    wanted = set(inodes)
    for _ in range(64):  # bounded: process trees are not this deep
        ppid = parent_pid(pid, proc_root)
        if ppid is None or ppid <= 1 or not (_socket_inodes_of(ppid, proc_root) & wanted):
            return pid
        pid = ppid
    return pid


def process_info(
    pid: int | None, proc_root: Path = Path("/proc"), max_command: int = 4096
) -> ProcessInfo:
    """Name and command line of `pid`; the pid alone (or nothing) when they cannot be read."""
    if pid is None:
        return UNKNOWN_PROCESS
    base = proc_root / str(pid)
    try:
        raw = (base / "cmdline").read_bytes()
        # A process may name itself with any bytes (prctl PR_SET_NAME): never strict.
        comm = (base / "comm").read_bytes().decode("utf-8", "replace").strip()
    except OSError:
        return ProcessInfo(pid=pid) if (base.exists()) else UNKNOWN_PROCESS
    args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    command = " ".join(args)[:max_command] or None
    name = comm or None
    if args and comm and len(comm) >= 15:
        # comm is cut at 15 characters; the program's file name is the whole one.
        program = os.path.basename(args[0])
        if program.startswith(comm):
            name = program
    return ProcessInfo(pid=pid, process=name, command=command)


# -- What clients see --------------------------------------------------------------------


@dataclass(frozen=True)
class PortInfo:
    """One reported port: the fields of `ports/open`."""

    port: int
    pid: int | None
    process: str | None
    command: str | None
    address: str
    addresses: tuple[str, ...]
    local_only: bool
    url: str
    label: str | None

    def to_wire(self) -> dict[str, Any]:
        """The camelCase fields of `ports/open` and of each `ports/list` item."""
        return {
            "port": self.port,
            "pid": self.pid,
            "process": self.process,
            "command": self.command,
            "address": self.address,
            "addresses": list(self.addresses),
            "localOnly": self.local_only,
            "url": self.url,
            "label": self.label,
        }


@dataclass(frozen=True)
class PortEvent:
    """`open` (new port, or changed fields of a known one) or `close`."""

    kind: Literal["open", "close"]
    port: int
    info: PortInfo | None = None


@dataclass(frozen=True)
class PortRule:
    """What the workspace config says about one port."""

    label: str | None = None
    ignore: bool = False


def _as_rule(value: Any) -> PortRule:
    if isinstance(value, PortRule):
        return value
    if value is None:
        return PortRule()
    get = value.get if isinstance(value, Mapping) else lambda k, d=None: getattr(value, k, d)
    label = get("label", None)
    return PortRule(
        label=str(label) if label is not None else None, ignore=bool(get("ignore", False))
    )


@dataclass
class _Tracked:
    """A listening port as the scanner knows it (reported or not)."""

    port: int
    inodes: frozenset[int]
    addresses: tuple[str, ...]
    owner: ProcessInfo = UNKNOWN_PROCESS
    own: bool = False


@dataclass
class _KillTarget:
    pid: int
    identity: str | None


# -- The scanner -------------------------------------------------------------------------


@dataclass
class _Lookup:
    owners: dict[int, ProcessInfo] = field(default_factory=dict)  # port → owner
    own_ports: set[int] = field(default_factory=set)


class PortScanner:
    """Watches listening TCP ports while someone holds demand; see the module docstring.

    The API other code uses:

    - `hold() -> release`: scanning runs while at least one hold is live.
    - `subscribe(callback) -> unsubscribe`: `callback(PortEvent)` on the event loop.
    - `await snapshot()`: every reported port (scans first when the state is stale).
    - `await kill(port)`: SIGTERM the listening processes, SIGKILL after the grace period.
    - `set_port_config({port: {"label": str | None, "ignore": bool}})`: the workspace
      config's port rules; emits `open`/`close` at once for what it changes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        proc_root: Path = Path("/proc"),
        own_pid: int | None = None,
        source: Literal["auto", "netlink", "proc"] | None = None,
    ) -> None:
        self.settings = settings
        self.proc_root = proc_root
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.source_setting = source or settings.port_scan_source
        self.static_ignored = NEVER_REPORTED | frozenset(settings.port_ignore)
        self._netlink: NetlinkListeners | None = None
        self.source: Literal["netlink", "proc"] = "proc"
        self._tracked: dict[int, _Tracked] = {}
        self._rules: dict[int, PortRule] = {}
        self._subscribers: list[Callable[[PortEvent], None]] = []
        self._demand = 0
        self._stale = True
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._kill_tasks: set[asyncio.Task[None]] = set()
        self._warned_cap = False
        self._started = False
        self.scans = 0
        self.scan_seconds = 0.0
        self.lookups = 0

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Pick the socket source (netlink when it works). Scanning waits for demand."""
        if self.source_setting in ("auto", "netlink"):
            try:
                netlink = NetlinkListeners()
                try:
                    netlink.read()
                except OSError:
                    netlink.close()
                    raise
            except OSError as exc:
                if self.source_setting == "netlink":
                    raise
                log.info("netlink sock_diag unavailable (%s); reading /proc/net/tcp", exc)
            else:
                self._netlink = netlink
                self.source = "netlink"
        self._started = True

    async def stop(self) -> None:
        """Stop scanning, cancel pending SIGKILL escalations, close the netlink socket."""
        self._started = False
        tasks = [t for t in (self._loop_task, *self._kill_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        self._kill_tasks.clear()
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
        self._stale = True

    # -- demand and subscribers -------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while someone holds demand, that is, while the periodic scan runs."""
        return self._demand > 0

    def hold(self) -> Callable[[], None]:
        """Ask for scanning; returns the (idempotent) release.

        Scanning is skipped entirely while nobody holds it. The state is stale after a
        pause: call `snapshot()` after `hold()` for the ports already listening (the scan
        that refreshes a stale state emits no events).
        """
        self._demand += 1
        if self._started and (self._loop_task is None or self._loop_task.done()):
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name="ports-scanner"
            )
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._demand -= 1
            if self._demand == 0:
                self._stale = True
                if self._loop_task is not None:
                    self._loop_task.cancel()
                    self._loop_task = None

        return release

    def subscribe(self, callback: Callable[[PortEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` for each change found while scanning; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- queries ----------------------------------------------------------------------
    async def snapshot(self) -> list[PortInfo]:
        """Every reported port, by port number; scans first when the state is stale."""
        if self._stale:
            await self.scan()
        return sorted(self._visible().values(), key=lambda info: info.port)

    def get(self, port: int) -> PortInfo | None:
        """The reported port `port` as last scanned, if any."""
        return self._visible().get(port)

    def metrics(self) -> Iterator[Sample]:
        """Scans, their cost, and the ports reported (read at scrape time)."""
        yield Sample("aetherd_port_scans", "Port scans run", self.scans, kind="counter")
        yield Sample(
            "aetherd_port_scan_seconds",
            "Time spent scanning ports",
            self.scan_seconds,
            kind="counter",
        )
        yield Sample(
            "aetherd_port_lookups", "Socket-to-process lookups", self.lookups, kind="counter"
        )
        yield Sample("aetherd_ports_listening", "Listening ports reported", len(self._visible()))

    def set_port_config(self, rules: Mapping[Any, Any] | None) -> None:
        """Apply the workspace config's port rules, `{port: {"label", "ignore"}}`.

        Values may be `PortRule`, mappings, or objects with `label`/`ignore` attributes;
        keys may be ints or digit strings. A port newly ignored gets `close`, one no
        longer ignored gets `open`, a changed label gets `open` with the new label.
        """
        parsed: dict[int, PortRule] = {}
        for key, value in (rules or {}).items():
            try:
                port = int(key)
            except (TypeError, ValueError):
                continue
            parsed[port] = _as_rule(value)
        before = self._visible()
        self._rules = parsed
        if not self._stale:
            self._emit_diff(before, self._visible())

    # -- scanning ---------------------------------------------------------------------
    async def _run(self) -> None:
        interval = self.settings.port_scan_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Logged once per run of failures, not twice a second.
                if not failing:
                    log.exception("port scan failed; retrying every %s s", interval)
                failing = True
            else:
                if failing:
                    log.info("port scan works again")
                failing = False

    async def scan(self) -> None:
        """Scan once now and emit the changes (none when refreshing a stale state)."""
        async with self._lock:
            started = time.perf_counter()
            silent = self._stale
            listeners = await self._read_listeners()
            grouped = self._group(listeners)
            previous = self._tracked
            need: dict[int, frozenset[int]] = {}
            tracked: dict[int, _Tracked] = {}
            for port, (inodes, addresses) in grouped.items():
                old = previous.get(port)
                if old is not None and self._same_owner(old, inodes):
                    tracked[port] = replace(old, inodes=inodes, addresses=addresses)
                else:
                    tracked[port] = _Tracked(port, inodes, addresses)
                    need[port] = inodes
            if need:
                self.lookups += 1
                found = await asyncio.to_thread(self._lookup, need)
                for port in need:
                    tracked[port].owner = found.owners.get(port, UNKNOWN_PROCESS)
                    tracked[port].own = port in found.own_ports
            before = self._visible()
            self._tracked = tracked
            # With nobody holding demand, a one-off scan is outdated as soon as it ends.
            self._stale = not self.active
            self.scans += 1
            self.scan_seconds += time.perf_counter() - started
            if not silent:
                self._emit_diff(before, self._visible())

    def _same_owner(self, old: _Tracked, inodes: frozenset[int]) -> bool:
        """Whether `old`'s owner still stands for a port now held by `inodes`.

        Same sockets: yes. Sockets partly replaced (a SO_REUSEPORT worker restarted):
        yes while the old owner lives. Sockets all replaced (a restarted server): no.
        """
        if old.inodes == inodes or not inodes:
            return True
        if not old.inodes & inodes:
            return False
        if old.own:
            return True
        pid = old.owner.pid
        return pid is not None and process_identity(pid, self.proc_root) is not None

    async def _read_listeners(self) -> list[Listener]:
        if self._netlink is not None:
            try:
                return self._netlink.read()
            except OSError as exc:
                log.warning("netlink sock_diag failed (%s); reading /proc/net/tcp from now on", exc)
                self._netlink.close()
                self._netlink = None
                self.source = "proc"
        return await asyncio.to_thread(read_proc_listeners, self.proc_root)

    def _group(
        self, listeners: list[Listener]
    ) -> dict[int, tuple[frozenset[int], tuple[str, ...]]]:
        by_port: dict[int, tuple[set[int], set[str]]] = {}
        for item in listeners:
            if item.port in self.static_ignored or item.port == 0:
                continue
            inodes, addresses = by_port.setdefault(item.port, (set(), set()))
            if item.inode:
                inodes.add(item.inode)
            addresses.add(item.address)
        ports = sorted(by_port)
        cap = self.settings.port_max_tracked
        if len(ports) > cap:
            if not self._warned_cap:
                log.warning("%d listening ports; tracking the lowest %d", len(ports), cap)
                self._warned_cap = True
            ports = ports[:cap]
        return {
            port: (
                frozenset(by_port[port][0]),
                tuple(sorted(by_port[port][1], key=_address_rank)),
            )
            for port in ports
        }

    def _lookup(self, need: Mapping[int, frozenset[int]]) -> _Lookup:
        """Owners of new ports (runs in a thread). The daemon's own sockets come first."""
        result = _Lookup()
        own = _socket_inodes_of(self.own_pid, self.proc_root)
        remaining: dict[int, frozenset[int]] = {}
        for port, inodes in need.items():
            if inodes & own:
                result.own_ports.add(port)
                result.owners[port] = ProcessInfo(pid=self.own_pid)
            else:
                remaining[port] = inodes
        all_inodes = {inode for inodes in remaining.values() for inode in inodes}
        owners = socket_owners(all_inodes, proc_root=self.proc_root)
        for port, inodes in remaining.items():
            holders = sorted({owners[i][0] for i in inodes if i in owners})
            if not holders:
                continue  # not ours to read, another pid namespace, or already gone
            pid = topmost_holder(holders[0], inodes, self.proc_root)
            result.owners[port] = process_info(
                pid, self.proc_root, self.settings.port_command_max_length
            )
        return result

    def _visible(self) -> dict[int, PortInfo]:
        visible: dict[int, PortInfo] = {}
        for port, item in self._tracked.items():
            rule = self._rules.get(port, PortRule())
            if item.own or rule.ignore or port == self.settings.port:
                continue
            visible[port] = PortInfo(
                port=port,
                pid=item.owner.pid,
                process=item.owner.process,
                command=item.owner.command,
                address=item.addresses[0] if item.addresses else "",
                addresses=item.addresses,
                local_only=bool(item.addresses) and all(is_loopback(a) for a in item.addresses),
                url=self.settings.preview_url(port),
                label=rule.label,
            )
        return visible

    def _emit_diff(self, before: Mapping[int, PortInfo], after: Mapping[int, PortInfo]) -> None:
        events: list[PortEvent] = []
        for port in sorted(set(before) | set(after)):
            old, new = before.get(port), after.get(port)
            if new is None:
                events.append(PortEvent("close", port))
            elif new != old:
                events.append(PortEvent("open", port, new))
        for event in events:
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    log.exception("port event subscriber failed")

    # -- kill -------------------------------------------------------------------------
    async def kill(self, port: int) -> dict[str, Any]:
        """SIGTERM every process holding `port`'s listening sockets; SIGKILL after the grace.

        Raises NOT_FOUND for a port that is not reported, PERMISSION_DENIED for the
        daemon's own port, when the daemon itself or pid 1 holds the socket, or when
        the processes cannot be identified or signalled. Returns `{port, pids}`.
        """
        if self._stale:
            await self.scan()
        item = self._tracked.get(port)
        if item is not None and (item.own or port == self.settings.port):
            raise AetherError(
                ErrorCode.PERMISSION_DENIED, f"port {port} is the daemon's own port", port=port
            )
        if item is None or port not in self._visible():
            raise AetherError(ErrorCode.NOT_FOUND, f"no listening port {port}", port=port)
        owners = await asyncio.to_thread(
            socket_owners, item.inodes, None, proc_root=self.proc_root, first_only=False
        )
        pids = sorted({pid for holders in owners.values() for pid in holders})
        if not pids:
            await self.scan()
            if port not in self._visible():
                raise AetherError(ErrorCode.NOT_FOUND, f"no listening port {port}", port=port)
            raise AetherError(
                ErrorCode.PERMISSION_DENIED,
                f"cannot tell which process listens on port {port}",
                port=port,
            )
        if self.own_pid in pids:
            raise AetherError(
                ErrorCode.PERMISSION_DENIED, f"port {port} belongs to the daemon itself", port=port
            )
        if 1 in pids:
            raise AetherError(
                ErrorCode.PERMISSION_DENIED,
                f"port {port} belongs to pid 1, which is never killed",
                port=port,
            )
        targets = [_KillTarget(pid, process_identity(pid, self.proc_root)) for pid in pids]
        signalled: list[int] = []
        denied = False
        for target in targets:
            try:
                os.kill(target.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            except PermissionError:
                denied = True
                continue
            signalled.append(target.pid)
        if denied and not signalled:
            raise AetherError(
                ErrorCode.PERMISSION_DENIED,
                f"not allowed to signal the processes of port {port}",
                port=port,
            )
        task = asyncio.get_running_loop().create_task(
            self._escalate([t for t in targets if t.pid in signalled]), name=f"ports-kill-{port}"
        )
        self._kill_tasks.add(task)
        task.add_done_callback(self._kill_tasks.discard)
        log.info("SIGTERM sent to %s for port %d", signalled, port)
        return {"port": port, "pids": signalled}

    async def _escalate(self, targets: list[_KillTarget]) -> None:
        """After the grace period, SIGKILL the targets that are still the same live process."""
        await asyncio.sleep(self.settings.port_kill_grace)
        for target in targets:
            identity = process_identity(target.pid, self.proc_root)
            if identity is None or identity != target.identity:
                continue  # gone (or a zombie), or the pid was reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target.pid, signal.SIGKILL)
                log.info("SIGKILL sent to %d after the grace period", target.pid)
