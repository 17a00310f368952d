"""The preview proxy (PROTOCOL.md section 13): workspace ports over HTTP, at the aiohttp edge.

Path form: `/workspaces/{id}/ports/{port}/{path}`; host form: a Host matching
`--preview-host`. Both end in `PreviewProxy.handle`, which decides access
(`proxy_rules.decide_access`), then relays either an HTTP exchange or a WebSocket.

- HTTP: one shared `ClientSession` (keep-alive to the upstream, no decompression, no
  cookie jar, no redirects). Request and response bodies are relayed chunk by chunk with
  aiohttp's flow control on both sockets, so memory stays constant whatever the size.
- WebSocket: the upstream handshake happens first (so its subprotocol choice, or its
  refusal, reaches the client), then two relays copy messages and the close code.
- Upstream address: `localhost` resolves to 127.0.0.1 and ::1 (and the port's bind
  address when the port scanner knows a specific one); the connector tries them in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from aetherd.daemon import Daemon
from aetherd.logs import CLIENT_ADDRESS, request_key
from aetherd.metrics import Sample
from aetherd.services.ports import NEVER_REPORTED, is_loopback
from aetherd.transport import proxy_rules as rules
from aetherd.transport.access import AUTH, DAEMON, trust_connection
from aetherd.transport.auth import SUBPROTOCOL_SCHEMES, Authenticator, Presented

log = logging.getLogger("aetherd.proxy")

CLIENT = CLIENT_ADDRESS
PROXIED = request_key("aetherd_proxied", bool)
"""Request key: this request was handled by the preview proxy (no CORS headers)."""
TRUSTED = request_key("aetherd_trusted_peer", bool)
"""Request key: the peer is one of `--trusted-proxies`."""

T = TypeVar("T")
_SENDABLE_CLOSE = range(1000, 5000)
_UNSENDABLE_CLOSE = frozenset({1004, 1005, 1006, 1015})


class UpstreamTimeout(Exception):
    """The upstream made no progress for `proxy_timeout` seconds before its headers."""


class _LoopbackResolver(AbstractResolver):
    """`localhost` → 127.0.0.1, ::1 and the port's specific bind address, if known."""

    def __init__(self, proxy: PreviewProxy) -> None:
        self._proxy = proxy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = ["127.0.0.1", "::1"]
        bound = self._proxy.bind_address(port)
        if bound is not None:
            addresses.insert(0, bound)
        preferred = self._proxy.preferred.get(port)
        if preferred in addresses:
            addresses.remove(preferred)
            addresses.insert(0, preferred)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def _close_code(code: Any, fallback: int = 1000) -> int:
    if isinstance(code, int) and code in _SENDABLE_CLOSE and code not in _UNSENDABLE_CLOSE:
        return code
    return fallback


def _html(status: int, body: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", **headers},
    )


def _key_file(path: Path) -> bytes:
    """The preview-cookie secret: 32 random bytes kept 0600 in the data directory."""
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = os.urandom(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return data


class PreviewProxy:
    """Relays requests to workspace ports. One per application."""

    def __init__(self, daemon: Daemon, auth: Authenticator, cookie_key: bytes) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.auth = auth
        self.signer = rules.CookieSigner(cookie_key)
        self.host_pattern = (
            rules.HostPattern(
                self.settings.preview_host, self.settings.workspace_id, self.settings.preview_token
            )
            if self.settings.preview_host
            else None
        )
        self.preferred: dict[int, str] = {}
        self.active: dict[int, int] = {}
        self.session: aiohttp.ClientSession | None = None
        self.relayed = {"http": 0, "websocket": 0}
        self.upstream_errors = 0
        self.rejected = {"not_found": 0, "unauthorized": 0, "limit": 0}

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            resolver=_LoopbackResolver(self),
            use_dns_cache=False,
            keepalive_timeout=15,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.proxy_connect_timeout
            ),
            max_field_size=65536,
            max_line_size=65536,
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def metrics(self) -> Iterator[Sample]:
        """Counters for /metrics (registered with the daemon's metrics at start)."""
        for kind, count in self.relayed.items():
            yield Sample(
                "aetherd_proxy_requests",
                "Requests and WebSocket upgrades relayed to workspace ports",
                count,
                {"kind": kind},
                kind="counter",
            )
        for reason, count in self.rejected.items():
            yield Sample(
                "aetherd_proxy_rejected",
                "Proxied requests refused before the upstream",
                count,
                {"reason": reason},
                kind="counter",
            )
        yield Sample(
            "aetherd_proxy_upstream_errors",
            "Upstream refusals, timeouts and broken bodies",
            self.upstream_errors,
            kind="counter",
        )
        yield Sample(
            "aetherd_proxy_active",
            "Proxied requests and sockets in flight",
            sum(self.active.values()),
        )

    # -- the daemon's view of ports -----------------------------------------------------
    def bind_address(self, port: int) -> str | None:
        """The port's bind address when it is a specific, non-loopback one."""
        scanner = getattr(self.daemon.services, "ports", None)
        info = scanner.get(port) if scanner is not None else None
        if info is None:
            return None
        for address in info.addresses:
            if address not in ("0.0.0.0", "::", "*", "") and not is_loopback(address):
                return str(address).strip("[]")
        return None

    def refused_ports(self, request: web.Request) -> set[int]:
        """The daemon's own port, section 5's never-reported ports and ignored ports."""
        refused = set(NEVER_REPORTED) | set(self.settings.port_ignore)
        if self.settings.port:
            refused.add(self.settings.port)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname:
            refused.add(sockname[1])
        refused.update(port for port, spec in self._config_ports().items() if spec.ignore)
        return refused

    def _config_ports(self) -> dict[int, Any]:
        store = getattr(self.daemon.services, "config", None)
        current = getattr(store, "current", None)
        return dict(getattr(current, "ports", None) or {})

    def is_public(self, port: int) -> bool:
        spec = self._config_ports().get(port)
        return spec is not None and spec.visibility == "public"

    # -- credentials --------------------------------------------------------------------
    def _verifies(self, token: str) -> bool:
        return bool(token) and self.auth.verify(Presented(token))

    def _credentials(self, request: web.Request, scope: str) -> tuple[bool, str | None]:
        """(authenticated, the valid `?token=` value if one came in the query)."""
        query_token = next(
            (t for t in request.query.getall("token", []) if self._verifies(t)), None
        )
        if query_token is not None:
            return True, query_token
        offered = rules.split_subprotocols(request.headers.get("Sec-WebSocket-Protocol"))
        for index, item in enumerate(offered[:-1]):
            if item.lower() in SUBPROTOCOL_SCHEMES and self._verifies(offered[index + 1]):
                return True, None
        if self._bearer_is_daemon(request):
            return True, None
        now = time.time()
        for value in rules.cookie_values(request.headers.get("Cookie", "")):
            if self.signer.verify(value, scope, now):
                return True, None
        return False, None

    def _bearer_is_daemon(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self._verifies(value.strip())

    # -- entry points -------------------------------------------------------------------
    async def path_form(self, request: web.Request) -> web.StreamResponse:
        """`/workspaces/{id}/ports/{port}{tail}`."""
        if request.match_info["workspace_id"] != self.settings.workspace_id:
            return web.json_response({"error": "Workspace not found"}, status=404)
        port = rules.parse_port(request.match_info["port"])
        prefix = f"/workspaces/{self.settings.workspace_id}/ports/{request.match_info['port']}"
        raw_path = request.rel_url.raw_path
        if port is None or not raw_path.startswith(prefix):
            return web.json_response({"error": "Port not found"}, status=404)
        tail = raw_path[len(prefix) :]
        if not tail:
            # The app's relative links need the trailing slash, as code-server does.
            query = request.rel_url.raw_query_string
            raise web.HTTPFound(prefix + "/" + ("?" + query if query else ""))
        if not tail.startswith("/"):
            return web.json_response({"error": "Port not found"}, status=404)
        return await self.handle(request, port, prefix, tail)

    async def handle(
        self, request: web.Request, port: int | None, prefix: str | None, path: str
    ) -> web.StreamResponse:
        """Access, token exchange, limits, then the relay."""
        request[PROXIED] = True
        scope = f"port:{port}" if prefix is not None else f"host:{_hostname(request.host)}"
        refused = self.refused_ports(request)
        authenticated, query_token = self._credentials(request, scope)
        if authenticated:
            trust_connection(request)  # not counted against max_pending_connections
        public = port is not None and self.is_public(port)
        decision = rules.decide_access(
            port, refused_ports=refused, public=public, authenticated=authenticated
        )
        if decision is rules.Access.NOT_FOUND:
            self.rejected["not_found"] += 1
            return web.json_response({"error": "Port not found"}, status=404)
        if decision is rules.Access.UNAUTHORIZED:
            self.rejected["unauthorized"] += 1
            return web.json_response({"error": "Unauthorized"}, status=401)
        # Using the preview is using the workspace (idle detection, section 7).
        self.daemon.services.activity.touch()
        assert port is not None
        query = rules.strip_query_param(
            request.rel_url.raw_query_string, "token", lambda value: not self._verifies(value)
        )
        websocket = _is_websocket(request)
        if query_token is not None and request.method in ("GET", "HEAD") and not websocket:
            return self._exchange(request, scope, prefix, path, query)
        count = self.active.get(port, 0)
        if count >= self.settings.proxy_max_connections_per_port:
            self.rejected["limit"] += 1
            return web.json_response(
                {"error": f"Too many connections to port {port}"},
                status=503,
                headers={"Retry-After": "1"},
            )
        self.active[port] = count + 1
        try:
            if websocket:
                return await self._relay_websocket(request, port, prefix, path, query)
            return await self._relay_http(request, port, prefix, path, query)
        finally:
            remaining = self.active[port] - 1
            if remaining:
                self.active[port] = remaining
            else:
                del self.active[port]

    def _exchange(
        self, request: web.Request, scope: str, prefix: str | None, path: str, query: str
    ) -> web.StreamResponse:
        """`?token=`: set the preview cookie and redirect to the URL without the token."""
        location = (prefix or "") + path + ("?" + query if query else "")
        response = web.Response(
            status=302, headers={"Location": location, "Cache-Control": "no-store"}
        )
        forwarded_proto = (
            request.headers.get("X-Forwarded-Proto", "") if request.get(TRUSTED) else ""
        )
        secure = request.scheme == "https" or forwarded_proto.strip().lower() == "https"
        response.set_cookie(
            rules.COOKIE_NAME,
            self.signer.issue(scope, time.time(), self.settings.proxy_cookie_max_age),
            path=(prefix or "") + "/",
            max_age=self.settings.proxy_cookie_max_age,
            httponly=True,
            samesite="Lax",
            secure=secure or None,
        )
        return response

    def _upstream_url(self, port: int, path: str, query: str) -> URL:
        return URL.build(
            scheme="http", host="localhost", port=port, path=path, query_string=query, encoded=True
        )

    def _headers(self, request: web.Request, port: int, prefix: str | None, websocket: bool) -> Any:
        peer = request.remote or ""
        return rules.upstream_headers(
            request.headers.items(),
            port=port,
            client=peer,  # appended to a trusted chain, or alone
            trusted_peer=bool(request.get(TRUSTED)),
            scheme=request.scheme,
            host=request.host,
            prefix=prefix,
            drop_authorization=self._bearer_is_daemon(request),
            websocket=websocket,
        )

    def _note_address(self, port: int, response: Any) -> None:
        connection = getattr(response, "connection", None)
        transport = getattr(connection, "transport", None)
        peer = transport.get_extra_info("peername") if transport is not None else None
        if peer:
            self.preferred[port] = peer[0]

    # -- HTTP ---------------------------------------------------------------------------
    async def _relay_http(
        self, request: web.Request, port: int, prefix: str | None, path: str, query: str
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = self._headers(request, port, prefix, websocket=False)
        headers.popall("Expect", None)  # aiohttp answered 100-continue already
        progress = [asyncio.get_running_loop().time()]
        body: AsyncIterator[bytes] | None = None
        if request.body_exists:
            body = _body(request, progress)
        try:
            upstream = await _with_progress(
                self.session.request(
                    request.method,
                    self._upstream_url(port, path, query),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                ),
                self.settings.proxy_timeout,
                progress,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, TimeoutError
            ):
                return self._timeout(port, self.settings.proxy_connect_timeout)
            self.upstream_errors += 1
            log.info("port %d: nothing answers (%s)", port, type(exc).__name__)
            return _html(502, rules.unavailable_page(port), **{"Retry-After": "2"})
        except aiohttp.ServerTimeoutError:  # connecting took too long (no read timeout is set)
            return self._timeout(port, self.settings.proxy_connect_timeout)
        except (UpstreamTimeout, asyncio.TimeoutError):
            return self._timeout(port, self.settings.proxy_timeout)
        except aiohttp.ClientError as exc:
            self.upstream_errors += 1
            log.info("port %d: upstream error: %s", port, exc)
            return _html(502, rules.unavailable_page(port), **{"Retry-After": "2"})
        self.relayed["http"] += 1
        self._note_address(port, upstream)
        try:
            sized = upstream.content_length is not None and upstream.content_length > 0
            response_class = _HeadersWithBody if sized else web.StreamResponse
            out = response_class(status=upstream.status, reason=upstream.reason)
            out.headers.extend(
                rules.downstream_headers(upstream.headers.items(), port=port, prefix=prefix)
            )
            if upstream.status in (204, 304) or 100 <= upstream.status < 200:
                out.headers.popall("Content-Length", None)
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                # The upstream broke off mid-body: end the client's response the same way
                # (a short or unterminated body, never a silently complete one).
                self.upstream_errors += 1
                log.info("port %d: upstream ended mid-body: %s", port, type(exc).__name__)
                if request.transport is not None:
                    request.transport.close()
                return out
            except ConnectionError:
                return out  # the client went away; aiohttp closes its side
            await out.write_eof()
            return out
        finally:
            if upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()

    def _timeout(self, port: int, seconds: float) -> web.Response:
        self.upstream_errors += 1
        log.info("port %d: upstream timed out after %gs", port, seconds)
        return _html(504, rules.timeout_page(port, seconds))

    # -- WebSocket ----------------------------------------------------------------------
    async def _relay_websocket(
        self, request: web.Request, port: int, prefix: str | None, path: str, query: str
    ) -> web.StreamResponse:
        assert self.session is not None
        offered = rules.split_subprotocols(request.headers.get("Sec-WebSocket-Protocol"))
        app_protocols = rules.strip_subprotocol_token(offered, self._verifies)
        scheme_word = next(
            (
                item
                for index, item in enumerate(offered[:-1])
                if item.lower() in SUBPROTOCOL_SCHEMES and self._verifies(offered[index + 1])
            ),
            None,
        )
        headers = self._headers(request, port, prefix, websocket=True)
        limit = self.settings.proxy_ws_max_message
        try:
            upstream = await asyncio.wait_for(
                self.session.ws_connect(
                    self._upstream_url(port, path, query),
                    protocols=app_protocols,
                    headers=headers,
                    autoclose=False,
                    autoping=True,
                    max_msg_size=limit,
                    compress=0,
                ),
                self.settings.proxy_timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return web.json_response(
                {"error": f"port {port} refused the WebSocket upgrade"},
                status=exc.status if exc.status >= 400 else 502,
            )
        except aiohttp.ClientConnectorError:
            self.upstream_errors += 1
            return _html(502, rules.unavailable_page(port), **{"Retry-After": "2"})
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return self._timeout(port, self.settings.proxy_timeout)
        except aiohttp.ClientError as exc:
            self.upstream_errors += 1
            log.info("port %d: WebSocket upstream error: %s", port, exc)
            return _html(502, rules.unavailable_page(port), **{"Retry-After": "2"})
        self.relayed["websocket"] += 1
        chosen = upstream.protocol or scheme_word
        downstream = web.WebSocketResponse(
            protocols=(chosen,) if chosen else (),
            autoclose=False,
            autoping=True,
            max_msg_size=limit,
            compress=False,
        )
        try:
            await downstream.prepare(request)
            _coalesce_writes(downstream)
            _coalesce_writes(upstream)
            await _bridge(downstream, upstream)
        finally:
            with contextlib.suppress(Exception):
                await upstream.close()
        return downstream


PROXY = web.AppKey("preview_proxy", PreviewProxy)


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


async def _body(request: web.Request, progress: list[float]) -> AsyncIterator[bytes]:
    """The client's request body, chunk by chunk; each chunk counts as progress."""
    loop = asyncio.get_running_loop()
    async for chunk in request.content.iter_any():
        progress[0] = loop.time()
        yield chunk


async def _with_progress(awaitable: Awaitable[T], timeout: float, progress: list[float]) -> T:
    """Await `awaitable` in this task, failing with UpstreamTimeout after `timeout` s
    without progress (a request body still flowing counts as progress).

    A timer cancels the current task when the deadline passes with no progress; no extra
    task is created (this is on every proxied request's path)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    fired = False
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal fired, handle
        due = progress[0] + timeout
        if loop.time() < due:
            handle = loop.call_at(due, check)
            return
        fired = True
        task.cancel()

    handle = loop.call_at(progress[0] + timeout, check)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not fired:
            raise
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
        raise UpstreamTimeout from None
    finally:
        if handle is not None:
            handle.cancel()


class _CoalescingTransport:
    """Write-combining in front of a WebSocket's transport: the frames written during one
    event-loop iteration leave in one send() instead of one each.

    A relay forwards a burst of messages that arrived in one read as a burst of frames;
    one system call per frame was most of its cost. Flow control is unchanged: the real
    transport still pauses the protocol, which aiohttp's writer waits on."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _coalesce_writes(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse[bool]) -> None:
    """Put a `_CoalescingTransport` under `ws`'s frame writer (aiohttp's `_writer`; when a
    future aiohttp lays it out differently, frames simply go out one by one)."""
    writer = getattr(ws, "_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None and not isinstance(transport, _CoalescingTransport):
        writer.transport = _CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[union-attr]


class _HeadersWithBody(web.StreamResponse):
    """A response whose headers go out with the first body chunk (one send for a small
    body, not two). Used when the upstream announced a Content-Length."""

    _send_headers_immediately = False


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse[bool],
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse[bool],
) -> None:
    """Copy messages from `source` to `sink`; a close is passed on with its code."""
    try:
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                code = _close_code(msg.data)
                reason = (msg.extra or "").encode("utf-8")[:123]
                await sink.close(code=code, message=reason)
                await source.close(code=code, message=reason)
                return
            elif msg.type is WSMsgType.ERROR:
                await sink.close(code=1011, message=b"upstream error")
                return
            else:  # CLOSING, CLOSED: the other pump is closing this side
                return
    except ConnectionError:
        return


async def _bridge(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse[bool]
) -> None:
    """Relay both ways until one side closes, then close the other with the same code."""
    tasks = {
        asyncio.create_task(_pump(client, upstream), name="proxy-ws-up"),
        asyncio.create_task(_pump(upstream, client), name="proxy-ws-down"),
    }
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # Give the other direction a moment to deliver the close handshake it started.
        if pending:
            await asyncio.wait(pending, timeout=5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not client.closed:
            with contextlib.suppress(Exception):
                await client.close(code=_close_code(upstream.close_code, 1011))


def add_preview_proxy(app: web.Application) -> None:
    """Register the path form, the host-form middleware and the proxy's lifecycle."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        daemon = app[DAEMON]
        key = await asyncio.to_thread(_key_file, daemon.settings.data_dir / "preview-key")
        # Binding the key to the configured tokens: a changed token revokes every cookie.
        mixed = key + b"".join(getattr(app[AUTH], "_tokens", []))
        proxy = PreviewProxy(daemon, app[AUTH], hashlib.sha256(mixed).digest())
        app[PROXY] = proxy
        daemon.services.metrics.add_source(proxy)
        await proxy.start()
        try:
            yield
        finally:
            await proxy.stop()

    async def path_handler(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].path_form(request)

    @web.middleware
    async def host_form(request: web.Request, handler: Any) -> web.StreamResponse:
        proxy = request.app[PROXY]
        pattern = proxy.host_pattern
        if pattern is not None:
            port = pattern.match(request.headers.get("Host"))
            if port is not None:
                path = request.rel_url.raw_path or "/"
                return await proxy.handle(request, port or None, None, path)
        response: web.StreamResponse = await handler(request)
        return response

    app.cleanup_ctx.append(lifecycle)
    app.middlewares.append(host_form)
    app.router.add_route("*", "/workspaces/{workspace_id}/ports/{port}{tail:.*}", path_handler)
