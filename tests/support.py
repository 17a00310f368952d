"""Test helpers: a WebSocket client that waits for markers, a raw WebSocket for abuse, and
the daemon as a real process (`aetherd serve`: its command, environment, port and readiness).

No pytest here: `bench/` imports this module too."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[1]


class WsClient:
    """A real WebSocket client that keeps frames it was not waiting for.

    `expect(pred)` reads until a frame matches, bounded by a timeout, and keeps the
    others in a backlog for later `expect` calls, so tests never depend on the order
    of unrelated pushes.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        self.ws = ws
        self.session = session
        self.backlog: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        """Send one frame (a dict is JSON-encoded)."""
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def _read(self, timeout: float) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            return json.loads(msg.data)
        raise ConnectionError(f"socket ended: {msg.type!r} {msg.data!r} {msg.extra!r}")

    async def expect(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """The first frame (backlog first) for which `pred` is true."""
        for index, frame in enumerate(self.backlog):
            if pred(frame):
                return self.backlog.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no matching frame within {timeout}s; backlog={self.backlog[-5:]}"
                )
            frame = await self._read(remaining)
            if pred(frame):
                return frame
            self.backlog.append(frame)
            if len(self.backlog) > 100_000:
                raise AssertionError("backlog overflow while waiting")

    async def expect_type(
        self, channel: str, type_: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """The first frame of `channel`/`type_` whose fields include `fields`."""
        return await self.expect(
            lambda f: (
                f.get("channel") == channel
                and f.get("type") == type_
                and all(f.get(k) == v for k, v in fields.items())
            ),
            timeout,
        )

    async def request(
        self, channel: str, type_: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """Send a frame with a fresh requestId and return its reply."""
        request_id = uuid.uuid4().hex
        await self.send({"channel": channel, "type": type_, "requestId": request_id, **fields})
        return await self.expect(lambda f: f.get("requestId") == request_id, timeout)

    async def close(self) -> None:
        """Close the socket and its session."""
        await self.ws.close()
        await self.session.close()


async def connect(url: str, token: str | None = None, **kwargs: Any) -> WsClient:
    """Open a WebSocket to `url`, passing `token` as `?token=` when given."""
    session = aiohttp.ClientSession()
    params = {"token": token} if token is not None else None
    try:
        ws = await session.ws_connect(url, params=params, **kwargs)
    except BaseException:
        await session.close()
        raise
    return WsClient(ws, session)


class RawWebSocket:
    """A hand-rolled WebSocket client on a plain socket: it can stop reading entirely."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in head and time.monotonic() < deadline:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        self.status_line = head.split(b"\r\n", 1)[0].decode()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def send_text(self, text: str) -> None:
        """Send one masked text frame."""
        payload = text.encode()
        header = bytearray([0x81])
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 65536:
            header.append(0x80 | 126)
            header += struct.pack("!H", length)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", length)
        mask = os.urandom(4)
        header += mask
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            length, "big"
        )
        self.sock.sendall(bytes(header) + masked)

    def send_many(self, text: str, count: int) -> int:
        """Send `text` up to `count` times (blocking; run it in a thread); stop when dropped."""
        for sent in range(count):
            try:
                self.send_text(text)
            except OSError:
                return sent
        return count

    def close(self) -> None:
        """Drop the socket."""
        self.sock.close()


async def wait_for(
    predicate: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02
) -> None:
    """Poll `predicate` until true, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def small_send_queue(frames: int = 16) -> int:
    """A tiny `send_queue_frames` that still holds what a daemon pushes on connect.

    The ports channel pushes one `ports/open` per port listening on the machine, all at
    once when a socket opens, so a queue of 16 overflows on a host running more than 16
    servers (it did, with benchmarks left running): add one frame per listening port.
    """
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                listening.add(fields[1].rsplit(":", 1)[1])
    return frames + len(listening)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a child to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def aetherd_command() -> list[str]:
    """The installed console script when present, else `python -m aetherd`."""
    script = shutil.which("aetherd", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "aetherd"]


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHERD_")}
    # Run this checkout's code, even through an installed console script.
    # (No empty entry: it would put the child's working directory on its sys.path.)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env.update(extra)
    return env


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*aetherd_command(), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=child_env(tmp_path, **env),
    )


async def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Poll /readyz until 200; the process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "daemon exited early"
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("daemon never became ready")


def read_port(proc: subprocess.Popen, timeout: float = 20) -> tuple[int, list[str]]:
    """Read JSON log lines from stderr until the `listening` line gives the port."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        entry = json.loads(line)
        if entry["msg"].startswith("listening on"):
            return entry["port"], lines
    raise TimeoutError(f"no listening line; got {lines}")


def healthz(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> int | None:
    """The status of GET /healthz, retried until `timeout`; None if it never answered.
    With `proc`, the daemon process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            assert proc.poll() is None, "daemon exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return int(resp.status)
        except OSError:
            time.sleep(0.1)
    return None
