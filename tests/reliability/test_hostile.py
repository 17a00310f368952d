"""The hostile corpus: what the adversarial review of issue 11 tried and saw HOLD, kept held.

Only what the other test modules do not already cover (see tests/transport/test_auth.py,
tests/channels/test_files.py, tests/services/test_jail.py, tests/services/test_config.py
and tests/transport/test_websocket.py): every bad token form on every authenticated
endpoint, JWT `alg` confusion with the real public key and `alg: none`, the path jail over
the wire (dangling and chained symlinks, /proc, NUL everywhere), malformed frames and
WebSocket protocol abuse, YAML bombs through the config channel and on disk, 300
concurrent connections, and a flood from a client that never reads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import TOKEN
from tests.support import RawWebSocket, wait_for

# -- helpers ---------------------------------------------------------------------------------


async def raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 request; (status, body). Nothing is normalised on the way."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:
            head = exc.partial
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else -1
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    finally:
        writer.close()
    return status, body


def get(path: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def upgrade_headers() -> list[bytes]:
    return [
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]


def endpoints(ws_id: str) -> dict[str, bytes]:
    base = f"/workspaces/{ws_id}".encode()
    return {
        "ws": base + b"/ws",
        "info": base + b"/info",
        "files": base + b"/files/content?path=/f.txt",
        "schema": base + b"/config/schema",
        "protocol": base + b"/protocol.json",
        "proxy": base + b"/ports/9/",
    }


def with_query(path: bytes, query: bytes) -> bytes:
    return path + (b"&" if b"?" in path else b"?") + query


async def status_of(port: int, name: str, path: bytes, *headers: bytes) -> int:
    extra = upgrade_headers() if name == "ws" else []
    request = get(path, *extra, *headers)
    # Connection: close is replaced by Upgrade on the ws endpoint.
    if name == "ws":
        request = request.replace(b"Connection: close\r\n", b"")
    status, body = await raw_http(port, request)
    if status == 401:
        assert json.loads(body) == {"error": "Unauthorized"}, body
    return status


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, so that any `alg` and any key bytes can be used."""
    signing = b64url(json.dumps(header).encode()) + b"." + b64url(json.dumps(claims).encode())
    signature = b"" if key is None else b64url(hmac.new(key, signing, hashlib.sha256).digest())
    return (signing + b"." + signature).decode()


# -- authentication --------------------------------------------------------------------------

BAD_QUERY_TOKENS = [
    b"",
    b"%20",
    TOKEN.encode() + b"%20",
    b"%20" + TOKEN.encode(),
    TOKEN.upper().encode(),
    TOKEN.encode() + b"x",
    TOKEN[:-1].encode(),
    TOKEN.encode() * 2,
    TOKEN.encode() + b"%00",
    b"%00",
    b"%FF%FE",
    b"%ED%A0%80",  # a UTF-8-encoded lone surrogate
    TOKEN.encode() + b"%ED%A0%80",
    b"%25" + TOKEN.encode(),
    b"Bearer%20" + TOKEN.encode(),
    b"a.b.c",
    b"x" * 6000,
]

BAD_HEADERS = [
    b"Authorization: Bearer",
    b"Authorization: Bearer ",
    b"Authorization: Bearer " + TOKEN.upper().encode(),
    b"Authorization: Token " + TOKEN.encode(),
    b"Authorization: Bearer" + TOKEN.encode(),
    b"Authorization: Bearer " + TOKEN.encode() + b"\xff",
    b"Authorization: Bearer \xed\xa0\x80",
    b"Authorization: Basic " + base64.b64encode(b"user:" + TOKEN.encode()),
    b"Sec-WebSocket-Protocol: Bearer",
    b"Sec-WebSocket-Protocol: Bearer, ",
    b"Sec-WebSocket-Protocol: Bearer, " + TOKEN[:-1].encode(),
    b"Sec-WebSocket-Protocol: Negotiate, " + TOKEN.encode(),
    b"Sec-WebSocket-Protocol: Bearer, \xff\xfe",
]


async def test_every_bad_token_form_is_refused_on_every_endpoint(daemon):
    port = daemon.server.port
    (daemon.settings.root / "f.txt").write_text("secret")
    for name, path in endpoints(daemon.settings.workspace_id).items():
        # The real token works here, so a 401 below is the token's doing.
        good = await status_of(port, name, with_query(path, b"token=" + TOKEN.encode()))
        assert good in (101, 200, 302), (name, good)  # the proxy sets its cookie, 302
        assert await status_of(port, name, path) == 401, name
        for token in BAD_QUERY_TOKENS:
            status = await status_of(port, name, with_query(path, b"token=" + token))
            assert status == 401, (name, token[:40], status)
        for header in BAD_HEADERS:
            status = await status_of(port, name, path, header)
            assert status == 401, (name, header[:60], status)


@pytest.fixture
def rsa_key(tmp_path: Path) -> tuple[Any, Path, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(pem)
    return private, path, pem


async def test_jwt_alg_confusion_and_alg_none_are_refused(start_daemon, rsa_key):
    private, key_file, pem = rsa_key
    secret = "s3cret-shared-key-for-tests-0123456789"
    running = await start_daemon(token=None, jwt_secret=secret, jwt_public_key_file=key_file)
    port = running.server.port
    info = f"/workspaces/{running.settings.workspace_id}/info".encode()
    exp = int(time.time()) + 300
    claims = {"exp": exp, "sub": "mallory"}

    async def status(token: str) -> int:
        return await status_of(port, "info", info, b"Authorization: Bearer " + token.encode())

    # The real tokens work: a refusal below is the forgery's doing.
    assert await status(jwt.encode(claims, private, algorithm="RS256")) == 200
    assert await status(jwt.encode(claims, secret, algorithm="HS256")) == 200
    forged = [
        # HS256 signed with the public key's PEM bytes (the classic RS256 -> HS256 confusion),
        # with and without the trailing newline, and with the key's DER bytes.
        forge({"alg": "HS256", "typ": "JWT"}, claims, pem),
        forge({"alg": "HS256", "typ": "JWT"}, claims, pem.strip()),
        forge(
            {"alg": "HS256", "typ": "JWT"},
            claims,
            private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        ),
        # alg none, in every spelling, with an empty or a copied signature.
        forge({"alg": "none", "typ": "JWT"}, claims, None),
        forge({"alg": "None", "typ": "JWT"}, claims, None),
        forge({"alg": "NONE", "typ": "JWT"}, claims, None),
        forge({"alg": "nOnE"}, claims, None),
        forge({"alg": "none"}, claims, None).rstrip("."),
        forge({"alg": "none"}, claims, None) + jwt.encode(claims, secret, "HS256").split(".")[2],
        # Other algorithms with the shared secret, and an empty HMAC key.
        forge({"alg": "HS512"}, claims, secret.encode()),
        forge({"alg": "HS256"}, claims, b""),
        # A valid signature over other claims, with the claims swapped.
        _swap_claims(jwt.encode({"exp": exp, "sub": "x"}, secret, "HS256"), claims),
        # No exp at all, and an exp far in the past.
        jwt.encode({"sub": "mallory"}, secret, algorithm="HS256"),
        jwt.encode({"exp": 1}, secret, algorithm="HS256"),
        # kid / jwk / jku headers pointing elsewhere are not followed.
        forge({"alg": "HS256", "kid": "../../../../dev/null"}, claims, b""),
        forge({"alg": "HS256", "jku": "http://127.0.0.1:9/jwks"}, claims, b"attacker"),
    ]
    for token in forged:
        assert await status(token) == 401, token
        ws_path = f"/workspaces/{running.settings.workspace_id}/ws".encode()
        assert await status_of(port, "ws", with_query(ws_path, b"token=" + token.encode())) == 401


def _swap_claims(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(claims).encode()).decode()}.{signature}"


# -- the path jail, over the wire ------------------------------------------------------------


async def _files(client, type_: str, **fields: Any) -> dict[str, Any]:
    return await client.request("files", type_, **fields)


async def test_jail_holds_for_dangling_chained_and_proc_symlinks(daemon, workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.symlink(secret, workspace / "to-secret")
    os.symlink(outside / "not-yet", workspace / "dangling")  # points outside, target missing
    os.symlink("../outside", workspace / "relative-out")
    os.symlink("hop2", workspace / "hop1")
    os.symlink("../outside/secret.txt", workspace / "hop2")
    os.symlink("/proc/self/root", workspace / "proc-root")
    os.symlink("/proc/self/environ", workspace / "environ")
    os.symlink("loop", workspace / "loop")
    (workspace / "inside.txt").write_text("ok")
    client = await daemon.connect()
    refused = {"INVALID_PATH", "NOT_FOUND"}

    for path in ("/to-secret", "/hop1", "/relative-out/secret.txt", "/environ", "/loop"):
        reply = await _files(client, "read", path=path)
        assert reply["success"] is False and reply["code"] in refused, (path, reply)
        assert "TOP-SECRET" not in json.dumps(reply)
    for path in ("/proc-root/etc/passwd", "/proc-root/proc/self/environ"):
        reply = await _files(client, "read", path=path)
        assert reply["success"] is False and reply["code"] in refused, (path, reply)
    # /proc as a workspace path is the workspace's own /proc, which does not exist.
    for path in ("/proc/self/environ", "/proc/1/root/etc/passwd", "/dev/zero"):
        reply = await _files(client, "read", path=path)
        assert reply["success"] is False and reply["code"] in refused, (path, reply)

    # Writes through a link never land outside: a dangling link, a chain, a relative link.
    for path in ("/dangling", "/hop1", "/to-secret", "/relative-out/new.txt", "/loop"):
        reply = await _files(client, "write", path=path, content="PWNED")
        assert reply["success"] is False, (path, reply)
        assert reply["code"] not in ("INTERNAL_ERROR",), reply
    assert not (outside / "not-yet").exists()
    assert not (outside / "new.txt").exists()
    assert secret.read_text() == "TOP-SECRET"

    # The HTTP transfer holds the same line.
    async with aiohttp.ClientSession() as http:
        base = daemon.url(f"/workspaces/{daemon.settings.workspace_id}/files/content")
        for path in ("/to-secret", "/hop1", "/environ", "/proc-root/etc/passwd"):
            async with http.get(base, params={"path": path, "token": TOKEN}) as resp:
                assert resp.status in (400, 404), path
                assert b"TOP-SECRET" not in await resp.read()
        async with http.put(base, params={"path": "/dangling", "token": TOKEN}, data=b"x") as resp:
            assert resp.status in (400, 404), await resp.text()

    # mkdir, delete and rename through a link out are refused; outside is untouched.
    assert (await _files(client, "mkdir", path="/relative-out/d"))["success"] is False
    assert (await _files(client, "delete", path="/relative-out/secret.txt"))["success"] is False
    moved = await _files(client, "rename", oldPath="/inside.txt", newPath="/relative-out/x")
    assert moved["success"] is False
    stolen = await _files(client, "rename", oldPath="/relative-out/secret.txt", newPath="/s")
    assert stolen["success"] is False
    over = await _files(
        client, "rename", oldPath="/inside.txt", newPath="/to-secret", overwrite=True
    )
    # Replacing the link itself is allowed; following it is not.
    assert secret.read_text() == "TOP-SECRET"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    del over

    assert not (outside / "not-yet").exists()
    assert (await _files(client, "list", path="/"))["success"] is True


async def test_nul_in_every_path_field_and_transport(daemon, workspace):
    client = await daemon.connect()
    for type_, fields in (
        ("read", {"path": "/a\x00b"}),
        ("list", {"path": "/\x00"}),
        ("stat", {"path": "\x00"}),
        ("mkdir", {"path": "/d\x00"}),
        ("delete", {"path": "/x\x00/.."}),
        ("rename", {"oldPath": "/a\x00", "newPath": "/b"}),
        ("rename", {"oldPath": "/a", "newPath": "/b\x00"}),
        ("write", {"path": "/w\x00.txt", "content": "x"}),
    ):
        reply = await _files(client, type_, **fields)
        assert reply["success"] is False and reply["code"] == "INVALID_PATH", (type_, reply)
    async with aiohttp.ClientSession() as http:
        base = daemon.url(f"/workspaces/{daemon.settings.workspace_id}/files/content")
        async with http.get(base + f"?path=/a%00b&token={TOKEN}") as resp:
            assert resp.status == 400 and (await resp.json())["code"] == "INVALID_PATH"
        async with http.put(base + f"?path=/a%00b&token={TOKEN}", data=b"x") as resp:
            assert resp.status == 400 and (await resp.json())["code"] == "INVALID_PATH"
    assert sorted(os.listdir(workspace)) == []


# -- malformed frames and WebSocket abuse ----------------------------------------------------

MALFORMED = [
    ("", "INVALID_JSON"),
    ("null", "INVALID_MESSAGE"),
    ("[]", "INVALID_MESSAGE"),
    ("1e999", "INVALID_MESSAGE"),
    ("NaN", "INVALID_MESSAGE"),
    ('{"channel":1,"type":"list"}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":null}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":["list"]}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":"list","requestId":""}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":"list","requestId":' + "9" * 5000 + "}", "INVALID_MESSAGE"),
    (
        '{"channel":"terminal","type":"list","requestId":"r","cols":' + "9" * 20 + "}",
        "INVALID_MESSAGE",
    ),
    ('{"channel":"terminal","type":"list","requestId":"r","x":NaN}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":"list","requestId":"r","x":-Infinity}', "INVALID_MESSAGE"),
    ('{"channel":"terminal","type":"list","requestId":"\\ud800"}', "INVALID_MESSAGE"),
    ("[" * 100_000 + "]" * 100_000, "INVALID_JSON"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, "INVALID_JSON"),
    ('{"channel":"terminal","type":"list"', "INVALID_JSON"),
    ('{"channel":"terminal","type":"list"}garbage', "INVALID_JSON"),
    ("\ufeff{}", "INVALID_JSON"),
]


async def test_malformed_frames_get_an_error_and_the_socket_stays(daemon):
    client = await daemon.connect()
    for text, code in MALFORMED:
        await client.send(text)
        if '"requestId":"r"' in text:
            # A clean requestId still gets its (failed) reply: the client does not wait.
            frame = await client.expect(lambda f: f.get("requestId") == "r")
            assert frame["success"] is False, (text[:60], frame)
        else:
            frame = await client.expect_type("error", "error")
        assert frame["code"] == code, (text[:60], frame)
    # Duplicate keys: the last wins (JSON's usual reading), and the reply matches it.
    await client.send('{"channel":"files","type":"list","channel":"terminal","requestId":"d1"}')
    reply = await client.expect(lambda f: f.get("requestId") == "d1")
    assert reply["channel"] == "terminal" and reply["success"] is True
    assert (await client.request("terminal", "list"))["success"] is True


def _frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    header = bytearray([(0x80 if fin else 0) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        header.append(bit | length)
    elif length < 65536:
        header.append(bit | 126)
        header += struct.pack("!H", length)
    else:
        header.append(bit | 127)
        header += struct.pack("!Q", length)
    if not mask:
        return bytes(header) + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(header) + key + masked


def _closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read until the server closes the TCP connection (a close frame may come first)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            return True
        if not chunk:
            return True
    return False


@pytest.mark.parametrize(
    "abuse",
    [
        "invalid-utf8",
        "reserved-opcode",
        "continuation-without-start",
        "oversized-control",
        "rsv-bits",
    ],
)
async def test_websocket_protocol_abuse_drops_only_that_socket(daemon, abuse):
    other = await daemon.connect()
    raw = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        assert " 101 " in raw.status_line
        data = {
            "invalid-utf8": _frame(0x1, b'{"channel":"\xff\xfe"}'),
            "reserved-opcode": _frame(0x3, b"x"),
            "continuation-without-start": _frame(0x0, b"x"),
            "oversized-control": _frame(0x9, b"p" * 200),
            "rsv-bits": bytes([0xF1]) + _frame(0x1, b"{}")[1:],
        }[abuse]
        await asyncio.to_thread(raw.sock.sendall, data)
        assert await asyncio.to_thread(_closed_by_server, raw.sock)
    finally:
        raw.close()
    await wait_for(lambda: len(daemon.daemon.hub) == 1)
    assert (await other.request("terminal", "list"))["success"] is True


async def test_an_unmasked_client_frame_is_read_like_any_other(daemon):
    """RFC 6455 asks servers to fail unmasked client frames; aiohttp tolerates them.

    Masking protects intermediaries from browsers, not the daemon: what matters is that the
    frame goes through the same checks as any other and the socket keeps working.
    """
    raw = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", daemon.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        await asyncio.to_thread(raw.sock.sendall, _frame(0x1, b'{"channel":1}', mask=False))
        raw.send_text('{"channel":"terminal","type":"list","requestId":"after"}')
        seen = b""
        deadline = time.monotonic() + 10
        while b'"after"' not in seen and time.monotonic() < deadline:
            seen += await asyncio.to_thread(raw.sock.recv, 65536)
        assert b"INVALID_MESSAGE" in seen and b'"after"' in seen
    finally:
        raw.close()


# -- YAML bombs through the config channel and on disk ---------------------------------------


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["a0: &a0 [lol]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


async def test_yaml_bombs_via_the_config_channel_and_on_disk(daemon, workspace):
    client = await daemon.connect()
    good = await client.request("config", "set", raw="env:\n  GOOD: '1'\n")
    assert good["success"] is True, good
    config_path = workspace / daemon.settings.config_path
    before = config_path.read_text()
    bombs = [
        billion_laughs(),
        "a: &a [*a]\n",
        "env: &e {X: *e}\n",
        "a: &a ['lol','lol','lol']\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nenv: {X: *g}\n",
        "!!python/object/apply:os.system ['touch /tmp/aetherd-pwned']\n",
        "env: !!binary aGVsbG8=\n",
    ]
    for bomb in bombs:
        for type_ in ("set", "validate"):
            reply = await client.request("config", type_, raw=bomb, timeout=20)
            if type_ == "set":
                assert reply["success"] is False and reply["code"] == "INVALID_CONFIG", reply
            else:
                assert reply["success"] is True and reply["data"]["valid"] is False, reply
    assert config_path.read_text() == before
    assert not await asyncio.to_thread(os.path.exists, "/tmp/aetherd-pwned")

    # The same bomb written from a shell: the last good config stays in force.
    config_path.write_text(billion_laughs())
    changed = await client.expect_type("config", "changed", timeout=20, source="disk")
    assert changed["valid"] is False
    snapshot = await client.request("config", "get")
    assert snapshot["data"]["config"]["env"] == {"GOOD": "1"}
    async with aiohttp.ClientSession() as http, http.get(daemon.url("/healthz")) as resp:
        assert resp.status == 200


# -- 300 concurrent connections --------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_300_concurrent_connections(daemon):
    limit = daemon.settings.max_connections
    fds_before = _fd_count()
    sessions = [aiohttp.ClientSession() for _ in range(300)]

    async def attempt(session: aiohttp.ClientSession) -> Any:
        try:
            return await session.ws_connect(daemon.ws_url, params={"token": TOKEN})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status

    try:
        results = await asyncio.gather(*(attempt(s) for s in sessions))
        accepted = [r for r in results if not isinstance(r, int)]
        refused = [r for r in results if isinstance(r, int)]
        assert set(refused) <= {503}, set(refused)
        assert len(accepted) + len(refused) == 300
        assert 1 <= len(accepted) <= limit, len(accepted)
        await wait_for(lambda: len(daemon.daemon.hub) == len(accepted), timeout=30)
        # Every accepted socket is served.
        for index, ws in enumerate(accepted[:: max(1, len(accepted) // 20)]):
            await ws.send_json({"channel": "terminal", "type": "list", "requestId": f"r{index}"})
            for _ in range(100):
                frame = await ws.receive_json(timeout=10)
                if frame.get("requestId") == f"r{index}":
                    assert frame["success"] is True
                    break
            else:
                raise AssertionError("no reply")
        for ws in accepted:
            await ws.close()
    finally:
        for session in sessions:
            await session.close()
    await wait_for(lambda: len(daemon.daemon.hub) == 0, timeout=30)
    # Nothing was left open by the daemon side either (same process: client and server).
    await wait_for(lambda: _fd_count() <= fds_before + 5, timeout=30)
    client = await daemon.connect()
    assert (await client.request("terminal", "list"))["success"] is True


# -- a flood from a client that never reads --------------------------------------------------


async def test_flood_from_a_client_that_never_reads_is_bounded_and_dropped(start_daemon):
    queue_bytes = 1024 * 1024  # the smallest the setting allows
    running = await start_daemon(send_queue_bytes=queue_bytes, write_timeout=1.0)
    other = await running.connect()
    raw = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", running.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            for peer in running.daemon.hub:
                peak = max(peak, peer.queued_bytes)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        assert " 101 " in raw.status_line
        # Each frame provokes a ~60 KB error frame; this client reads none of them.
        frame = '{"channel":"activity","type":"' + "f" * 60_000 + '","requestId":"x"}'
        sender = asyncio.create_task(asyncio.to_thread(raw.send_many, frame, 2000))
        await wait_for(lambda: len(running.daemon.hub) == 1, timeout=30)
        raw.close()
        await sender
    finally:
        done.set()
        await sampler
        raw.close()
    # The largest frame is ~60 KB: the queue never held more than its bound plus one frame.
    assert peak <= queue_bytes + 70_000, peak
    assert (await other.request("terminal", "list"))["success"] is True
