"""Connection hygiene: header timeout, the pending-connection limit, quiet accept() errors."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from aetherd.transport.guard import RateLimited, fit_pending_limit
from tests.support import aetherd_command, child_env, free_port, healthz


def _half_open(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each send half a request line, then nothing."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /heal")
        socks.append(sock)
    return socks


def _wait_closed_by_server(socks: list[socket.socket], timeout: float) -> int:
    """How many of `socks` the server closed (EOF or reset) within `timeout`."""
    deadline = time.monotonic() + timeout
    closed: set[int] = set()
    for sock in socks:
        sock.setblocking(False)
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for index, sock in enumerate(socks):
            if index in closed:
                continue
            try:
                if sock.recv(4096) == b"":
                    closed.add(index)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(index)
        time.sleep(0.05)
    return len(closed)


async def test_half_open_connections_are_closed_after_the_header_timeout(start_daemon):
    running = await start_daemon(header_timeout=0.5)
    socks = await asyncio.to_thread(_half_open, running.server.port, 20)
    try:
        closed = await asyncio.to_thread(_wait_closed_by_server, socks, 15)
    finally:
        for sock in socks:
            sock.close()
    assert closed == 20
    # A client that finishes its request in time is served.
    assert await asyncio.to_thread(healthz, running.server.port, 5) == 200


async def test_an_open_websocket_outlives_the_header_timeout(start_daemon):
    running = await start_daemon(header_timeout=0.3)
    client = await running.connect()
    # The socket stays open and usable well past the header timeout.
    for _ in range(3):
        assert (await client.request("activity", "user_activity"))["success"] is True
        await asyncio.sleep(0.3)
    assert (await client.request("activity", "user_activity"))["success"] is True


def test_rate_limited_reports_once_per_interval_with_a_count():
    now = [0.0]
    limiter = RateLimited(10.0, clock=lambda: now[0])
    assert limiter.hit() == 1  # the first one is reported at once
    reports = []
    for _ in range(1000):
        now[0] += 0.001
        reports.append(limiter.hit())
    assert reports == [None] * 1000
    now[0] = 10.5
    assert limiter.hit() == 1001
    assert limiter.total == 1002


def test_the_pending_limit_fits_a_low_descriptor_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fit_pending_limit(5) <= 5
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        assert fit_pending_limit(1000) < 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _limit_fds(count: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return apply


@pytest.mark.slow
def test_low_ulimit_half_open_flood_keeps_healthz_and_a_small_log(tmp_path: Path):
    """Under `ulimit -n 64`, 100 half-open sockets: /healthz still answers (the oldest
    pending connections are closed), and failed accept() calls do not flood the log."""
    port = free_port()
    root = tmp_path / "ws"
    root.mkdir()
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                *aetherd_command(),
                "serve",
                "--port",
                str(port),
                "--root",
                str(root),
                "--data-dir",
                str(tmp_path / "data"),
                "--token",
                "guard-test-token",
                "--watcher-enabled",
                "false",
                "--log-format",
                "json",
                # Long, so that only the pending limit can explain the recovery.
                "--header-timeout",
                "120",
            ],
            env=child_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=_limit_fds(64),
        )
    socks: list[socket.socket] = []
    try:
        assert healthz(port, 20) == 200
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                break
            sock.sendall(b"GET /heal")
            socks.append(sock)
        assert len(socks) == 100
        # The flood is under way: accept() has failed, then room was made.
        assert healthz(port, 30) == 200
        closed_by_server = _wait_closed_by_server(socks, 10)
        assert closed_by_server >= 50
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line and not line.startswith("#")
        }
        assert values["aetherd_accept_errors_total"] >= 1
        assert values["aetherd_pending_connections_closed_total"] >= 50
        assert 1 <= values["aetherd_pending_connections"] < 64
        for sock in socks:
            sock.close()
        socks.clear()
        assert healthz(port, 10) == 200
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(15)
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any(r["logger"] == "aetherd.guard" for r in records)
    assert not any("exc" in r for r in records), "a traceback reached the log"
    assert not any(r["level"] == "error" for r in records)
    # Without the guard: thousands of lines (one traceback per failed accept()).
    assert len(lines) < 60, lines[:20]
