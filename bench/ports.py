"""Ports benchmark: detection latency, and the idle cost of scanning.

Runs a real daemon (`python -m aetherd serve`) in a child process and a real
WebSocket client here.

1. Detection latency: 50 cycles of listen() → `ports/open` at the client, and
   close() → `ports/close`, on a socket of this (benchmark) process.
2. Idle cost: the daemon's CPU use, as a percentage of one core, with one client
   connected and 200 unrelated `sleep` processes running, for each socket source
   (netlink sock_diag, /proc/net/tcp), against no client (no scanning), and against
   the reference: a process calling psutil.net_connections("tcp") at the same interval.

Usage: python -m bench.ports [--cycles 50] [--idle-seconds 20] [--interval 0.5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from aetherd.services.ports import NetlinkListeners, read_proc_listeners, socket_owners
from bench.support import Daemon, cpu_seconds, percentile


async def wait_frame(ws: aiohttp.ClientWebSocketResponse, kind: str, port: int) -> float:
    """Read until `ports/<kind>` for `port`; the arrival time."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"socket ended: {msg.type}")
        frame = json.loads(msg.data)
        if frame.get("channel") == "ports" and frame.get("type") == kind and frame["port"] == port:
            return time.perf_counter()


async def latency(daemon: Daemon, cycles: int, interval: float) -> dict[str, list[float]]:
    """listen()/close() at a random phase of the scan cycle (the loop would otherwise
    lock onto the scanner: each step starts just after the scan that reported the last)."""
    rng = random.Random(5)
    opens: list[float] = []
    closes: list[float] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(daemon.ws_url) as ws:
        for _ in range(cycles):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            await asyncio.sleep(rng.uniform(0, interval))
            start = time.perf_counter()
            sock.listen(8)
            opens.append(await wait_frame(ws, "open", port) - start)
            await asyncio.sleep(rng.uniform(0, interval))
            start = time.perf_counter()
            sock.close()
            closes.append(await wait_frame(ws, "close", port) - start)
    return {"open": opens, "close": closes}


async def daemon_idle_cpu(daemon: Daemon, seconds: float, connected: bool, settle: float) -> float:
    """The daemon's CPU use in % of one core over `seconds`, after `settle` seconds."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(daemon.ws_url) if connected else None
        await asyncio.sleep(settle)  # let the connect-time announce settle
        before, started = cpu_seconds(daemon.pid), time.monotonic()
        await asyncio.sleep(seconds)
        used, elapsed = cpu_seconds(daemon.pid) - before, time.monotonic() - started
        if ws is not None:
            await ws.close()
    return 100 * used / elapsed


REFERENCE = """
import sys, time, psutil
interval, seconds, settle = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
psutil.net_connections("tcp")  # import and first call outside the window
time.sleep(settle)
t0 = time.process_time(); w0 = time.monotonic()
while time.monotonic() - w0 < seconds:
    psutil.net_connections("tcp")
    time.sleep(interval)
print(100 * (time.process_time() - t0) / (time.monotonic() - w0))
"""


def reference_cpu(interval: float, seconds: float, settle: float) -> float:
    """psutil.net_connections('tcp') every `interval`: CPU in % of one core."""
    out = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(interval), str(seconds), str(settle)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def scan_costs(repeats: int) -> dict[str, tuple[float, float]]:
    """Milliseconds per call of each way of listing listening sockets, in this process:
    (wall, CPU). The CPU time (user + system, most of it the kernel's) is what a scan
    costs the machine, and it depends far less on the neighbours' load than the wall."""
    netlink = NetlinkListeners()
    costs: dict[str, tuple[float, float]] = {}
    try:
        for name, func in (
            ("netlink sock_diag (LISTEN only)", netlink.read),
            ("/proc/net/tcp + tcp6, parsed", read_proc_listeners),
            ("psutil.net_connections('tcp')", lambda: psutil.net_connections("tcp")),
        ):
            func()
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                func()
            wall = (time.perf_counter() - start) / repeats * 1000
            costs[name] = (wall, (time.process_time() - cpu) / repeats * 1000)
    finally:
        netlink.close()
    return costs


def lookup_cost(repeats: int) -> float:
    """Milliseconds for one inode → pid lookup over every process (the new-port path)."""
    start = time.perf_counter()
    for _ in range(repeats):
        socket_owners([1], first_only=False)  # an inode nobody holds: a full walk
    return (time.perf_counter() - start) / repeats * 1000


def start_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` unrelated processes that do nothing."""
    return [subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL) for _ in range(count)]


def start_daemon(workdir: Path, *extra: str) -> Daemon:
    """A daemon on `workdir` (also its HOME), ready."""
    log = ("--log-format", "text", "--log-level", "info")
    daemon = Daemon(workdir, workdir / "data", *log, *extra, home=workdir)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    return daemon


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--sleepers", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=200, help="calls timed per way of scanning")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before a window")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.cycles, args.idle_seconds, args.interval = 3, 0.3, 0.2
        args.sleepers, args.repeats, args.settle = 5, 10, 0.1

    workdir = Path(tempfile.mkdtemp(prefix="aetherd-bench-ports-"))
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        interval = ["--port-scan-interval", str(args.interval)]
        daemon = await asyncio.to_thread(start_daemon, workdir, *interval)
        try:
            result = await latency(daemon, args.cycles, args.interval)
        finally:
            daemon.stop()
        print(f"## Detection latency ({args.cycles} cycles, scan interval {args.interval} s)")
        print("| event | p50 | p99 | max |")
        print("|---|---|---|---|")
        labels = {"open": "listen() → `open`", "close": "close() → `close`"}
        for kind, values in result.items():
            ms = [v * 1000 for v in values]
            print(
                f"| {labels[kind]} | {percentile(ms, 0.5):.0f} ms | "
                f"{percentile(ms, 0.99):.0f} ms | {max(ms):.0f} ms |"
            )

        sleepers = start_sleepers(args.sleepers)
        processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
        print()
        print(
            f"## Idle cost ({args.idle_seconds:.0f} s windows, interval {args.interval} s, "
            f"{args.sleepers} sleep processes, {processes} processes in all)"
        )
        print("| what | CPU, % of one core |")
        print("|---|---|")
        rows: list[tuple[str, float]] = []
        for label, extra, connected in (
            ("daemon, no client (scanning skipped)", [], False),
            ("daemon, one client, netlink source (default)", [], True),
            ("daemon, one client, /proc/net/tcp source", ["--port-scan-source", "proc"], True),
        ):
            daemon = await asyncio.to_thread(start_daemon, workdir, *interval, *extra)
            try:
                rows.append(
                    (
                        label,
                        await daemon_idle_cpu(daemon, args.idle_seconds, connected, args.settle),
                    )
                )
            finally:
                daemon.stop()
        rows.append(
            (
                "reference: psutil.net_connections('tcp') alone",
                reference_cpu(args.interval, args.idle_seconds, args.settle),
            )
        )
        for label, value in rows:
            print(f"| {label} | {value:.2f} % |")

        print()
        print(f"## One call, in milliseconds ({args.repeats} repeats, same machine)")
        print("| call | ms (wall) | ms (CPU) |")
        print("|---|---|---|")
        for name, (wall, cpu) in scan_costs(args.repeats).items():
            print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
        lookups = max(1, args.repeats // 10)
        print(f"| inode → pid lookup, full walk of /proc/*/fd | {lookup_cost(lookups):.2f} | |")
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
