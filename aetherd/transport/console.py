"""The web console (docs/architecture.md, "Web console"): the page at `/workspaces/{id}/`.

The page and its two bundles are static files built from `web/` into `console_dist/`
(by the build hook in setup.py, or `python web/webbuild.py`). Serving them needs no token:
the page holds no workspace data. It reads the token from the URL fragment, which browsers
never send, and then talks to the authenticated socket and HTTP endpoints like any client.

- `GET /` redirects (302) to `/workspaces/{id}/`; the browser keeps the fragment.
- `GET /workspaces/{id}` redirects to the form with the trailing slash.
- `GET /workspaces/{id}/` answers the page with a strict Content-Security-Policy whose
  `style-src` carries a fresh nonce (xterm.js and CodeMirror inject <style> elements; the
  page gives them the nonce). No inline script is allowed at all.
- `GET /workspaces/{id}/assets/{name}` answers the bundles, revalidated by ETag; a client
  that accepts gzip gets the build's precompressed copy (aiohttp's FileResponse picks
  `app.js.gz` by itself), about a third of the size.
- Another workspace id: 404 `{"error":"Workspace not found"}`, as on the socket.
- Assets not built (an install with AETHERD_SKIP_WEB_BUILD): 503 with a line saying how.
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from aetherd.settings import Settings
from aetherd.transport.access import DAEMON, json_error

log = logging.getLogger("aetherd.console")

DIST = Path(__file__).resolve().parent / "console_dist"
ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js.LEGAL.txt": "text/plain; charset=utf-8",
    "app.css.LEGAL.txt": "text/plain; charset=utf-8",
}
NOT_BUILT = (
    "The aetherd web console is not built in this installation. Build it with "
    "`python web/webbuild.py` in a checkout (needs Node >= 20 and npm), then reinstall."
)
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def content_security_policy(nonce: str) -> str:
    """The page's policy: own scripts only, styles from itself or with the nonce."""
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            f"style-src 'self' 'nonce-{nonce}'",
            "img-src 'self' data: blob:",
            "font-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def console_url(settings: Settings, host: str, port: int, token: str | None) -> str:
    """The console's URL, with the token in the fragment when one is given."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    url = f"http://{shown}:{port}/workspaces/{quote(settings.workspace_id, safe='')}/"
    return f"{url}#token={quote(token, safe='')}" if token else url


class ConsolePage:
    """The page template, read once (lazily, off the event loop) and filled per request."""

    def __init__(self, dist: Path = DIST) -> None:
        self.dist = dist
        self._template: str | None = None
        self._missing_logged = False

    async def template(self) -> str | None:
        if self._template is None:
            try:
                self._template = await asyncio.to_thread(
                    (self.dist / "index.html").read_text, encoding="utf-8"
                )
            except OSError:
                if not self._missing_logged:
                    self._missing_logged = True
                    log.warning("web console not built: %s", self.dist)
                return None
        return self._template


PAGE = web.AppKey("console_page", ConsolePage)


def _workspace(request: web.Request) -> str | None:
    """The configured workspace id when the path names it, else None."""
    wanted = request.app[DAEMON].settings.workspace_id
    return wanted if request.match_info.get("workspace_id") == wanted else None


async def root(request: web.Request) -> web.StreamResponse:
    """`/` → the console of the one workspace this daemon serves."""
    workspace_id = request.app[DAEMON].settings.workspace_id
    raise web.HTTPFound(f"/workspaces/{quote(workspace_id, safe='')}/")


async def add_slash(request: web.Request) -> web.StreamResponse:
    if _workspace(request) is None:
        return json_error(404, "Workspace not found")
    raise web.HTTPFound(f"{request.path}/")


async def page(request: web.Request) -> web.StreamResponse:
    """The console page, with a fresh CSP nonce."""
    workspace_id = _workspace(request)
    if workspace_id is None:
        return json_error(404, "Workspace not found")
    template = await request.app[PAGE].template()
    nonce = secrets.token_urlsafe(18)
    headers = {
        **COMMON_HEADERS,
        "Content-Security-Policy": content_security_policy(nonce),
        "Cache-Control": "no-store",
    }
    if template is None:
        return web.Response(
            status=503, text=NOT_BUILT + "\n", content_type="text/plain", headers=headers
        )
    body = template.replace("__CSP_NONCE__", nonce).replace(
        "__WORKSPACE_ID__", html.escape(workspace_id, quote=True)
    )
    return web.Response(text=body, content_type="text/html", charset="utf-8", headers=headers)


async def asset(request: web.Request) -> web.StreamResponse:
    """One of the built bundles (a fixed list: nothing else under console_dist is served)."""
    if _workspace(request) is None:
        return json_error(404, "Workspace not found")
    name = request.match_info["name"]
    content_type = ASSET_TYPES.get(name)
    path = request.app[PAGE].dist / name
    if content_type is None:
        return json_error(404, "Not found")
    if not await asyncio.to_thread(path.is_file):
        return json_error(404, "Not found")
    return web.FileResponse(
        path,
        headers={**COMMON_HEADERS, "Content-Type": content_type, "Cache-Control": "no-cache"},
    )


def add_console_routes(app: web.Application, dist: Path = DIST) -> None:
    """Register `/`, the page and its assets."""
    app[PAGE] = ConsolePage(dist)
    app.router.add_get("/", root)
    app.router.add_get("/workspaces/{workspace_id}", add_slash)
    app.router.add_get("/workspaces/{workspace_id}/", page)
    app.router.add_get("/workspaces/{workspace_id}/assets/{name}", asset)
