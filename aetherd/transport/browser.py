"""HTTP for browsers (PROTOCOL.md section 16): CORS on the daemon's HTTP endpoints, and the
real client address behind trusted proxies.

- `--cors-origins`: a page on a listed origin may call `GET/PUT …/files/content`,
  `GET …/info` and `GET …/config/schema` with an `Authorization: Bearer` header. Preflights
  are answered here (before authentication, as browsers send them without credentials);
  every response on those paths to a listed origin carries `Access-Control-Allow-Origin`
  and exposes `ETag`, `Content-Range`, `Content-Length`, `Last-Modified`. No credentials
  mode. The preview proxy's requests are left to the upstream app, preflights included.
- `--trusted-proxies`: `X-Forwarded-For` is believed only when the peer is in one of these
  networks; the access log and the connection log then show the real client.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from aiohttp import hdrs, web

from aetherd.settings import Settings
from aetherd.transport.proxy import CLIENT, PROXIED, TRUSTED
from aetherd.transport.proxy_rules import client_address, is_trusted

CORS_PATHS = re.compile(r"^/workspaces/[^/]+/(?:info|files/content|config/schema)$")
ALLOW_METHODS = "GET, HEAD, PUT"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Range, If-Range, If-Match, If-None-Match, "
    "If-Modified-Since, If-Unmodified-Since"
)
EXPOSE_HEADERS = "ETag, Content-Range, Content-Length, Last-Modified"
PREFLIGHT_MAX_AGE = "600"


class BrowserAccess:
    """The allow-list of origins and the trusted proxy networks, from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.origins = frozenset(settings.cors_origins)
        self.any_origin = "*" in self.origins
        self.networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies
        )

    def origin_allowed(self, origin: str | None) -> bool:
        """True when `origin` may read the daemon's HTTP endpoints."""
        if not origin or not self.origins:
            return False
        return self.any_origin or origin.rstrip("/") in self.origins

    def cors_headers(self, origin: str) -> dict[str, str]:
        """Headers for an actual (non-preflight) response to `origin`."""
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        }

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to an OPTIONS preflight on a CORS path."""
        origin = request.headers.get(hdrs.ORIGIN)
        if not self.origin_allowed(origin):
            return web.json_response(
                {"error": "Origin not allowed"}, status=403, headers={"Vary": "Origin"}
            )
        assert origin is not None
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )


BROWSER = web.AppKey("browser_access", BrowserAccess)


def add_browser_http(app: web.Application, settings: Settings) -> None:
    """Install the client-address middleware (first) and CORS (preflight and headers)."""
    access = BrowserAccess(settings)
    app[BROWSER] = access

    @web.middleware
    async def real_client(request: web.Request, handler: Any) -> web.StreamResponse:
        trusted = is_trusted(request.remote, access.networks)
        request[TRUSTED] = trusted
        request[CLIENT] = client_address(
            request.remote, request.headers.get("X-Forwarded-For"), access.networks
        )
        response: web.StreamResponse = await handler(request)
        return response

    @web.middleware
    async def cors(request: web.Request, handler: Any) -> web.StreamResponse:
        if (
            request.method == "OPTIONS"
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and CORS_PATHS.match(request.path)
        ):
            return access.preflight(request)
        response: web.StreamResponse = await handler(request)
        return response

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        if request.get(PROXIED) or not CORS_PATHS.match(request.path):
            return
        origin = request.headers.get(hdrs.ORIGIN)
        if access.origin_allowed(origin):
            assert origin is not None
            response.headers.update(access.cors_headers(origin))
        if access.origins:
            response.headers.add("Vary", "Origin")

    app.middlewares.insert(0, real_client)
    app.middlewares.append(cors)
    app.on_response_prepare.append(add_headers)
