"""Two daemons behind real nginx, configured exactly as docs/operations.md shows."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support import REPO, child_env, connect, free_port

pytestmark = pytest.mark.slow
WAIT = 30.0
PREVIEW_HOST = "{port}-{workspacePrefix}.preview.example.com"


def documented_nginx_config() -> str:
    """The ```nginx block of docs/operations.md."""
    text = (REPO / "docs" / "operations.md").read_text()
    match = re.search(r"```nginx\n(.*?)```", text, re.DOTALL)
    assert match, "docs/operations.md has no nginx block"
    return match.group(1)


@dataclass
class DaemonProcess:
    workspace_id: str
    token: str
    port: int
    root: Path
    data_dir: Path
    tmp: Path
    proc: subprocess.Popen | None = None
    extra: tuple[str, ...] = ("--preview-host", PREVIEW_HOST)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aetherd",
                "serve",
                "--port",
                str(self.port),
                "--workspace-id",
                self.workspace_id,
                "--token",
                self.token,
                "--root",
                str(self.root),
                "--data-dir",
                str(self.data_dir),
                *self.extra,
            ],
            env=child_env(self.tmp),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, "daemon exited"
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.workspace_id} never became ready")


@dataclass
class Proxy:
    port: int
    a: DaemonProcess
    b: DaemonProcess
    prefix: Path

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
def nginx_binary() -> Iterator[str]:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    assert binary, "nginx is required (Debian package nginx; .ci/run installs it)"
    yield binary


@pytest.fixture
async def proxy(tmp_path: Path, nginx_binary: str) -> AsyncIterator[Proxy]:
    daemons = []
    for name in ("a", "b"):
        root = tmp_path / f"root-{name}"
        root.mkdir()
        daemons.append(
            DaemonProcess(
                f"ws-{name}",
                f"token-{name}-0123456789",
                free_port(),
                root,
                tmp_path / f"data-{name}",
                tmp_path,
            )
        )
    for daemon in daemons:
        daemon.start()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    config = (
        documented_nginx_config()
        .replace("NGINX_PREFIX", str(prefix))
        .replace("LISTEN_ADDRESS", f"127.0.0.1:{port}")
        .replace("WORKSPACE_A", "ws-a")
        .replace("UPSTREAM_A", f"127.0.0.1:{daemons[0].port}")
        .replace("WORKSPACE_B", "ws-b")
        .replace("UPSTREAM_B", f"127.0.0.1:{daemons[1].port}")
    )
    if os.geteuid() == 0:
        # As root, workers would drop to `nobody`, who cannot reach pytest's 0700 tmp dirs.
        config = "user root;\n" + config
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    nginx = subprocess.Popen(
        [
            nginx_binary,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for daemon in daemons:
            await daemon.wait_ready()
        deadline = time.monotonic() + WAIT
        while True:
            assert nginx.poll() is None, nginx.stderr.read().decode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nginx never listened"
                await asyncio.sleep(0.05)
        yield Proxy(port, daemons[0], daemons[1], prefix)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(WAIT)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait(5)
        nginx.stderr.close()
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()


async def _get_json(url: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_each_workspace_id_reaches_its_own_daemon(proxy: Proxy):
    for daemon in (proxy.a, proxy.b):
        status, body = await _get_json(
            proxy.url(f"/workspaces/{daemon.workspace_id}/info"), params={"token": daemon.token}
        )
        assert status == 200 and body["workspaceId"] == daemon.workspace_id
    # A's token is not B's.
    status, body = await _get_json(
        proxy.url("/workspaces/ws-b/info"), params={"token": proxy.a.token}
    )
    assert status == 401 and body == {"error": "Unauthorized"}
    status, body = await _get_json(
        proxy.url("/workspaces/ws-nope/info"), params={"token": proxy.a.token}
    )
    assert status == 404 and body == {"error": "Workspace not found"}
    # The access log never holds a token.
    log = (proxy.prefix / "access.log").read_text()
    assert "/workspaces/ws-b/info" in log and "token-" not in log


async def test_websocket_auth_and_subprotocol_pass_through(proxy: Proxy):
    url = proxy.url("/workspaces/ws-a/ws", "ws")
    client = await connect(url, None, protocols=("Bearer", proxy.a.token))
    try:
        assert client.ws.protocol == "Bearer"  # the 101 selected the scheme word, through nginx
        assert (await client.request("activity", "user_activity"))["success"] is True
    finally:
        await client.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(url, None, protocols=("Bearer", "bad"))
    assert info.value.status == 401


async def test_a_daemon_restart_is_survived_by_reconnecting(proxy: Proxy):
    url = proxy.url("/workspaces/ws-a/ws", "ws")
    client = await connect(url, proxy.a.token)
    try:
        assert (await client.request("activity", "user_activity"))["success"] is True
        proxy.a.proc.send_signal(signal.SIGTERM)
        msg = await client.ws.receive(timeout=WAIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
    finally:
        await client.close()
    assert proxy.a.proc.wait(WAIT) == 0
    proxy.a.start()
    # Reconnect with bounded retries, as a client would (nginx answers 502 meanwhile).
    deadline = time.monotonic() + WAIT
    while True:
        try:
            client = await connect(url, proxy.a.token)
            break
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 502 and time.monotonic() < deadline
            await asyncio.sleep(0.1)
    try:
        assert (await client.request("activity", "user_activity"))["success"] is True
    finally:
        await client.close()
    # The other workspace never noticed.
    status, _ = await _get_json(proxy.url("/workspaces/ws-b/info"), params={"token": proxy.b.token})
    assert status == 200


async def test_large_file_transfer_through_the_proxy(proxy: Proxy, tmp_path: Path):
    size = 64 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    url = proxy.url("/workspaces/ws-b/files/content")
    auth = {"Authorization": f"Bearer {proxy.b.token}"}
    async with aiohttp.ClientSession() as session:
        async with session.put(url, params={"path": "/big.bin"}, data=body(), headers=auth) as resp:
            assert resp.status in (200, 201), await resp.text()
        assert (proxy.b.root / "big.bin").stat().st_size == size
        assert not (proxy.a.root / "big.bin").exists()  # it went to B only
        hasher = hashlib.sha256()
        async with session.get(url, params={"path": "/big.bin"}, headers=auth) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == size
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                hasher.update(chunk)
        assert hasher.hexdigest() == digest
        headers = {**auth, "Range": "bytes=1048576-1048585"}
        async with session.get(url, params={"path": "/big.bin"}, headers=headers) as resp:
            assert resp.status == 206
            assert await resp.read() == block[:10]


async def test_terminal_streaming_through_the_proxy(proxy: Proxy):
    client = await connect(proxy.url("/workspaces/ws-a/ws", "ws"), proxy.a.token)
    try:
        reply = await client.request(
            "terminal",
            "create",
            sessionId="proxied",
            command="head -c 3000000 /dev/zero | tr '\\0' y; echo; echo STREAM_''END",
        )
        assert reply["success"] is True
        received, offset, tail = 0, None, ""
        for _ in range(10_000):
            frame = await client.expect(
                lambda f: f.get("sessionId") == "proxied" and f.get("type") in ("output", "close")
            )
            if frame["type"] == "close":
                break
            assert offset is None or frame["offset"] == offset  # no gap, no duplicate
            offset = frame["offset"] + len(frame["data"].encode())
            received += frame["data"].count("y")
            tail = (tail + frame["data"])[-4096:]
        assert frame["type"] == "close" and frame["exitCode"] == 0
        assert received == 3_000_000 and "STREAM_END" in tail
    finally:
        await client.close()


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    """A workspace app on 127.0.0.1: echoes requests, and a WebSocket echo."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body": (await request.read()).decode(),
            }
        )

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("app-proto",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_route("*", "/{tail:.*}", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server.port
    finally:
        await server.close()


async def test_a_workspace_port_through_nginx_path_form(proxy: Proxy, app_port: int):
    base = proxy.url(f"/workspaces/ws-a/ports/{app_port}")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(f"{base}/page?x=1") as resp:
            assert resp.status == 401
        # B's token does not open A's ports.
        async with session.get(f"{base}/page?x=1&token={proxy.b.token}") as resp:
            assert resp.status == 401
        async with session.get(
            f"{base}/page?x=1&token={proxy.a.token}", allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"/workspaces/ws-a/ports/{app_port}/page?x=1"
        async with session.post(f"{base}/page?x=1", data=b"posted") as resp:  # the cookie now
            assert resp.status == 200
            echoed = await resp.json()
        assert echoed["path"] == "/page?x=1" and echoed["body"] == "posted"
        assert echoed["headers"]["Host"] == f"localhost:{app_port}"
        assert echoed["headers"]["X-Forwarded-Prefix"] == f"/workspaces/ws-a/ports/{app_port}"
        assert echoed["headers"]["X-Forwarded-For"] == "127.0.0.1, 127.0.0.1"  # client, nginx
        assert "aetherd_preview" not in echoed["headers"].get("Cookie", "")
        ws_url = proxy.url(f"/workspaces/ws-a/ports/{app_port}/ws", "ws")
        async with session.ws_connect(ws_url, protocols=("app-proto",)) as ws:
            assert ws.protocol == "app-proto"
            await ws.send_str("through nginx")
            assert (await ws.receive(timeout=WAIT)).data == "echo:through nginx"
    log = (proxy.prefix / "access.log").read_text()
    assert f"/workspaces/ws-a/ports/{app_port}/page" in log and "token-" not in log


async def test_a_workspace_port_through_nginx_host_form(proxy: Proxy, app_port: int):
    host = f"{app_port}-ws-a.preview.example.com"
    async with aiohttp.ClientSession() as session:
        headers = {"Host": host}
        async with session.get(
            proxy.url(f"/root?token={proxy.a.token}"), headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/root"
            cookie = resp.cookies["aetherd_preview"].value
        headers["Cookie"] = f"aetherd_preview={cookie}"
        async with session.get(proxy.url("/root"), headers=headers) as resp:
            assert resp.status == 200
            echoed = await resp.json()
        assert echoed["path"] == "/root"
        assert echoed["headers"]["X-Forwarded-Host"] == host
        assert "X-Forwarded-Prefix" not in echoed["headers"]
        # A workspace prefix the gateway does not know.
        async with session.get(
            proxy.url("/"), headers={"Host": f"{app_port}-nope.preview.example.com"}
        ) as resp:
            assert resp.status == 404


async def test_nginx_error_log_keeps_tokens_out_while_a_daemon_is_down(proxy: Proxy, app_port: int):
    assert proxy.a.stop() == 0
    async with aiohttp.ClientSession() as session:
        for path in (
            f"/workspaces/ws-a/ports/{app_port}/",
            "/workspaces/ws-a/info",
            "/workspaces/ws-a/ws",
        ):
            async with session.get(proxy.url(f"{path}?token={proxy.a.token}")) as resp:
                assert resp.status == 502
        async with session.get(
            proxy.url(f"/?token={proxy.a.token}"),
            headers={"Host": f"{app_port}-ws-a.preview.example.com"},
        ) as resp:
            assert resp.status == 502
    errors = (proxy.prefix / "error.log").read_text()
    assert proxy.a.token not in errors
