"""HTTP routes: the workspace WebSocket, info, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any

from aiohttp import WSMsgType, web

from aetherd import __version__
from aetherd.daemon import Daemon
from aetherd.errors import AetherError, ErrorCode
from aetherd.logs import CLIENT_ADDRESS, connection_id
from aetherd.metrics import CONTENT_TYPE
from aetherd.protocol.context import Context
from aetherd.protocol.dispatch import Dispatcher
from aetherd.transport import config_http, protocol_http
from aetherd.transport.auth import Authenticator, extract_token
from aetherd.transport.connection import Connection
from aetherd.transport.files_http import add_file_routes

log = logging.getLogger("aetherd.ws")

DAEMON = web.AppKey("daemon", Daemon)
AUTH = web.AppKey("authenticator", Authenticator)

_conn_counter = itertools.count(1)
_conn_prefix = f"{os.getpid():x}"
_teardowns: set[asyncio.Task[None]] = set()


def json_error(status: int, message: str) -> web.Response:
    """A JSON error body before (or instead of) the upgrade."""
    return web.json_response({"error": message}, status=status)


def check_access(request: web.Request) -> web.Response | None:
    """404 for another workspace id, 401 for a missing or bad token; None when allowed."""
    daemon = request.app[DAEMON]
    if request.match_info.get("workspace_id") != daemon.settings.workspace_id:
        return json_error(404, "Workspace not found")
    if not request.app[AUTH].verify(extract_token(request)):
        return json_error(401, "Unauthorized")
    return None


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 once the services have started, 503 before and while stopping."""
    if request.app[DAEMON].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "starting"}, status=503)


def info_payload(daemon: Daemon) -> dict[str, Any]:
    """The body of GET /workspaces/{id}/info."""
    services = daemon.services
    activity = services.activity
    running = services.running_tasks()
    return {
        "workspaceId": daemon.settings.workspace_id,
        "version": __version__,
        "uptimeSeconds": round(time.time() - daemon.started_at, 3),
        "connections": activity.connections,
        "terminals": services.terminal_count(),
        "runningTasks": running,
        "lastActivityAt": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(activity.last_activity_at)
        ),
        "idleSeconds": round(activity.idle_seconds(running), 3),
    }


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (no auth; `--metrics-enabled false` turns it off)."""
    daemon = request.app[DAEMON]
    if not daemon.settings.metrics_enabled:
        return json_error(404, "Metrics are disabled")
    body = await asyncio.to_thread(daemon.services.metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def info(request: web.Request) -> web.Response:
    """Workspace status for the control plane (authenticated)."""
    denied = check_access(request)
    if denied is not None:
        return denied
    return web.json_response(info_payload(request.app[DAEMON]))


async def websocket(request: web.Request) -> web.StreamResponse:
    """GET /workspaces/{id}/ws: authenticate, upgrade, then serve frames until close."""
    denied = check_access(request)
    if denied is not None:
        return denied
    daemon = request.app[DAEMON]
    settings = daemon.settings
    if len(daemon.hub) >= settings.max_connections:
        return json_error(503, "Too many connections")
    presented = extract_token(request)
    protocols = (presented.scheme,) if presented is not None and presented.scheme else ()
    ws = web.WebSocketResponse(
        protocols=protocols,
        autoping=False,
        # aiohttp rejects a frame whose size *equals* max_msg_size; the contract allows 1 MiB.
        max_msg_size=settings.max_message_size + 1,
        timeout=2.0,
        compress=False,
    )
    await ws.prepare(request)

    conn_id = f"c{_conn_prefix}-{next(_conn_counter)}"
    metrics = daemon.services.metrics
    metrics.connections_opened.inc()
    conn = Connection(ws, settings, conn_id, metrics)
    token = connection_id.set(conn_id)
    dispatcher = Dispatcher(daemon, conn)
    activity = daemon.services.activity
    activity.connection_opened()
    daemon.hub.add(conn)
    writer = asyncio.create_task(conn.run_writer(), name=f"{conn_id}-writer")
    supervisor = asyncio.create_task(conn.supervise(), name=f"{conn_id}-supervisor")
    log.info("connected", extra={"remote": request.get(CLIENT_ADDRESS) or request.remote})
    try:
        ctx = Context(daemon, conn)
        for channel in daemon.registry.channels.values():
            for hook in channel.connect_hooks:
                try:
                    await hook(ctx)
                except Exception:
                    log.exception("connect hook of channel %s failed", channel.name)
        while not conn.closed:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                activity.touch()
                await dispatcher.handle_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                activity.touch()
                dispatcher.reject(
                    AetherError(
                        ErrorCode.UNSUPPORTED_FRAME,
                        "binary frames are not supported; send JSON text",
                    )
                )
            elif msg.type is WSMsgType.PING:
                conn.last_pong = time.monotonic()
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                conn.last_pong = time.monotonic()
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                if msg.type is WSMsgType.ERROR:
                    log.info("websocket error: %s", ws.exception())
                break
    finally:

        async def teardown() -> None:
            daemon.hub.discard(conn)
            if not ws.closed:
                await conn.close(ws.close_code or 1000)
            for task in (writer, supervisor):
                task.cancel()
            await asyncio.gather(writer, supervisor, return_exceptions=True)
            await dispatcher.close()
            await conn.run_cleanups()
            activity.connection_closed()
            log.info("disconnected", extra={"code": ws.close_code})

        # aiohttp may cancel this handler when the peer vanishes; the teardown must
        # still run to the end, so it gets its own task and is shielded.
        done = asyncio.create_task(teardown(), name=f"{conn_id}-teardown")
        _teardowns.add(done)
        done.add_done_callback(_teardowns.discard)
        try:
            await asyncio.shield(done)
        finally:
            connection_id.reset(token)
    return ws


def add_routes(app: web.Application) -> None:
    """Register the transport's routes on `app`."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/workspaces/{workspace_id}/ws", websocket)
    app.router.add_get("/workspaces/{workspace_id}/info", info)
    config_http.add_routes(app)
    protocol_http.add_routes(app)
    add_file_routes(app)  # files: bulk transfer
