"""Authentication before the upgrade: every token form, 401/404, JWTs, the generated token."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import TOKEN
from tests.support import receive_skipping_pushes


async def _handshake(url: str, **kwargs) -> aiohttp.ClientWebSocketResponse:
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, **kwargs)
    except BaseException:
        await session.close()
        raise
    ws._test_session = session  # type: ignore[attr-defined]
    return ws


async def _close(ws) -> None:
    await ws.close()
    await ws._test_session.close()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "access_token"])
async def test_subprotocol_token_selects_scheme_word(daemon, scheme):
    ws = await _handshake(daemon.ws_url, protocols=(scheme, TOKEN))
    try:
        # The 101 selected exactly the scheme word the client offered, never the token.
        assert ws.protocol == scheme
        assert TOKEN not in (ws._response.headers.get("Sec-WebSocket-Protocol") or "")
        await ws.send_json({"channel": "nope", "type": "x"})
        reply = json.loads((await receive_skipping_pushes(ws, 5)).data)
        assert reply["code"] == "UNKNOWN_CHANNEL"
    finally:
        await _close(ws)


async def test_query_token(daemon):
    ws = await _handshake(daemon.ws_url, params={"token": TOKEN})
    try:
        assert ws.protocol is None
        await ws.send_json({"channel": "activity", "type": "user_activity", "requestId": "r1"})
        reply = json.loads((await receive_skipping_pushes(ws, 5)).data)
        assert reply == {
            "channel": "activity",
            "type": "user_activity",
            "requestId": "r1",
            "success": True,
            "data": None,
        }
    finally:
        await _close(ws)


async def test_query_token_is_url_decoded(start_daemon):
    running = await start_daemon(token="a+b/c=d&e")
    ws = await _handshake(running.ws_url, params={"token": "a+b/c=d&e"})
    await _close(ws)


async def test_authorization_header(daemon):
    ws = await _handshake(daemon.ws_url, headers={"Authorization": f"Bearer {TOKEN}"})
    await _close(ws)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"params": {"token": "wrong"}},
        {"headers": {"Authorization": "Bearer wrong"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        {"protocols": ("Bearer", "wrong")},
        {"protocols": ("Bearer",)},
        {"params": {"token": TOKEN[:-1]}},
    ],
)
async def test_missing_or_bad_token_gets_401_json(daemon, kwargs):
    async with aiohttp.ClientSession() as session:
        headers = dict(kwargs.get("headers", {}))
        if "protocols" in kwargs:
            headers["Sec-WebSocket-Protocol"] = ", ".join(kwargs["protocols"])
        headers.update(
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            }
        )
        async with session.get(daemon.ws_url, params=kwargs.get("params"), headers=headers) as resp:
            assert resp.status == 401
            assert await resp.json() == {"error": "Unauthorized"}


async def test_other_workspace_id_gets_404(daemon):
    async with aiohttp.ClientSession() as session:
        url = daemon.url("/workspaces/another/ws")
        async with session.get(url, params={"token": TOKEN}) as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "Workspace not found"}
        async with session.get(
            daemon.url("/workspaces/another/info"), params={"token": TOKEN}
        ) as resp:
            assert resp.status == 404


async def test_generated_token_is_stored_private_and_reused(start_daemon, tmp_path: Path):
    first = await start_daemon(token=None)
    path = first.settings.token_path
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = path.read_text().strip()
    assert first.token == stored and len(stored) >= 32
    ws = await _handshake(first.ws_url, params={"token": stored})
    await _close(ws)
    second = await start_daemon(token=None)
    assert second.token == stored


async def test_token_file(start_daemon, tmp_path: Path):
    token_file = tmp_path / "tok"
    token_file.write_text("from-a-file\n")
    running = await start_daemon(token=None, token_file=token_file)
    ws = await _handshake(running.ws_url, params={"token": "from-a-file"})
    await _close(ws)
    assert not running.settings.token_path.exists()


def _make_jwt(key, algorithm: str, **claims) -> str:
    payload = {"exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


async def _status(url: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, params={"token": token}) as resp,
    ):
        return resp.status


async def test_jwt_hs256_exp_aud_and_workspace_claim(start_daemon):
    secret = "s3cret-shared-key-for-tests-0123456789"
    running = await start_daemon(
        token=None, jwt_secret=secret, jwt_audience="aether", jwt_workspace_claim="wid"
    )
    info = running.url(f"/workspaces/{running.settings.workspace_id}/info")
    good = _make_jwt(secret, "HS256", aud="aether", wid="ws-test")
    assert await _status(info, good) == 200
    ws = await _handshake(running.ws_url, protocols=("Bearer", good))
    await _close(ws)
    assert await _status(info, _make_jwt(secret, "HS256", aud="other", wid="ws-test")) == 401
    assert await _status(info, _make_jwt(secret, "HS256", aud="aether", wid="ws-other")) == 401
    assert (
        await _status(
            info,
            _make_jwt("wrong-secret-wrong-secret-0123456", "HS256", aud="aether", wid="ws-test"),
        )
        == 401
    )
    expired = jwt.encode(
        {"exp": int(time.time()) - 10, "aud": "aether", "wid": "ws-test"}, secret, algorithm="HS256"
    )
    assert await _status(info, expired) == 401
    no_exp = jwt.encode({"aud": "aether", "wid": "ws-test"}, secret, algorithm="HS256")
    assert await _status(info, no_exp) == 401


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_jwt_public_key(start_daemon, tmp_path: Path, kind: str):
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        algorithm = "RS256"
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        algorithm = "ES256"
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "pub.pem"
    key_file.write_bytes(pem)
    running = await start_daemon(token=None, jwt_public_key_file=key_file)
    info = running.url(f"/workspaces/{running.settings.workspace_id}/info")
    assert await _status(info, _make_jwt(private, algorithm)) == 200
    # Algorithm confusion: an HS256 token signed with the public key bytes is refused.
    forged = jwt.encode({"exp": int(time.time()) + 60}, "x" * 64, algorithm="HS256")
    assert await _status(info, forged) == 401
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    assert await _status(info, _make_jwt(other, algorithm)) == 401
