"""Ports benchmark: detection latency, and the idle cost of scanning.

Runs a real daemon (`python -m aetherd serve`) in a child process and a real
WebSocket client here.

1. Detection latency: 50 cycles of listen() → `ports/open` at the client, and
   close() → `ports/close`, on a socket of this (benchmark) process.
2. Idle cost: the daemon's CPU use, as a percentage of one core, with one client
   connected and 200 unrelated `sleep` processes running, for each socket source
   (netlink sock_diag, /proc/net/tcp), against no client (no scanning), and against
   the reference: a process calling psutil.net_connections("tcp") at the same interval.

Usage: python bench/ports.py [--cycles 50] [--idle-seconds 20] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


class Daemon:
    """`python -m aetherd serve` on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(workdir)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aetherd",
                "serve",
                "--port",
                "0",
                "--token",
                TOKEN,
                "--root",
                str(workdir),
                "--data-dir",
                str(workdir / "data"),
                "--log-format",
                "text",
                "--log-level",
                "info",
                *extra,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = 0
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            found = re.search(r"listening on http://[^ ]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        if not self.port:
            self.stop()
            raise RuntimeError("the daemon did not start")
        # Keep draining stderr so the daemon never blocks on a full pipe.
        threading.Thread(target=self._read_rest, daemon=True).start()

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    @property
    def ws_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/workspaces/local/ws?token={TOKEN}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


async def daemon_idle_cpu(daemon: Daemon, seconds: float, connected: bool) -> float:
    """The daemon's CPU use in % of one core over `seconds`."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(daemon.ws_url) if connected else None
        await asyncio.sleep(1.0)  # let the connect-time announce settle
        before, started = cpu_seconds(daemon.proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        used, elapsed = cpu_seconds(daemon.proc.pid) - before, time.monotonic() - started
        if ws is not None:
            await ws.close()
    return 100 * used / elapsed


REFERENCE = """
import sys, time, psutil
interval, seconds = float(sys.argv[1]), float(sys.argv[2])
psutil.net_connections("tcp")  # import and first call outside the window
time.sleep(1.0)
t0 = time.process_time(); w0 = time.monotonic()
while time.monotonic() - w0 < seconds:
    psutil.net_connections("tcp")
    time.sleep(interval)
print(100 * (time.process_time() - t0) / (time.monotonic() - w0))
"""


def reference_cpu(interval: float, seconds: float) -> float:
    """psutil.net_connections('tcp') every `interval`: CPU in % of one core."""
    out = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(interval), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def scan_costs(repeats: int = 200) -> dict[str, float]:
    """Milliseconds per call of each way of listing listening sockets, in this process."""
    sys.path.insert(0, str(ROOT))
    import psutil

    from aetherd.services.ports import NetlinkListeners, read_proc_listeners

    netlink = NetlinkListeners()
    costs: dict[str, float] = {}
    try:
        for name, func in (
            ("netlink sock_diag (LISTEN only)", netlink.read),
            ("/proc/net/tcp + tcp6, parsed", read_proc_listeners),
            ("psutil.net_connections('tcp')", lambda: psutil.net_connections("tcp")),
        ):
            func()
            start = time.perf_counter()
            for _ in range(repeats):
                func()
            costs[name] = (time.perf_counter() - start) / repeats * 1000
    finally:
        netlink.close()
    return costs


def lookup_cost(repeats: int = 20) -> float:
    """Milliseconds for one inode → pid lookup over every process (the new-port path)."""
    from aetherd.services.ports import socket_owners

    start = time.perf_counter()
    for _ in range(repeats):
        socket_owners([1], first_only=False)  # an inode nobody holds: a full walk
    return (time.perf_counter() - start) / repeats * 1000


def start_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` unrelated processes that do nothing."""
    return [subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL) for _ in range(count)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--sleepers", type=int, default=200)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="aetherd-bench-ports-"))
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        interval = ["--port-scan-interval", str(args.interval)]
        daemon = Daemon(workdir, *interval)
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
                f"| {labels[kind]} | {percentile(ms, 50):.0f} ms | "
                f"{percentile(ms, 99):.0f} ms | {max(ms):.0f} ms |"
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
            daemon = Daemon(workdir, *interval, *extra)
            try:
                rows.append((label, await daemon_idle_cpu(daemon, args.idle_seconds, connected)))
            finally:
                daemon.stop()
        rows.append(
            (
                "reference: psutil.net_connections('tcp') alone",
                reference_cpu(args.interval, args.idle_seconds),
            )
        )
        for label, value in rows:
            print(f"| {label} | {value:.2f} % |")

        print()
        print("## One call, in milliseconds (200 repeats, same machine)")
        print("| call | ms |")
        print("|---|---|")
        for name, ms in scan_costs().items():
            print(f"| {name} | {ms:.3f} |")
        print(f"| inode → pid lookup, full walk of /proc/*/fd | {lookup_cost():.2f} |")
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
