"""systemd integration: sd_notify over a real datagram socket, socket activation, unit files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aetherd import systemd
from tests.support import REPO, child_env

WAIT = 20.0


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(WAIT)
    yield sock, str(path)
    sock.close()


def test_notify_sends_a_datagram(notify_socket):
    sock, path = notify_socket
    assert systemd.notify("READY=1\nSTATUS=hi", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=hi"


def test_notify_abstract_namespace():
    name = f"aetherd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_notify_without_a_manager_is_a_no_op(tmp_path: Path):
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False


def test_watchdog_interval():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert (
        systemd.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
        == 1.0
    )
    assert systemd.watchdog_interval({}) is None


def _recv_until(sock: socket.socket, wanted: str, seen: list[str]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message:
            return
    raise TimeoutError(f"no {wanted!r}; saw {seen}")


def _http_get(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.slow
def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path, notify_socket):
    sock, path = notify_socket
    env = child_env(tmp_path, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aetherd", "serve", "--port", "0", "--token", "t0k3n-for-test"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen: list[str] = []
        _recv_until(sock, "READY=1", seen)
        _recv_until(sock, "WATCHDOG=1", seen)
        _recv_until(sock, "WATCHDOG=1", seen)  # repeated from the loop
        proc.send_signal(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1", seen)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def _start_with_socket(tmp_path: Path, listener: socket.socket) -> subprocess.Popen:
    fd = listener.fileno()

    def as_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    # LISTEN_PID must be the daemon's own pid: the shell exports its pid, then execs.
    return subprocess.Popen(
        [
            "sh",
            "-c",
            'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "aetherd",
            "serve",
            "--port",
            "1",
            "--token",
            "t0k3n-for-test",
        ],
        cwd=tmp_path,
        env=child_env(tmp_path),
        preexec_fn=as_fd3,
        close_fds=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_socket_activation_holds_the_port_across_restarts(tmp_path: Path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    first = _start_with_socket(tmp_path, listener)
    try:
        # --port 1 would fail to bind: answering proves the inherited socket is used.
        # The kernel queues the request on the held socket until the daemon serves it.
        assert "200 OK" in _http_get(port, "/readyz")
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(WAIT) == 0
        # The daemon is down, but the port is still held: a client connects and waits...
        pending = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        pending.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = _start_with_socket(tmp_path, listener)
        try:
            # ...and is answered by the restarted daemon.
            reply = pending.recv(65536).decode()
            assert "200 OK" in reply and '"status": "ok"' in reply.replace('":"', '": "')
        finally:
            pending.close()
            second.send_signal(signal.SIGTERM)
            assert second.wait(WAIT) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(5)
        listener.close()


def test_units_pass_systemd_analyze_verify(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is required (Debian package systemd; .ci/run installs it)"
    python = sys.executable
    for name in ("aetherd.service", "aetherd.socket"):
        text = (REPO / "systemd" / name).read_text()
        # The image installs to /opt/aetherd; here, point at this interpreter instead.
        (tmp_path / name).write_text(
            text.replace("/opt/aetherd/bin/aetherd", f"{python} -m aetherd")
        )
    result = subprocess.run(
        [tool, "verify", str(tmp_path / "aetherd.socket"), str(tmp_path / "aetherd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    service = (REPO / "systemd" / "aetherd.service").read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "OOMScoreAdjust=",
        "User=",
        "Environment=",
    ):
        assert directive in service
