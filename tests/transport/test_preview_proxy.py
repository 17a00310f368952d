"""The preview proxy (section 13) against real aiohttp upstream servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.conftest import TOKEN
from tests.support import free_port

MiB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set (the daemon, the upstream and the client all live here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Upstream:
    """A real aiohttp server standing in for a dev server; records what it received."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=1024**3)
        self.seen: list[dict[str, Any]] = []
        self.events: dict[str, asyncio.Event] = {}
        self.server: TestServer | None = None
        self.ws_closes: list[tuple[int | None, str]] = []
        self.ws_protocols: list[list[str]] = []
        self.app.router.add_route("*", "/echo{tail:.*}", self.echo)
        self.app.router.add_get("/redirect", self.redirect)
        self.app.router.add_get("/cookies", self.cookies)
        self.app.router.add_get("/sse", self.sse)
        self.app.router.add_get("/download", self.download)
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_get("/hang", self.hang)
        self.app.router.add_get("/broken", self.broken)
        self.app.router.add_get("/ws", self.websocket)

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        self.seen.append(record)
        return web.json_response(
            record, headers={"Connection": "keep-alive, X-Hop-Back", "X-Hop-Back": "1"}
        )

    async def redirect(self, request: web.Request) -> web.Response:
        target = request.query["to"].replace("PORT", str(self.port))
        return web.Response(status=302, headers={"Location": target})

    async def cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "b=2; Path=/app; Domain=localhost")
        response.headers.add("Set-Cookie", "c=3")
        return response

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.wait_for(self.event("sse-second").wait(), 10)
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        chunked = request.query.get("chunked") == "1"
        response = web.StreamResponse()
        if not chunked:
            response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        hasher = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            hasher.update(chunk)
            total += len(chunk)
        return web.json_response(
            {
                "size": total,
                "sha256": hasher.hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
                "contentLength": request.headers.get("Content-Length"),
            }
        )

    async def hang(self, request: web.Request) -> web.Response:
        self.event("hang-entered").set()
        await asyncio.wait_for(self.event("hang-release").wait(), 30)
        return web.Response(text="released")

    async def broken(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if request.query.get("chunked") != "1":
            response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        offered = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        self.ws_protocols.append(offered)
        ws = web.WebSocketResponse(protocols=("vite-hmr", "chat"))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"bye from upstream")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.ws_closes.append((ws.close_code, ""))
        self.event("ws-closed").set()
        return ws


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = TestServer(up.app, host="127.0.0.1")
    await up.server.start_server()
    yield up
    for event in up.events.values():
        event.set()
    await up.server.close()


def port_url(running, port: int, path: str = "/") -> str:
    """The path-form URL; the query string is kept byte for byte."""
    path, sep, query = path.partition("?")
    base = running.url(f"/workspaces/{running.settings.workspace_id}/ports/{port}{path}")
    return base + sep + query


def headers_of(record: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in record["headers"]:
        out.setdefault(key.lower(), []).append(value)
    return out


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- Methods, query string, headers --------------------------------------------------------


async def test_every_method_and_the_query_string_pass_through(daemon, upstream):
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            url = port_url(daemon, upstream.port, "/echo/a%20b/c?x=1&y=%2F&x=2")
            async with http.request(
                method,
                URL(url, encoded=True),
                headers=AUTH,
                data=b"payload" if method in ("POST", "PUT", "PATCH") else None,
            ) as resp:
                assert resp.status == 200, await resp.text()
                record = await resp.json()
            assert record["method"] == method
            assert record["path_qs"] == "/echo/a%20b/c?x=1&y=%2F&x=2"
            if method in ("POST", "PUT", "PATCH"):
                assert record["body"] == "payload"
        async with http.head(port_url(daemon, upstream.port, "/echo"), headers=AUTH) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""


async def test_headers_are_rewritten_and_the_daemon_credentials_stay_behind(daemon, upstream):
    async with aiohttp.ClientSession() as http:
        # Get the preview cookie first, then use it with the app's own credentials.
        url = port_url(daemon, upstream.port, "/echo?keep=1")
        async with http.get(url + f"&token={TOKEN}", allow_redirects=False) as resp:
            assert resp.status == 302
            cookie = resp.cookies["aetherd_preview"].value
        headers = {
            "Cookie": f"app=1; aetherd_preview={cookie}; other=2",
            "Authorization": "Basic dXNlcjpwdw==",  # the app's own: kept
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-App": "kept",
        }
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 200
            record = await resp.json()
            assert "x-hop-back" not in {k.lower() for k in resp.headers}
        seen = headers_of(record)
        assert seen["host"] == [f"localhost:{upstream.port}"]
        assert seen["cookie"] == ["app=1; other=2"]
        assert seen["authorization"] == ["Basic dXNlcjpwdw=="]
        assert seen["x-app"] == ["kept"]
        for hop in ("x-hop", "keep-alive", "proxy-authorization"):
            assert hop not in seen
        # The test client is on loopback, a trusted proxy by default: its chain is kept.
        assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["https"]
        assert seen["x-forwarded-host"] == [f"127.0.0.1:{daemon.server.port}"]
        assert seen["x-forwarded-prefix"] == [
            f"/workspaces/{daemon.settings.workspace_id}/ports/{upstream.port}"
        ]
        # The daemon's token in a header or the query never reaches the app.
        async with http.get(
            url + f"&token={TOKEN}", headers=AUTH, data=b"", allow_redirects=False
        ) as resp:
            assert resp.status == 302  # GET with ?token= is exchanged, not forwarded
        async with http.post(url + f"&token={TOKEN}", headers=AUTH, data=b"z") as resp:
            record = await resp.json()
        assert record["path_qs"] == "/echo?keep=1"
        assert "authorization" not in headers_of(record)
        assert TOKEN not in json.dumps(record)
        assert all(TOKEN not in json.dumps(r) for r in upstream.seen)


async def test_untrusted_peers_forwarded_headers_are_replaced(start_daemon, upstream):
    running = await start_daemon(trusted_proxies="10.0.0.0/8")
    async with aiohttp.ClientSession() as http:
        headers = {**AUTH, "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil"}
        async with http.get(port_url(running, upstream.port, "/echo"), headers=headers) as resp:
            seen = headers_of(await resp.json())
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{running.server.port}"]
    assert seen["x-forwarded-proto"] == ["http"]


async def test_location_and_set_cookie_are_rewritten(daemon, upstream):
    prefix = f"/workspaces/{daemon.settings.workspace_id}/ports/{upstream.port}"
    async with aiohttp.ClientSession() as http:
        cases = {
            "http://localhost:PORT/next?a=1": f"{prefix}/next?a=1",
            "http://127.0.0.1:PORT/": f"{prefix}/",
            "/abs/path": f"{prefix}/abs/path",
            "relative/x": "relative/x",
            "https://example.com/elsewhere": "https://example.com/elsewhere",
            "http://localhost:1/other-port": "http://localhost:1/other-port",
        }
        for target, expected in cases.items():
            url = port_url(daemon, upstream.port, "/redirect")
            async with http.get(
                url, params={"to": target}, headers=AUTH, allow_redirects=False
            ) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == expected, target
        async with http.get(port_url(daemon, upstream.port, "/cookies"), headers=AUTH) as resp:
            cookies = resp.headers.getall("Set-Cookie")
    assert cookies == [
        f"a=1; Path={prefix}/; HttpOnly",
        f"b=2; Path={prefix}/app",
        f"c=3; Path={prefix}/",
    ]


# -- Access --------------------------------------------------------------------------------


async def test_private_ports_need_the_token_or_the_cookie(daemon, upstream):
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        url = port_url(daemon, upstream.port, "/echo/page?x=1")
        async with http.get(url) as resp:
            assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
        async with http.get(url + "&token=wrong") as resp:
            assert resp.status == 401
        async with http.get(url + f"&token={TOKEN}", allow_redirects=False) as resp:
            assert resp.status == 302
            assert (
                resp.headers["Location"]
                == f"/workspaces/ws-test/ports/{upstream.port}/echo/page?x=1"
            )
            set_cookie = resp.headers["Set-Cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "SameSite=Lax" in set_cookie
        assert f"Path=/workspaces/ws-test/ports/{upstream.port}/" in set_cookie
        assert TOKEN not in set_cookie
        # The cookie jar now holds the cookie: the redirect target loads.
        async with http.get(url) as resp:
            assert resp.status == 200
            assert (await resp.json())["path_qs"] == "/echo/page?x=1"
        # The cookie is scoped to its port: sent by hand to another port it does not work.
        other = port_url(daemon, upstream.port + 1 if upstream.port < 65535 else 1024, "/")
        cookie = next(c.value for c in jar if c.key == "aetherd_preview")
    async with aiohttp.ClientSession() as http:
        async with http.get(other, headers={"Cookie": f"aetherd_preview={cookie}"}) as resp:
            assert resp.status == 401
        async with http.get(url, headers={"Cookie": f"aetherd_preview={cookie}x"}) as resp:
            assert resp.status == 401
        # Subprotocol form of the token works for plain HTTP too (any form of section 1).
        async with http.get(url, headers={"Sec-WebSocket-Protocol": f"Bearer, {TOKEN}"}) as resp:
            assert resp.status == 200


async def test_a_public_port_needs_nothing(start_daemon, upstream, workspace):
    (workspace / ".aether").mkdir()
    (workspace / ".aether" / "config.yaml").write_text(
        f"ports:\n  {upstream.port}:\n    visibility: public\n"
    )
    running = await start_daemon()
    async with aiohttp.ClientSession() as http:
        async with http.get(port_url(running, upstream.port, "/echo")) as resp:
            assert resp.status == 200
        # Other ports stay private.
        async with http.get(port_url(running, free_port(), "/echo")) as resp:
            assert resp.status == 401


async def test_own_ignored_and_impossible_ports_are_not_found(start_daemon, workspace):
    ignored_by_config = free_port()
    (workspace / ".aether").mkdir()
    (workspace / ".aether" / "config.yaml").write_text(
        f"ports:\n  {ignored_by_config}:\n    ignore: true\n    visibility: public\n"
    )
    running = await start_daemon(port_ignore="4999")
    async with aiohttp.ClientSession() as http:
        for port in (running.server.port, 22, 2222, 3001, 4999, ignored_by_config, 0, 65536, 99999):
            async with http.get(port_url(running, port, "/"), headers=AUTH) as resp:
                assert resp.status == 404, port
                assert await resp.json() == {"error": "Port not found"}
        for path in ("/workspaces/ws-test/ports/abc/", "/workspaces/other/ports/8080/"):
            async with http.get(running.url(path), headers=AUTH) as resp:
                assert resp.status == 404
        # No trailing slash: redirected to the slash form, query kept.
        url = running.url("/workspaces/ws-test/ports/8080") + "?a=1"
        async with http.get(url, headers=AUTH, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/workspaces/ws-test/ports/8080/?a=1"


# -- Streaming -----------------------------------------------------------------------------


async def test_100_mib_both_ways_in_constant_memory(daemon, upstream):
    size = 100 * MiB
    samples: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        for _ in range(100_000):
            samples.append(rss_bytes())
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
                return
            except asyncio.TimeoutError:
                pass

    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with aiohttp.ClientSession() as http:
        # Warm up: one small transfer each way, so lazily allocated buffers exist.
        async with http.get(
            port_url(daemon, upstream.port, "/download?size=1000000"), headers=AUTH
        ) as resp:
            await resp.read()
        baseline = rss_bytes()
        sampler = asyncio.create_task(sample())
        try:
            for chunked in ("0", "1"):
                url = port_url(daemon, upstream.port, f"/download?size={size}&chunked={chunked}")
                received = 0
                hasher = hashlib.sha256()
                async with http.get(url, headers=AUTH) as resp:
                    assert resp.status == 200
                    if chunked == "1":
                        assert resp.headers["Transfer-Encoding"] == "chunked"
                    else:
                        assert int(resp.headers["Content-Length"]) == size
                    async for chunk in resp.content.iter_chunked(MiB):
                        received += len(chunk)
                        hasher.update(chunk)
                assert received == size
            # Chunked upload (no length), then one with Content-Length.
            async with http.post(
                port_url(daemon, upstream.port, "/upload"), headers=AUTH, data=body()
            ) as resp:
                result = await resp.json()
            assert result == {
                "size": size,
                "sha256": expected,
                "chunked": True,
                "contentLength": None,
            }
            headers = {**AUTH, "Content-Length": str(size)}
            async with http.post(
                port_url(daemon, upstream.port, "/upload"), headers=headers, data=body()
            ) as resp:
                result = await resp.json()
            assert result == {
                "size": size,
                "sha256": expected,
                "chunked": False,
                "contentLength": str(size),
            }
        finally:
            stop.set()
            await sampler
    growth = max(samples) - baseline
    # 400 MiB went through this process (client, daemon and upstream all live here);
    # buffering any one of the bodies would add about 100 MiB.
    assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"


async def test_server_sent_events_arrive_one_by_one(daemon, upstream):
    async with aiohttp.ClientSession() as http:
        async with http.get(port_url(daemon, upstream.port, "/sse"), headers=AUTH) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            assert first == b"data: first\n\n"
            assert not upstream.event("sse-second").is_set()  # the upstream is still waiting
            upstream.event("sse-second").set()
            second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            assert second == b"data: second\n\n"


# -- WebSocket -----------------------------------------------------------------------------


async def test_websocket_subprotocols_messages_and_close_codes(daemon, upstream):
    url = port_url(daemon, upstream.port, "/ws")
    async with aiohttp.ClientSession() as http:
        # Authenticated by the Bearer subprotocol; the app's own subprotocol is negotiated.
        async with http.ws_connect(url, protocols=("Bearer", TOKEN, "vite-hmr")) as ws:
            assert ws.protocol == "vite-hmr"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive(timeout=10)).data == b"\x02\x01\x00"
            await ws.send_str("close-me")
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == 4001 and msg.extra == "bye from upstream"
        assert upstream.ws_protocols[-1] == ["vite-hmr"]  # the token pair was taken out
        # A client close code reaches the upstream.
        upstream.event("ws-closed").clear()
        async with http.ws_connect(url, protocols=("vite-hmr",), headers=AUTH) as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=10)).data == "echo:ping"
            await ws.close(code=4002, message=b"client leaves")
        await asyncio.wait_for(upstream.event("ws-closed").wait(), 10)
        assert upstream.ws_closes[-1][0] == 4002
        # With only the token offered, the 101 selects the scheme word (browsers need one).
        async with http.ws_connect(url, protocols=("bearer", TOKEN)) as ws:
            assert ws.protocol == "bearer"
            await ws.send_str("x")
            assert (await ws.receive(timeout=10)).data == "echo:x"
        # Without credentials there is no upgrade.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url)
        assert info.value.status == 401


# -- Errors and limits ---------------------------------------------------------------------


async def test_nothing_listening_gives_a_self_retrying_502(daemon):
    port = free_port()
    async with aiohttp.ClientSession() as http:
        async with http.get(port_url(daemon, port, "/"), headers=AUTH) as resp:
            assert resp.status == 502
            assert resp.headers["Retry-After"] == "2"
            page = await resp.text()
        assert '<meta http-equiv="refresh" content="2">' in page
        assert f"port {port}" in page
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(port_url(daemon, port, "/ws"), headers=AUTH)
        assert info.value.status == 502


async def test_an_upstream_timeout_gives_504(start_daemon, upstream):
    running = await start_daemon(proxy_timeout=0.3)
    async with aiohttp.ClientSession() as http:
        async with http.get(port_url(running, upstream.port, "/hang"), headers=AUTH) as resp:
            assert resp.status == 504
            assert "did not answer" in await resp.text()
        assert upstream.event("hang-entered").is_set()


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_an_upstream_closing_mid_body_ends_the_response(daemon, upstream, chunked):
    async with aiohttp.ClientSession() as http:
        url = port_url(daemon, upstream.port, f"/broken?chunked={chunked}")
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(url, headers=AUTH) as resp:
                assert resp.status == 200
                await resp.read()
        # The daemon stays healthy: the proxy and its own endpoints still answer.
        async with http.get(port_url(daemon, upstream.port, "/echo"), headers=AUTH) as resp:
            assert resp.status == 200
        async with http.get(daemon.url("/healthz")) as resp:
            assert resp.status == 200


async def test_concurrent_connections_per_port_are_limited(start_daemon, upstream):
    running = await start_daemon(proxy_max_connections_per_port=2, proxy_timeout=30)
    url = port_url(running, upstream.port, "/hang")
    async with aiohttp.ClientSession() as http:
        held = [asyncio.create_task(http.get(url, headers=AUTH)) for _ in range(2)]
        proxy = running.app[_proxy_key()]
        for _ in range(500):
            if proxy.active.get(upstream.port) == 2:
                break
            await asyncio.sleep(0.01)
        assert proxy.active.get(upstream.port) == 2
        async with http.get(url, headers=AUTH) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        upstream.event("hang-release").set()
        for task in held:
            resp = await asyncio.wait_for(task, 10)
            assert resp.status == 200 and await resp.text() == "released"
            resp.release()
        assert upstream.port not in proxy.active
        async with http.get(port_url(running, upstream.port, "/echo"), headers=AUTH) as resp:
            assert resp.status == 200


def _proxy_key():
    from aetherd.transport.proxy import PROXY

    return PROXY


# -- Host form and upstream addresses -----------------------------------------------------


async def test_host_form_proxies_at_the_root(start_daemon, upstream):
    running = await start_daemon(preview_host="{port}-{workspacePrefix}.preview.localhost")
    host = f"{upstream.port}-ws-test.preview.localhost:{running.server.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(running.url("/echo/x?q=1"), headers={"Host": host}) as resp:
            assert resp.status == 401
        async with http.get(
            running.url(f"/echo/x?q=1&token={TOKEN}"), headers={"Host": host}, allow_redirects=False
        ) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/echo/x?q=1"
            assert "Path=/;" in resp.headers["Set-Cookie"]
            cookie = resp.cookies["aetherd_preview"].value
        headers = {"Host": host, "Cookie": f"aetherd_preview={cookie}"}
        async with http.get(running.url("/echo/x?q=1"), headers=headers) as resp:
            assert resp.status == 200
            record = await resp.json()
        assert record["path_qs"] == "/echo/x?q=1"
        seen = headers_of(record)
        assert "x-forwarded-prefix" not in seen and "cookie" not in seen
        assert seen["x-forwarded-host"] == [host]
        # Redirects stay on the preview host; cookies keep their own paths.
        async with http.get(
            running.url("/redirect"),
            params={"to": "http://localhost:PORT/in"},
            headers=headers,
            allow_redirects=False,
        ) as resp:
            assert resp.headers["Location"] == "/in"
        async with http.get(running.url("/cookies"), headers=headers) as resp:
            assert resp.headers.getall("Set-Cookie")[1] == "b=2; Path=/app"
        # The host-form cookie does not open the path form, and other hosts reach the daemon.
        async with http.get(
            port_url(running, upstream.port, "/echo"),
            headers={"Cookie": f"aetherd_preview={cookie}"},
        ) as resp:
            assert resp.status == 401
        async with http.get(running.url("/healthz")) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with http.get(
            running.url("/"), headers={"Host": f"{running.server.port}-ws-test.preview.localhost"}
        ) as resp:
            assert resp.status == 404  # the daemon's own port, even in the host form


async def test_an_ipv6_only_upstream_is_reached(daemon):
    if not socket.has_ipv6:
        pytest.fail("IPv6 loopback is needed")
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {request.transport.get_extra_info('sockname')[0]}")

    app.router.add_get("/", hello)
    server = TestServer(app, host="::1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(port_url(daemon, server.port, "/"), headers=AUTH) as resp:
                assert resp.status == 200 and await resp.text() == "hello from ::1"
    finally:
        await server.close()


async def test_the_access_log_shows_the_real_client(start_daemon, upstream, caplog):
    running = await start_daemon()
    caplog.set_level("INFO", logger="aetherd.access")
    async with aiohttp.ClientSession() as http:
        headers = {**AUTH, "X-Forwarded-For": "198.51.100.7, 127.0.0.5"}
        async with http.get(running.url("/workspaces/ws-test/info"), headers=headers) as resp:
            assert resp.status == 200
    remotes = [getattr(r, "remote", None) for r in caplog.records if r.name == "aetherd.access"]
    assert "198.51.100.7" in remotes

    untrusting: Callable[..., Any] = start_daemon
    other = await untrusting(trusted_proxies="10.0.0.0/8")
    caplog.clear()
    async with aiohttp.ClientSession() as http:
        async with http.get(other.url("/workspaces/ws-test/info"), headers=headers) as resp:
            assert resp.status == 200
    remotes = [getattr(r, "remote", None) for r in caplog.records if r.name == "aetherd.access"]
    assert remotes == ["127.0.0.1"]


async def test_metrics_and_activity_count_proxied_traffic(daemon, upstream):
    activity = daemon.daemon.services.activity
    activity.last_activity_at = 0.0  # long idle
    async with aiohttp.ClientSession() as http:
        async with http.get(port_url(daemon, upstream.port, "/echo"), headers=AUTH) as resp:
            assert resp.status == 200
        async with http.get(port_url(daemon, upstream.port, "/echo")) as resp:
            assert resp.status == 401
        async with http.get(port_url(daemon, 22, "/"), headers=AUTH) as resp:
            assert resp.status == 404
        async with http.get(daemon.url("/metrics")) as resp:
            text = await resp.text()
    assert 'aetherd_proxy_requests_total{kind="http"} 1.0' in text
    assert 'aetherd_proxy_rejected_total{reason="unauthorized"} 1.0' in text
    assert 'aetherd_proxy_rejected_total{reason="not_found"} 1.0' in text
    assert "aetherd_proxy_active 0.0" in text
    assert activity.last_activity_at > 0  # using the preview is using the workspace


async def test_a_client_leaving_mid_download_frees_its_slot(daemon, upstream):
    proxy = daemon.app[_proxy_key()]
    async with aiohttp.ClientSession() as http:
        url = port_url(daemon, upstream.port, f"/download?size={100 * MiB}&chunked=1")
        resp = await http.get(url, headers=AUTH)
        assert resp.status == 200
        await resp.content.readexactly(MiB)
        assert proxy.active.get(upstream.port) == 1
        resp.close()  # drops the connection mid-body
        for _ in range(500):
            if upstream.port not in proxy.active:
                break
            await asyncio.sleep(0.01)
        assert upstream.port not in proxy.active
        async with http.get(port_url(daemon, upstream.port, "/echo"), headers=AUTH) as resp:
            assert resp.status == 200
