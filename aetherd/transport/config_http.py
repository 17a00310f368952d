"""GET /workspaces/{id}/config/schema: the config file's JSON Schema, for editors."""

from __future__ import annotations

from aiohttp import web

from aetherd.config_model import config_schema
from aetherd.transport.access import check_access


async def config_schema_handler(request: web.Request) -> web.Response:
    """The JSON Schema generated from the config model (authenticated like /info)."""
    denied = check_access(request)
    if denied is not None:
        return denied
    return web.json_response(config_schema(), content_type="application/schema+json")


def add_routes(app: web.Application) -> None:
    """Register the config schema route."""
    app.router.add_get("/workspaces/{workspace_id}/config/schema", config_schema_handler)
