"""The preview proxy's decisions, as plain functions (no I/O, no aiohttp server objects).

- which headers go upstream and come back (hop-by-hop removed, `X-Forwarded-*` set,
  `Host: localhost:{port}`, the daemon's own credentials taken out);
- how `Location` and `Set-Cookie` are rewritten so redirects and cookies stay inside the
  proxied URL space;
- whether a port may be reached at all, and by whom;
- the host-form pattern (`--preview-host`) and the signed preview cookie.

`aetherd/transport/proxy.py` applies these at the aiohttp edge.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import html
import ipaddress
import re
import string
from collections.abc import Callable, Collection, Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""RFC 9110 section 7.6.1 hop-by-hop fields (plus the non-standard Proxy-Connection)."""

WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
"""Handshake fields each side of a relayed WebSocket negotiates for itself."""

FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix")
COOKIE_NAME = "aetherd_preview"
MAX_PORT = 65535


def connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names a `Connection` field lists: they are hop-by-hop for this message too."""
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(part.strip().lower() for part in value.split(",") if part.strip())
    return listed


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop fields (fixed and `Connection`-listed ones)."""
    items = list(headers)
    drop = HOP_BY_HOP | connection_listed(items)
    return [(name, value) for name, value in items if name.lower() not in drop]


def strip_cookie(header: str, name: str = COOKIE_NAME) -> str | None:
    """A `Cookie` header without the cookie `name`; None when nothing is left."""
    kept = [
        part.strip()
        for part in header.split(";")
        if part.strip() and part.strip().split("=", 1)[0].strip() != name
    ]
    return "; ".join(kept) if kept else None


def cookie_values(header: str, name: str = COOKIE_NAME) -> list[str]:
    """Every value of cookie `name` in a `Cookie` header (a browser may send several)."""
    values = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            values.append(value.strip().strip('"'))
    return values


def strip_query_param(query_string: str, name: str, keep: Callable[[str], bool]) -> str:
    """The raw query string without `name=value` pairs for which `keep(value)` is false.

    Other pairs keep their exact bytes (no re-encoding), so the upstream sees them as sent.
    """
    from urllib.parse import unquote_plus

    kept = []
    for pair in query_string.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        if unquote_plus(key) == name and not keep(unquote_plus(value)):
            continue
        kept.append(pair)
    return "&".join(kept)


def split_subprotocols(header: str | None) -> list[str]:
    """The offered subprotocols, in order."""
    if not header:
        return []
    return [item.strip() for item in header.split(",") if item.strip()]


def strip_subprotocol_token(
    offered: list[str], is_daemon_token: Callable[[str], bool]
) -> list[str]:
    """Offered subprotocols without a `Bearer, TOKEN` (or `access_token, TOKEN`) pair
    that carries the daemon's token; the app's own subprotocols stay."""
    result: list[str] = []
    index = 0
    while index < len(offered):
        item = offered[index]
        if (
            item.lower() in ("bearer", "access_token")
            and index + 1 < len(offered)
            and is_daemon_token(offered[index + 1])
        ):
            index += 2
            continue
        result.append(item)
        index += 1
    return result


def upstream_headers(
    headers: Iterable[tuple[str, str]],
    *,
    port: int,
    client: str,
    trusted_peer: bool,
    scheme: str,
    host: str,
    prefix: str | None,
    drop_authorization: bool,
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The request headers sent to the workspace port.

    Hop-by-hop fields go; `Host` becomes `localhost:{port}` (dev servers' host checks
    expect it); `X-Forwarded-*` are set, keeping a trusted proxy's values in front of
    ours; the preview cookie, and an `Authorization` that holds the daemon's token, go.
    """
    items = end_to_end(headers)
    incoming = CIMultiDict(items)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lower = name.lower()
        if lower in ("host", "content-length") or lower in FORWARDED:
            continue
        if websocket and lower in WEBSOCKET_HANDSHAKE:
            continue
        if lower == "authorization" and drop_authorization:
            continue
        if lower == "cookie":
            stripped = strip_cookie(value)
            if stripped is not None:
                out.add(name, stripped)
            continue
        out.add(name, value)
    if not websocket and "content-length" in incoming:
        out["Content-Length"] = incoming["content-length"]
    out["Host"] = f"localhost:{port}"
    chain = incoming.get("x-forwarded-for", "").strip() if trusted_peer else ""
    out["X-Forwarded-For"] = f"{chain}, {client}" if chain else client
    out["X-Forwarded-Proto"] = (
        incoming.get("x-forwarded-proto", scheme) if trusted_peer else scheme
    ).strip() or scheme
    out["X-Forwarded-Host"] = (
        incoming.get("x-forwarded-host", host) if trusted_peer else host
    ).strip() or host
    if prefix is not None:
        out["X-Forwarded-Prefix"] = prefix
    return out


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0", "[::]")


def rewrite_location(value: str, port: int, prefix: str | None) -> str:
    """Keep a redirect inside the proxied URL space.

    `http(s)://localhost:{port}/x` (or 127.0.0.1, [::1]) becomes `/x` in the host form and
    `{prefix}/x` in the path form; in the path form an absolute path `/x` gets the prefix
    too. Anything else (another host, a relative reference) is left alone.
    """
    base = prefix or ""
    if value.startswith("//"):
        return value
    if value.startswith("/"):
        return base + value if prefix is not None and not value.startswith(base + "/") else value
    try:
        parts = urlsplit(value)
        target_port = parts.port
    except ValueError:
        return value
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        return value
    host = parts.netloc.rpartition("@")[2].rsplit(":", 1)[0].lower()
    if host not in _LOCAL_HOSTS or target_port != port:
        return value
    path = parts.path or "/"
    rewritten = base + path
    if parts.query:
        rewritten += "?" + parts.query
    if parts.fragment:
        rewritten += "#" + parts.fragment
    return rewritten


_COOKIE_PATH = re.compile(r"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE)
_COOKIE_DOMAIN = re.compile(r";\s*domain\s*=\s*(localhost|127\.0\.0\.1|\[?::1\]?)\s*(?=;|$)", re.I)


def rewrite_set_cookie(value: str, prefix: str | None) -> str:
    """A `Set-Cookie` that stays inside the proxied URL space.

    A `Domain` naming localhost goes (the cookie becomes host-only on the proxy's host).
    In the path form, `Path=/x` becomes `Path={prefix}/x`, and a cookie without a Path
    gets `Path={prefix}/` so the app's cookies do not leak to the daemon's other paths.
    """
    value = _COOKIE_DOMAIN.sub("", value)
    if prefix is None:
        return value
    if _COOKIE_PATH.search(value):

        def repl(match: re.Match[str]) -> str:
            path = match.group(2).strip()
            if not path.startswith("/"):
                path = "/"
            return match.group(1) + prefix + path

        return _COOKIE_PATH.sub(repl, value, count=1)
    return value + f"; Path={prefix}/"


def downstream_headers(
    headers: Iterable[tuple[str, str]], *, port: int, prefix: str | None
) -> CIMultiDict[str]:
    """The upstream's response headers as sent to the client (hop-by-hop removed,
    `Location` and `Set-Cookie` rewritten)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in end_to_end(headers):
        lower = name.lower()
        if lower == "location":
            value = rewrite_location(value, port, prefix)
        elif lower == "set-cookie":
            value = rewrite_set_cookie(value, prefix)
        out.add(name, value)
    return out


# -- Access ------------------------------------------------------------------------------


class Access(enum.Enum):
    """What to do with a proxied request before it touches the upstream."""

    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    ALLOW = "allow"


def parse_port(text: str) -> int | None:
    """A port number from a URL segment: digits only, 1-65535."""
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= MAX_PORT else None


def decide_access(
    port: int | None,
    *,
    refused_ports: Collection[int],
    public: bool,
    authenticated: bool,
) -> Access:
    """404 for a bad port, the daemon's own and ignored ones; public ports need nothing;
    private ones need the daemon's token or the preview cookie."""
    if port is None or port in refused_ports:
        return Access.NOT_FOUND
    if public or authenticated:
        return Access.ALLOW
    return Access.UNAUTHORIZED


def is_trusted(
    address: str | None, networks: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """True when `address` lies in one of `networks`."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def client_address(
    peer: str | None,
    forwarded_for: str | None,
    networks: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str | None:
    """The real client: the peer, unless the peer is a trusted proxy, in which case the
    right-most `X-Forwarded-For` entry that is not itself a trusted proxy."""
    if not forwarded_for or not is_trusted(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


# -- Host form ---------------------------------------------------------------------------


class HostPattern:
    """`--preview-host`, such as `{port}-{workspacePrefix}.preview.example.com`.

    A request whose Host (without its `:port`, unless the pattern names one) matches is
    proxied to that port at the root path. Matching ignores case.
    """

    def __init__(self, pattern: str, workspace_id: str, preview_token: str = "") -> None:
        values = {
            "workspaceId": workspace_id,
            "workspacePrefix": workspace_id[:8],
            "previewToken": preview_token,
        }
        regex = ""
        for literal, field, _, _ in string.Formatter().parse(pattern):
            regex += re.escape(literal.lower())
            if field == "port":
                regex += r"(?P<port>[0-9]{1,5})"
            elif field is not None:
                regex += re.escape(values[field].lower())
        self.pattern = pattern
        self.with_port = ":" in pattern
        self._regex = re.compile(regex)

    def match(self, host: str | None) -> int | None:
        """The port a Host header names, or None when it is not a preview host."""
        if not host:
            return None
        host = host.strip().lower()
        if not self.with_port:
            if host.startswith("["):
                return None
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        found = self._regex.fullmatch(host)
        if found is None:
            return None
        return parse_port(found.group("port")) or 0


# -- The preview cookie ------------------------------------------------------------------


class CookieSigner:
    """Issues and checks `aetherd_preview` values: `{expiry}.{hmac}` bound to one scope
    (a port in the path form, a host in the host form). The key is derived from a secret
    kept in the data directory and the configured tokens, so changing the token revokes
    every cookie."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, scope: str, expiry: int) -> str:
        message = f"aetherd-preview|{scope}|{expiry}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self, scope: str, now: float, max_age: int) -> str:
        """A cookie value valid for `max_age` seconds from `now`."""
        expiry = int(now) + max_age
        return f"{expiry}.{self._mac(scope, expiry)}"

    def verify(self, value: str, scope: str, now: float) -> bool:
        """True when `value` was issued for `scope` and has not expired."""
        expiry_text, sep, mac = value.partition(".")
        if not sep or not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        if expiry < now:
            return False
        return hmac.compare_digest(mac, self._mac(scope, expiry))


# -- Pages -------------------------------------------------------------------------------


def unavailable_page(port: int, retry_seconds: int = 2) -> str:
    """The 502 page: nothing listens on `port` yet; it reloads itself every 2 s."""
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{retry_seconds}">'
        f"<title>Port {port} is not listening</title></head>\n"
        '<body style="font-family:sans-serif;margin:3em">'
        f"<h1>Nothing is listening on port {port}</h1>"
        f"<p>Start the server in the workspace; this page retries every {retry_seconds} s.</p>"
        "</body></html>\n"
    )


def timeout_page(port: int, seconds: float) -> str:
    """The 504 page."""
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f'<title>Port {port} timed out</title></head>\n<body style="font-family:sans-serif;'
        f'margin:3em"><h1>Port {port} did not answer within {html.escape(f"{seconds:g}")} s</h1>'
        "</body></html>\n"
    )
