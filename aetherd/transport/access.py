"""Who may use the HTTP endpoints: the app keys, and the one access check every route uses.

`check_access` answers 404 for another workspace id and 401 for a missing or bad token.
A request that passes marks its connection as trusted for the connection guard
(`aetherd.transport.guard`), which limits only connections that never authenticated.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from aetherd.daemon import Daemon
from aetherd.transport.auth import Authenticator, extract_token
from aetherd.transport.guard import ConnectionGuard

if TYPE_CHECKING:
    import asyncio


@dataclass
class TransportState:
    """The transport's own per-app state (never module-level)."""

    guard: ConnectionGuard
    prefix: str
    _seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    teardowns: set[asyncio.Task[None]] = field(default_factory=set)

    def next_connection_id(self) -> str:
        """A connection id unique within this process: `c<pid hex>-<n>`."""
        return f"c{self.prefix}-{next(self._seq)}"


DAEMON = web.AppKey("daemon", Daemon)
AUTH = web.AppKey("authenticator", Authenticator)
TRANSPORT = web.AppKey("transport", TransportState)


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
    trust_connection(request)
    return None


def trust_connection(request: web.Request) -> None:
    """This request authenticated: its connection no longer counts as pending."""
    state = request.app.get(TRANSPORT)
    if state is not None:
        state.guard.trust(request.protocol)
