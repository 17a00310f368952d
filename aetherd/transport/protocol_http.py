"""GET /workspaces/{id}/protocol.json: the protocol's AsyncAPI document (`aetherd schema`).

The document is generated from the daemon's registry on the first request and kept for
the life of the process; the schema module is imported only then, so it costs the
daemon's start nothing.
"""

from __future__ import annotations

from aiohttp import web

from aetherd.transport.access import DAEMON, check_access


async def protocol_json(request: web.Request) -> web.Response:
    """The generated protocol description (authenticated like /info)."""
    denied = check_access(request)
    if denied is not None:
        return denied
    from aetherd.protocol.schema import document_json

    text = document_json(request.app[DAEMON].registry)
    return web.Response(text=text, content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the protocol description route."""
    app.router.add_get("/workspaces/{workspace_id}/protocol.json", protocol_json)
