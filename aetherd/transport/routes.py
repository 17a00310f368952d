"""HTTP routes: health, readiness, metrics, info; the socket, files, config schema, protocol
and the web console."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from aetherd import __version__
from aetherd.channels.activity import figures
from aetherd.daemon import Daemon
from aetherd.metrics import CONTENT_TYPE
from aetherd.transport import config_http, protocol_http
from aetherd.transport.access import DAEMON, check_access, json_error
from aetherd.transport.console import add_console_routes
from aetherd.transport.files_http import add_file_routes
from aetherd.transport.websocket import websocket

log = logging.getLogger("aetherd.http")


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
    reloads = daemon.reloads
    return {
        "workspaceId": daemon.settings.workspace_id,
        "version": __version__,
        "uptimeSeconds": round(time.time() - daemon.started_at, 3),
        # Section 14: when this process started serving, how many starts and reloads
        # came before it, and how many terminal sessions it took over from the last one.
        "startedAt": _iso(reloads.started_at if reloads else daemon.started_at),
        "generation": reloads.generation if reloads else 0,
        "restoredSessions": services.terminals.adopted,
        "connections": activity.connections,
        "terminals": services.terminal_count(),
        "runningTasks": running,
        "lastActivityAt": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(activity.last_activity_at)
        ),
        "idleSeconds": round(activity.idle_seconds(running), 3),
    }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
    daemon = request.app[DAEMON]
    payload = info_payload(daemon)
    try:
        now = await daemon.services.resources.read()
    except Exception as exc:  # an unreadable root must not cost the control plane /info
        log.warning("reading resources for /info failed: %s", exc)
        payload["resources"] = None
    else:
        payload["resources"] = figures(now).model_dump(mode="json")
    return web.json_response(payload)


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
    add_console_routes(app)  # the web console page and its assets
