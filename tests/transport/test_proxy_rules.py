"""The preview proxy's pure decisions (aetherd/transport/proxy_rules.py), without sockets."""

from __future__ import annotations

import ipaddress

import pytest

from aetherd.transport import proxy_rules as rules

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_hop_by_hop_and_connection_listed_headers_go():
    headers = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Kept", "yes"),
    ]
    assert rules.end_to_end(headers) == [("X-Kept", "yes")]


def test_upstream_headers_set_host_and_forwarded_fields():
    out = rules.upstream_headers(
        [
            ("Host", "gateway.example"),
            ("Content-Length", "5"),
            ("Cookie", "a=1; aetherd_preview=v; b=2"),
            ("Authorization", "Bearer daemon"),
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
            ("X-Forwarded-Prefix", "/spoofed"),
        ],
        port=5173,
        client="10.0.0.2",
        trusted_peer=True,
        scheme="http",
        host="gateway.example",
        prefix="/workspaces/w/ports/5173",
        drop_authorization=True,
    )
    assert out["Host"] == "localhost:5173"
    assert out["Content-Length"] == "5"
    assert out["Cookie"] == "a=1; b=2"
    assert "Authorization" not in out
    assert out["X-Forwarded-For"] == "203.0.113.1, 10.0.0.2"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "public.example"
    assert out.getall("X-Forwarded-Prefix") == ["/workspaces/w/ports/5173"]


def test_an_untrusted_peer_cannot_forge_forwarded_fields():
    out = rules.upstream_headers(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("Cookie", "aetherd_preview=x"),
        ],
        port=80,
        client="198.51.100.3",
        trusted_peer=False,
        scheme="http",
        host="h:1",
        prefix=None,
        drop_authorization=False,
    )
    assert out["X-Forwarded-For"] == "198.51.100.3"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "h:1"
    assert "X-Forwarded-Prefix" not in out and "Cookie" not in out


def test_websocket_handshake_fields_are_left_to_each_side():
    out = rules.upstream_headers(
        [("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Protocol", "p"), ("Origin", "http://o")],
        port=1,
        client="127.0.0.1",
        trusted_peer=False,
        scheme="http",
        host="h",
        prefix=None,
        drop_authorization=False,
        websocket=True,
    )
    assert "Sec-WebSocket-Key" not in out and "Sec-WebSocket-Protocol" not in out
    assert out["Origin"] == "http://o"


@pytest.mark.parametrize(
    ("location", "prefix", "expected"),
    [
        ("http://localhost:5173/a?b=1#c", "/w/p", "/w/p/a?b=1#c"),
        ("https://127.0.0.1:5173", "/w/p", "/w/p/"),
        ("http://[::1]:5173/x", None, "/x"),
        ("http://localhost:5174/x", "/w/p", "http://localhost:5174/x"),
        ("http://example.com:5173/x", "/w/p", "http://example.com:5173/x"),
        ("/abs", "/w/p", "/w/p/abs"),
        ("/w/p/already", "/w/p", "/w/p/already"),
        ("/abs", None, "/abs"),
        ("rel/x", "/w/p", "rel/x"),
        ("//cdn.example/x", "/w/p", "//cdn.example/x"),
        ("http://localhost:bad/x", "/w/p", "http://localhost:bad/x"),
    ],
)
def test_location_rewrites(location, prefix, expected):
    assert rules.rewrite_location(location, 5173, prefix) == expected


@pytest.mark.parametrize(
    ("cookie", "prefix", "expected"),
    [
        ("a=1; Path=/", "/w/p", "a=1; Path=/w/p/"),
        ("a=1; path=/x; HttpOnly", "/w/p", "a=1; path=/w/p/x; HttpOnly"),
        ("a=1", "/w/p", "a=1; Path=/w/p/"),
        ("a=1; Domain=localhost; Path=/", "/w/p", "a=1; Path=/w/p/"),
        ("a=1; Domain=localhost; Path=/", None, "a=1; Path=/"),
        ("a=1; Domain=example.com", None, "a=1; Domain=example.com"),
    ],
)
def test_set_cookie_rewrites(cookie, prefix, expected):
    assert rules.rewrite_set_cookie(cookie, prefix) == expected


def test_query_token_is_removed_byte_exactly():
    keep = lambda value: value != "secret"  # noqa: E731
    assert rules.strip_query_param("a=%2F&token=secret&b=1+2", "token", keep) == "a=%2F&b=1+2"
    assert rules.strip_query_param("token=vite-own&a=1", "token", keep) == "token=vite-own&a=1"
    assert rules.strip_query_param("token=secret", "token", keep) == ""
    assert rules.strip_query_param("tok%65n=secret", "token", keep) == ""


def test_subprotocol_token_pairs_are_removed():
    is_daemon = lambda token: token == "T"  # noqa: E731
    assert rules.strip_subprotocol_token(["Bearer", "T", "vite-hmr"], is_daemon) == ["vite-hmr"]
    assert rules.strip_subprotocol_token(["access_token", "T"], is_daemon) == []
    assert rules.strip_subprotocol_token(["bearer", "other"], is_daemon) == ["bearer", "other"]


def test_cookies_are_read_and_stripped():
    header = 'x=1; aetherd_preview="v1"; aetherd_preview=v2; y=2'
    assert rules.cookie_values(header) == ["v1", "v2"]
    assert rules.strip_cookie(header) == "x=1; y=2"
    assert rules.strip_cookie("aetherd_preview=v") is None


def test_access_decisions():
    refused = {22, 3001, 8000}
    decide = rules.decide_access
    assert (
        decide(None, refused_ports=refused, public=True, authenticated=True)
        is rules.Access.NOT_FOUND
    )
    assert (
        decide(8000, refused_ports=refused, public=True, authenticated=True)
        is rules.Access.NOT_FOUND
    )
    assert (
        decide(5173, refused_ports=refused, public=True, authenticated=False) is rules.Access.ALLOW
    )
    assert (
        decide(5173, refused_ports=refused, public=False, authenticated=True) is rules.Access.ALLOW
    )
    assert (
        decide(5173, refused_ports=refused, public=False, authenticated=False)
        is rules.Access.UNAUTHORIZED
    )
    assert [
        rules.parse_port(t) for t in ("1", "65535", "0", "65536", "080", "1e3", "-1", "999999")
    ] == [
        1,
        65535,
        None,
        None,
        80,
        None,
        None,
        None,
    ]


def test_real_client_address_behind_trusted_proxies():
    assert rules.client_address("127.0.0.1", "203.0.113.5", LOOPBACK) == "203.0.113.5"
    assert rules.client_address("127.0.0.1", "203.0.113.5, 127.0.0.2", LOOPBACK) == "203.0.113.5"
    assert rules.client_address("198.51.100.1", "203.0.113.5", LOOPBACK) == "198.51.100.1"
    assert rules.client_address("::ffff:127.0.0.1", "203.0.113.5", LOOPBACK) == "203.0.113.5"
    assert rules.client_address("127.0.0.1", None, LOOPBACK) == "127.0.0.1"
    assert rules.client_address("127.0.0.1", "127.0.0.9", LOOPBACK) == "127.0.0.9"
    assert not rules.is_trusted("not-an-ip", LOOPBACK)


def test_host_pattern():
    pattern = rules.HostPattern("{port}-{workspacePrefix}.preview.example.com", "abcdefghijk")
    assert pattern.match("5173-abcdefgh.preview.example.com") == 5173
    assert pattern.match("5173-ABCDEFGH.Preview.Example.com:443") == 5173
    assert pattern.match("5173-abcdefgh.preview.example.com.evil.net") is None
    assert pattern.match("5173-other.preview.example.com") is None
    assert pattern.match("99999-abcdefgh.preview.example.com") == 0  # a port, but impossible
    assert pattern.match(None) is None
    with_port = rules.HostPattern("p{port}.local:8080", "w")
    assert with_port.match("p80.local:8080") == 80 and with_port.match("p80.local") is None


def test_cookie_signatures():
    signer = rules.CookieSigner(b"k" * 32)
    value = signer.issue("port:5173", now=1000, max_age=60)
    assert signer.verify(value, "port:5173", now=1059)
    assert not signer.verify(value, "port:5173", now=1061)  # expired
    assert not signer.verify(value, "port:5174", now=1000)  # another port
    assert not rules.CookieSigner(b"j" * 32).verify(value, "port:5173", now=1000)  # another key
    assert not signer.verify(value.replace(".", ".0", 1), "port:5173", now=1000)
    assert not signer.verify("garbage", "port:5173", now=1000)


def test_error_pages():
    page = rules.unavailable_page(3000)
    assert '<meta http-equiv="refresh" content="2">' in page and "port 3000" in page
    assert "5 s" in rules.timeout_page(3000, 5)
