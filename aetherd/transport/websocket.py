"""One WebSocket, from upgrade to teardown (after Home Assistant's websocket_api/http.py).

`WebSocketHandler` owns everything a socket's life needs: the access check and the
connection limit before the upgrade, the connection's tasks (writer, supervisor), the
channels' connect hooks, the receive loop, and one teardown that always runs to the
end, even when aiohttp cancels the handler because the peer vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSMsgType, web

from aetherd.errors import AetherError, ErrorCode
from aetherd.logs import CLIENT_ADDRESS, connection_id
from aetherd.protocol.context import Context
from aetherd.protocol.dispatch import Dispatcher
from aetherd.transport.access import DAEMON, TRANSPORT, check_access, json_error
from aetherd.transport.auth import extract_token
from aetherd.transport.connection import Connection

log = logging.getLogger("aetherd.ws")

BINARY_REFUSED = "binary frames are not supported; send JSON text"


class WebSocketHandler:
    """Serves GET /workspaces/{id}/ws for one client."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.daemon = request.app[DAEMON]
        self.state = request.app[TRANSPORT]
        self.settings = self.daemon.settings
        self.ws = self._response()
        self.conn: Connection | None = None

    def _response(self) -> web.WebSocketResponse:
        presented = extract_token(self.request)
        return web.WebSocketResponse(
            protocols=(presented.scheme,) if presented is not None and presented.scheme else (),
            autoping=False,
            # aiohttp rejects a frame whose size *equals* max_msg_size; the contract allows 1 MiB.
            max_msg_size=self.settings.max_message_size + 1,
            timeout=2.0,
            compress=False,
        )

    def _refusal(self) -> web.Response | None:
        denied = check_access(self.request)
        if denied is not None:
            return denied
        if len(self.daemon.hub) >= self.settings.max_connections:
            return json_error(503, "Too many connections")
        return None

    def _query(self) -> dict[str, str]:
        """The upgrade's query parameters for the connect hooks: first values, no token."""
        query: dict[str, str] = {}
        for key, value in self.request.query.items():
            if key != "token":
                query.setdefault(key, value)
        return query

    async def run(self) -> web.StreamResponse:
        """Refuse, or upgrade and serve until the socket closes."""
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        await self.ws.prepare(self.request)
        closing = self.daemon.closing
        if closing is not None:
            # The daemon began closing its sockets while this upgrade was under way: it
            # is not in the set being closed, so it gets the same close here. (No await
            # between this check and joining the hub: one or the other sees it.)
            code, reason = closing
            log.info("upgraded while closing; closing with %d", code)
            await self.ws.close(code=code, message=reason.encode("utf-8"))
            return self.ws
        conn_id = self.state.next_connection_id()
        token = connection_id.set(conn_id)
        conn = self.conn = Connection(
            self.ws, self.settings, conn_id, self.daemon.services.metrics, self._query()
        )
        dispatcher = Dispatcher(self.daemon, conn)
        tasks = self._open(conn)
        try:
            await self._connect_hooks(conn)
            await self._receive_loop(conn, dispatcher)
        finally:
            # The teardown gets its own task, shielded, and a strong reference.
            done = asyncio.create_task(
                self._teardown(conn, dispatcher, tasks), name=f"{conn_id}-teardown"
            )
            self.state.teardowns.add(done)
            done.add_done_callback(self.state.teardowns.discard)
            try:
                await asyncio.shield(done)
            finally:
                connection_id.reset(token)
        return self.ws

    def _open(self, conn: Connection) -> tuple[asyncio.Task[None], ...]:
        services = self.daemon.services
        services.metrics.connections_opened.inc()
        services.activity.connection_opened()
        self.daemon.hub.add(conn)
        remote = self.request.get(CLIENT_ADDRESS) or self.request.remote
        log.info("connected", extra={"remote": remote})
        return (
            asyncio.create_task(conn.run_writer(), name=f"{conn.id}-writer"),
            asyncio.create_task(conn.supervise(), name=f"{conn.id}-supervisor"),
        )

    async def _connect_hooks(self, conn: Connection) -> None:
        ctx = Context(self.daemon, conn)
        for channel in self.daemon.registry.channels.values():
            for hook in channel.connect_hooks:
                try:
                    await hook(ctx)
                except Exception:
                    log.exception("connect hook of channel %s failed", channel.name)

    async def _receive_loop(self, conn: Connection, dispatcher: Dispatcher) -> None:
        ws, activity = self.ws, self.daemon.services.activity
        while not conn.closed:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                activity.touch()
                await dispatcher.handle_text(msg.data)
                await conn.wait_writable()
            elif msg.type is WSMsgType.BINARY:
                activity.touch()
                dispatcher.reject(AetherError(ErrorCode.UNSUPPORTED_FRAME, BINARY_REFUSED))
                await conn.wait_writable()
            elif msg.type is WSMsgType.PING:
                conn.last_pong = time.monotonic()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                conn.pong(msg.data)
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                if msg.type is WSMsgType.ERROR:
                    log.info("websocket error: %s", ws.exception())
                return

    async def _teardown(
        self, conn: Connection, dispatcher: Dispatcher, tasks: tuple[asyncio.Task[None], ...]
    ) -> None:
        self.daemon.hub.discard(conn)
        if not self.ws.closed:
            await conn.close(self.ws.close_code or 1000)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dispatcher.close()
        await conn.run_cleanups()
        self.daemon.services.activity.connection_closed()
        log.info("disconnected", extra={"code": self.ws.close_code})


async def websocket(request: web.Request) -> web.StreamResponse:
    """GET /workspaces/{id}/ws: authenticate, upgrade, then serve frames until close."""
    return await WebSocketHandler(request).run()
