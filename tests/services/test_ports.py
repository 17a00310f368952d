"""The port scanner alone: real listeners in child processes, real netlink and /proc."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.ports import (
    PROC_READ,
    NetlinkListeners,
    PortEvent,
    PortRule,
    PortScanner,
    is_loopback,
    parse_proc_net_tcp,
    process_info,
    read_listen_section,
    read_proc_listeners,
    socket_owners,
)
from aetherd.settings import Settings
from tests.support import wait_for

# A listener in a child process: binds, listens, prints its port, then waits for stdin
# to close. Flags: ignore-term (SIGTERM ignored), reuseport, fork=N (N children keep the
# socket: a pre-fork server), v6only, dual (also listen on :: with the same port).
LISTENER = r"""
import os, signal, socket, sys
family, host, port, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
opts = dict(f.split("=", 1) if "=" in f else (f, "1") for f in flags if f)
if "ignore-term" in opts:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if "reuseport" in opts:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if "v6only" in opts else 0)
s.bind((host, port))
s.listen(16)
bound = s.getsockname()[1]
keep = [s]
if "dual" in opts:
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    t.bind(("::", bound))
    t.listen(16)
    keep.append(t)
for _ in range(int(opts.get("many", 0))):
    m = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    m.bind(("127.0.0.1", 0))
    m.listen(1)
    keep.append(m)
for _ in range(int(opts.get("fork", 0))):
    if os.fork() == 0:
        sys.stdin.buffer.read()
        os._exit(0)
print(bound, *[k.getsockname()[1] for k in keep[1:]], flush=True)
sys.stdin.buffer.read()
"""


class Child:
    """A listener child process (its own session, so its forks go with it)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, port: int, extra: tuple[int, ...] = ()
    ) -> None:
        self.proc = proc
        self.port = port
        self.extra = extra  # the other ports it listens on ("dual", "many=N")

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.wait_for(self.proc.wait(), 10)


async def spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )


async def start_listener(host: str, port: int = 0, family: str = "4", flags: str = "") -> Child:
    """A child process listening on `host` (port 0 picks a free one)."""
    proc = await spawn(sys.executable, "-c", LISTENER, family, host, str(port), flags)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    if not line:
        await proc.wait()
        raise RuntimeError(f"listener on {host} failed to start")
    first, *extra = (int(word) for word in line.split())
    return Child(proc, first, tuple(extra))


async def start_http_server(host: str = "127.0.0.1") -> Child:
    """`python -m http.server` on a free port (it prints the port it got)."""
    proc = await spawn(sys.executable, "-u", "-m", "http.server", "--bind", host, "0")
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
    # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    return Child(proc, int(line.split(" port ")[1].split()[0]))


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Children started by a test; all are killed at teardown."""
    started: list[Child] = []
    yield started
    for child in started:
        await child.stop()


@pytest.fixture
async def scanner_factory(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Started scanners recording their events in `.events`; stopped at teardown."""
    made: list[PortScanner] = []

    async def make(settings: Settings | None = None, **kwargs: Any) -> PortScanner:
        scanner = PortScanner(settings or make_settings(port_scan_interval=0.05), **kwargs)
        await scanner.start()
        scanner.events = []  # type: ignore[attr-defined]
        scanner.subscribe(scanner.events.append)  # type: ignore[attr-defined]
        made.append(scanner)
        return scanner

    yield make
    for scanner in made:
        await scanner.stop()


def proc_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z, ...), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def opened(scanner: PortScanner, port: int) -> PortEvent | None:
    events: list[PortEvent] = scanner.events  # type: ignore[attr-defined]
    for event in events:
        if event.kind == "open" and event.port == port:
            return event
    return None


def closed(scanner: PortScanner, port: int) -> bool:
    events: list[PortEvent] = scanner.events  # type: ignore[attr-defined]
    return any(e.kind == "close" and e.port == port for e in events)


# -- parsing and sources ----------------------------------------------------------------


def kernel_hex(address: str) -> str:
    """An address as the kernel prints it in /proc/net/tcp: 32-bit words in host order."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    packed = socket.inet_pton(family, address)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words)


def proc_line(index: int, local: str, port: int, remote: str, state: str, inode: int) -> str:
    rport = 0 if state == "0A" else 53410
    return (
        f"   {index}: {kernel_hex(local)}:{port:04X} {kernel_hex(remote)}:{rport:04X} {state} "
        f"00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0 100 0 0 10 0"
    )


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"


def test_parse_proc_net_tcp_keeps_listen_sockets_with_addresses() -> None:
    v4_text = "\n".join(
        [
            HEADER,
            proc_line(0, "127.0.0.1", 8080, "0.0.0.0", "0A", 1111),
            proc_line(1, "0.0.0.0", 3000, "0.0.0.0", "0A", 2222),
            proc_line(2, "127.0.0.1", 8080, "127.0.0.1", "01", 3333),  # established
            "   3: garbage",
        ]
    )
    v6_text = "\n".join(
        [
            HEADER,
            proc_line(0, "::1", 8081, "::", "0A", 4444),
            proc_line(1, "::", 8082, "::", "0A", 5555),
            proc_line(2, "::ffff:127.0.0.1", 8083, "::", "0A", 6666),
            proc_line(3, "fe80::1", 8084, "fe80::2", "06", 7777),  # time-wait
        ]
    )
    assert kernel_hex("127.0.0.1") == ("0100007F" if sys.byteorder == "little" else "7F000001")
    v4 = [(x.port, x.address, x.inode) for x in parse_proc_net_tcp(v4_text.encode())]
    assert v4 == [(8080, "127.0.0.1", 1111), (3000, "0.0.0.0", 2222)]
    v6 = [(x.port, x.address, x.inode) for x in parse_proc_net_tcp(v6_text.encode())]
    assert v6 == [(8081, "::1", 4444), (8082, "::", 5555), (8083, "::ffff:127.0.0.1", 6666)]


def test_proc_reader_stops_at_the_established_part(tmp_path: Path) -> None:
    """The kernel lists listening sockets first; the reader stops at the first socket of
    the established part, so a LISTEN line placed after one (impossible in a real file)
    proves where it stopped. SYN_RECV lines (old kernels list them among the listeners)
    do not stop it, and a page boundary inside a line does not cut a socket short."""
    listeners = [proc_line(i, "127.0.0.1", 9000 + i, "0.0.0.0", "0A", 1000 + i) for i in range(150)]
    syn_recv = proc_line(150, "127.0.0.1", 9000, "127.0.0.1", "03", 0)
    tail = [
        proc_line(151, "127.0.0.1", 9000, "127.0.0.1", "01", 5555),  # established: stop here
        proc_line(152, "127.0.0.1", 7777, "0.0.0.0", "0A", 7777),  # never read
    ]
    text = "\n".join([HEADER, *listeners[:70], syn_recv, *listeners[70:], *tail]) + "\n"
    assert len(text) > 3 * PROC_READ  # several reads, lines cut at page boundaries
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(text)
    (tmp_path / "net" / "tcp6").write_text(HEADER + "\n")
    found = [(x.port, x.inode) for x in read_proc_listeners(tmp_path)]
    assert found == [(9000 + i, 1000 + i) for i in range(150)]
    section = read_listen_section(tmp_path / "net" / "tcp")
    assert section.endswith(b"\n") and b" 7777 " not in section


def test_loopback_addresses() -> None:
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("0.0.0.0", "::", "10.1.2.3", "::ffff:10.1.2.3", "fe80::1", "nonsense"):
        assert not is_loopback(address), address


async def test_netlink_and_proc_agree_on_real_listeners(children: list[Child]) -> None:
    children.append(await start_listener("127.0.0.1"))
    children.append(await start_listener("::1", family="6", flags="v6only"))
    children.append(await start_listener("::ffff:127.0.0.1", family="6"))
    netlink = NetlinkListeners()
    try:
        from_netlink = {(x.port, x.address, x.inode) for x in netlink.read()}
    finally:
        netlink.close()
    from_proc = {(x.port, x.address, x.inode) for x in read_proc_listeners()}
    ours = {c.port for c in children}
    expected = {
        (children[0].port, "127.0.0.1"),
        (children[1].port, "::1"),
        (children[2].port, "::ffff:127.0.0.1"),
    }
    assert {(p, a) for p, a, _ in from_netlink if p in ours} == expected
    assert {x for x in from_netlink if x[0] in ours} == {x for x in from_proc if x[0] in ours}


async def test_netlink_dump_spanning_many_datagrams(children: list[Child]) -> None:
    child = await start_listener("127.0.0.1", flags="many=600")
    children.append(child)
    ours = {child.port, *child.extra}
    assert len(ours) == 601
    netlink = NetlinkListeners()
    try:
        from_netlink = {(x.port, x.inode) for x in netlink.read() if x.port in ours}
    finally:
        netlink.close()
    from_proc = {(x.port, x.inode) for x in read_proc_listeners() if x.port in ours}
    assert {port for port, _ in from_netlink} == ours
    assert from_netlink == from_proc


# -- process attribution ----------------------------------------------------------------


async def test_socket_owner_and_process_info(children: list[Child]) -> None:
    child = await start_listener("127.0.0.1")
    children.append(child)
    netlink = NetlinkListeners()
    try:
        inode = next(x.inode for x in netlink.read() if x.port == child.port)
    finally:
        netlink.close()
    owners = socket_owners([inode])
    assert owners == {inode: [child.pid]}
    info = process_info(child.pid)
    assert info.pid == child.pid
    assert info.process is not None and info.process.startswith("python")
    assert info.command is not None and LISTENER.strip()[:20] in info.command


async def test_lookup_of_a_process_that_just_exited(children: list[Child]) -> None:
    child = await start_listener("127.0.0.1")
    children.append(child)
    netlink = NetlinkListeners()
    try:
        inode = next(x.inode for x in netlink.read() if x.port == child.port)
    finally:
        netlink.close()
    await child.stop()  # exited and reaped: its /proc entry is gone
    assert proc_state(child.pid) is None
    assert socket_owners([inode], pids=[child.pid, os.getpid()]) == {}
    assert process_info(child.pid).pid is None


async def test_scan_then_exit_before_the_lookup_reports_a_null_pid(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    """The socket is seen by the scan; its process exits before the pid lookup runs."""
    child = await start_listener("127.0.0.1")
    children.append(child)
    netlink = NetlinkListeners()
    try:
        seen = [x for x in netlink.read() if x.port == child.port]
    finally:
        netlink.close()
    assert seen
    await child.stop()

    scanner: PortScanner = await scanner_factory()
    real_read = scanner._read_listeners

    async def read_with_stale_socket() -> list[Any]:
        return [*await real_read(), *seen]  # what the scan saw just before the exit

    scanner._read_listeners = read_with_stale_socket  # type: ignore[method-assign]
    release = scanner.hold()
    try:
        await scanner.snapshot()
        info = scanner.get(child.port)
        assert info is not None
        assert (info.pid, info.process, info.command) == (None, None, None)
        assert info.address == "127.0.0.1"
    finally:
        release()


# -- the scanner ------------------------------------------------------------------------


async def test_open_and_close_events_with_fields(
    children: list[Child], scanner_factory: Callable[..., Any], make_settings: Any
) -> None:
    settings = make_settings(
        port_scan_interval=0.05,
        preview_url_template="https://{port}-{workspacePrefix}.preview.example.com/{previewToken}",
        preview_token="tok",
        workspace_id="abcdef123456",
    )
    scanner: PortScanner = await scanner_factory(settings)
    release = scanner.hold()
    await scanner.snapshot()
    try:
        server = await start_http_server()
        children.append(server)
        await wait_for(lambda: opened(scanner, server.port) is not None)
        event = opened(scanner, server.port)
        assert event is not None and event.info is not None
        assert event.info.to_wire() == {
            "port": server.port,
            "pid": server.pid,
            "process": event.info.process,
            "command": event.info.command,
            "address": "127.0.0.1",
            "addresses": ["127.0.0.1"],
            "localOnly": True,
            "url": f"https://{server.port}-abcdef12.preview.example.com/tok",
            "label": None,
        }
        assert event.info.process is not None and event.info.process.startswith("python")
        assert event.info.command is not None and "http.server" in event.info.command
        await server.stop()
        await wait_for(lambda: closed(scanner, server.port))
    finally:
        release()


@pytest.mark.parametrize(
    ("host", "family", "flags", "address", "local_only"),
    [
        ("0.0.0.0", "4", "", "0.0.0.0", False),
        ("::1", "6", "v6only", "::1", True),
        ("::", "6", "", "::", False),
        ("::ffff:127.0.0.1", "6", "", "::ffff:127.0.0.1", True),
    ],
)
async def test_bind_address_and_local_only(
    children: list[Child],
    scanner_factory: Callable[..., Any],
    host: str,
    family: str,
    flags: str,
    address: str,
    local_only: bool,
) -> None:
    child = await start_listener(host, family=family, flags=flags)
    children.append(child)
    scanner: PortScanner = await scanner_factory()
    ports = {info.port: info for info in await scanner.snapshot()}
    assert ports[child.port].address == address
    assert ports[child.port].local_only is local_only
    assert ports[child.port].pid == child.pid


async def test_one_port_on_ipv4_and_ipv6_is_one_port(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    child = await start_listener("0.0.0.0", flags="dual")
    children.append(child)
    scanner: PortScanner = await scanner_factory()
    ports = [info for info in await scanner.snapshot() if info.port == child.port]
    assert len(ports) == 1
    assert ports[0].addresses == ("0.0.0.0", "::")
    assert ports[0].address == "0.0.0.0"
    assert ports[0].local_only is False
    assert ports[0].pid == child.pid


async def test_pre_fork_server_is_one_port_with_the_parent_as_pid(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    child = await start_listener("127.0.0.1", flags="fork=3")
    children.append(child)
    scanner: PortScanner = await scanner_factory()
    ports = [info for info in await scanner.snapshot() if info.port == child.port]
    assert len(ports) == 1
    assert ports[0].pid == child.pid


async def test_reuseport_listeners_are_one_port(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    first = await start_listener("127.0.0.1", flags="reuseport")
    children.append(first)
    second = await start_listener("127.0.0.1", port=first.port, flags="reuseport")
    children.append(second)
    scanner: PortScanner = await scanner_factory()
    ports = [info for info in await scanner.snapshot() if info.port == first.port]
    assert len(ports) == 1
    assert ports[0].pid in (first.pid, second.pid)
    # Both sockets are tracked: closing one keeps the port open.
    release = scanner.hold()
    await scanner.snapshot()
    try:
        await second.stop()
        marker = await start_listener("127.0.0.1")
        children.append(marker)
        await wait_for(lambda: opened(scanner, marker.port) is not None)
        assert not closed(scanner, first.port)
        await first.stop()
        await wait_for(lambda: closed(scanner, first.port))
    finally:
        release()


async def test_never_reported_ports_own_sockets_and_settings_ignores(
    children: list[Child], scanner_factory: Callable[..., Any], make_settings: Any
) -> None:
    ignored = await start_listener("127.0.0.1")
    children.append(ignored)
    kept = await start_listener("127.0.0.1")
    children.append(kept)
    own = socket.socket()
    own.bind(("127.0.0.1", 0))
    own.listen(1)
    try:
        settings = make_settings(port_ignore=f"{ignored.port}, 65000")
        assert settings.port_ignore == (ignored.port, 65000)
        scanner: PortScanner = await scanner_factory(settings)
        ports = {info.port for info in await scanner.snapshot()}
        assert kept.port in ports
        assert ignored.port not in ports
        assert own.getsockname()[1] not in ports  # a socket of the daemon's own process
        assert not ports & {22, 2222, 3001}
        with pytest.raises(AetherError) as err:
            await scanner.kill(own.getsockname()[1])
        assert err.value.code is ErrorCode.PERMISSION_DENIED
        for port in (ignored.port, 22, 3001, 65535):
            with pytest.raises(AetherError) as err:
                await scanner.kill(port)
            assert err.value.code is ErrorCode.NOT_FOUND
    finally:
        own.close()


async def test_port_config_labels_and_ignores_apply_at_once(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    child = await start_listener("127.0.0.1")
    children.append(child)
    scanner: PortScanner = await scanner_factory()
    release = scanner.hold()
    try:
        await scanner.snapshot()
        events: list[PortEvent] = scanner.events  # type: ignore[attr-defined]
        events.clear()
        scanner.set_port_config({str(child.port): {"label": "Web app", "ignore": False}})
        assert [(e.kind, e.port, e.info and e.info.label) for e in events] == [
            ("open", child.port, "Web app")
        ]
        events.clear()
        scanner.set_port_config({child.port: PortRule(label="Web app", ignore=True)})
        assert [(e.kind, e.port) for e in events] == [("close", child.port)]
        assert child.port not in {info.port for info in await scanner.snapshot()}
        events.clear()
        scanner.set_port_config({})
        assert [(e.kind, e.port, e.info and e.info.label) for e in events] == [
            ("open", child.port, None)
        ]
    finally:
        release()


async def test_scanning_runs_only_while_held(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    scanner: PortScanner = await scanner_factory()
    assert not scanner.active and scanner.scans == 0
    first = scanner.hold()
    second = scanner.hold()
    await wait_for(lambda: scanner.scans >= 2)
    first()
    first()  # releasing twice counts once
    assert scanner.active
    second()
    assert not scanner.active
    assert scanner._loop_task is None
    # The state is stale now: the next snapshot scans again, silently.
    child = await start_listener("127.0.0.1")
    children.append(child)
    before = scanner.scans
    assert child.port in {info.port for info in await scanner.snapshot()}
    assert scanner.scans == before + 1
    assert opened(scanner, child.port) is None


async def test_proc_source_reports_the_same_ports(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    child = await start_listener("::1", family="6", flags="v6only")
    children.append(child)
    scanner: PortScanner = await scanner_factory(source="proc")
    assert scanner.source == "proc"
    info = next(i for i in await scanner.snapshot() if i.port == child.port)
    assert (info.address, info.local_only, info.pid) == ("::1", True, child.pid)


# -- kill -------------------------------------------------------------------------------


async def test_kill_sends_sigterm(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    child = await start_listener("127.0.0.1")
    children.append(child)
    scanner: PortScanner = await scanner_factory()
    release = scanner.hold()
    try:
        await scanner.snapshot()
        result = await scanner.kill(child.port)
        assert result == {"port": child.port, "pids": [child.pid]}
        assert await asyncio.wait_for(child.proc.wait(), 10) == -signal.SIGTERM
        await wait_for(lambda: closed(scanner, child.port))
    finally:
        release()


async def test_kill_escalates_to_sigkill_for_every_holder(
    children: list[Child], scanner_factory: Callable[..., Any], make_settings: Any
) -> None:
    child = await start_listener("127.0.0.1", flags="ignore-term,fork=2")
    children.append(child)
    scanner: PortScanner = await scanner_factory(
        make_settings(port_scan_interval=0.05, port_kill_grace=0.3)
    )
    await scanner.snapshot()
    result = await scanner.kill(child.port)
    assert child.pid in result["pids"] and len(result["pids"]) == 3
    assert await asyncio.wait_for(child.proc.wait(), 10) == -signal.SIGKILL
    # The forked children (not ours to reap) are gone too, or zombies of the parent's exit.
    deadline = time.monotonic() + 10
    for pid in result["pids"]:
        while proc_state(pid) not in (None, "Z") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"


async def test_kill_refuses_pid_1(
    children: list[Child], scanner_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """pid 1 cannot be made to listen here, so a copy of /proc says pid 1 holds the socket."""
    child = await start_listener("127.0.0.1")
    children.append(child)
    netlink = NetlinkListeners()
    try:
        inode = next(x.inode for x in netlink.read() if x.port == child.port)
    finally:
        netlink.close()
    fake = tmp_path / "proc"
    (fake / "1" / "fd").mkdir(parents=True)
    (fake / "1" / "fd" / "3").symlink_to(f"socket:[{inode}]")
    (fake / "1" / "cmdline").write_bytes(b"/sbin/init\0")
    (fake / "1" / "comm").write_text("init\n")
    scanner: PortScanner = await scanner_factory(proc_root=fake, source="netlink")
    info = next(i for i in await scanner.snapshot() if i.port == child.port)
    assert (info.pid, info.process, info.command) == (1, "init", "/sbin/init")
    with pytest.raises(AetherError) as err:
        await scanner.kill(child.port)
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    assert child.proc.returncode is None


async def test_kill_refuses_the_daemons_own_pid(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    """A scanner told that the listener's pid is its own refuses to kill it."""
    child = await start_listener("127.0.0.1")
    children.append(child)
    scanner: PortScanner = await scanner_factory(own_pid=child.pid)
    assert child.port not in {info.port for info in await scanner.snapshot()}
    with pytest.raises(AetherError) as err:
        await scanner.kill(child.port)
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    assert child.proc.returncode is None


def test_port_ignore_setting_rejects_bad_ports(make_settings: Any) -> None:
    with pytest.raises(ValueError):
        make_settings(port_ignore="80,70000")
    with pytest.raises(ValueError):
        make_settings(port_ignore="eighty")
    assert make_settings(port_ignore=[8080]).port_ignore == (8080,)


async def test_kill_of_a_port_that_closed_since_the_last_scan_is_not_found(
    children: list[Child], scanner_factory: Callable[..., Any], make_settings: Any
) -> None:
    child = await start_listener("127.0.0.1")
    children.append(child)
    # A scan interval long enough that no periodic scan runs during the test.
    scanner: PortScanner = await scanner_factory(make_settings(port_scan_interval=600))
    release = scanner.hold()
    try:
        assert child.port in {info.port for info in await scanner.snapshot()}
        await child.stop()
        assert scanner.get(child.port) is not None  # not rescanned yet
        with pytest.raises(AetherError) as err:
            await scanner.kill(child.port)
        assert err.value.code is ErrorCode.NOT_FOUND
        assert closed(scanner, child.port)  # the rescan told subscribers
    finally:
        release()


async def test_no_scanning_after_stop(scanner_factory: Callable[..., Any]) -> None:
    scanner: PortScanner = await scanner_factory()
    await scanner.stop()
    release = scanner.hold()
    assert scanner._loop_task is None
    release()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_start_and_stop_leave_no_fd_or_task_behind(
    children: list[Child], make_settings: Any
) -> None:
    child = await start_listener("127.0.0.1", flags="ignore-term")
    children.append(child)
    before_fds = open_fds()
    before_tasks = len(asyncio.all_tasks())
    scanner = PortScanner(make_settings(port_scan_interval=0.05, port_kill_grace=600))
    await scanner.start()
    assert scanner.source == "netlink"
    release = scanner.hold()
    await scanner.snapshot()
    await scanner.kill(child.port)  # leaves a pending SIGKILL escalation
    await scanner.stop()
    release()
    assert open_fds() <= before_fds
    assert len(asyncio.all_tasks()) == before_tasks
    assert child.proc.returncode is None  # stop cancelled the escalation, it sent nothing


async def test_tracked_ports_are_bounded(
    children: list[Child], scanner_factory: Callable[..., Any], make_settings: Any
) -> None:
    child = await start_listener("127.0.0.1", flags="many=5")
    children.append(child)
    scanner: PortScanner = await scanner_factory(make_settings(port_max_tracked=3))
    ports = await scanner.snapshot()
    assert 1 <= len(ports) <= 3
    assert len(scanner._tracked) == 3
    assert len({child.port, *child.extra} - set(scanner._tracked)) >= 3  # 6 listening


async def test_reuseport_owner_exit_moves_the_port_to_the_survivor(
    children: list[Child], scanner_factory: Callable[..., Any]
) -> None:
    first = await start_listener("127.0.0.1", flags="reuseport")
    children.append(first)
    second = await start_listener("127.0.0.1", port=first.port, flags="reuseport")
    children.append(second)
    scanner: PortScanner = await scanner_factory()
    release = scanner.hold()
    try:
        info = next(i for i in await scanner.snapshot() if i.port == first.port)
        owner, survivor = (first, second) if info.pid == first.pid else (second, first)
        await owner.stop()
        await wait_for(
            lambda: (
                (event := opened(scanner, first.port)) is not None
                and event.info is not None
                and event.info.pid == survivor.pid
            )
        )
        assert not closed(scanner, first.port)
    finally:
        release()
