"""Fleet auth: a set of public keys (JWKS or PEM bundle), reloaded when Kubernetes swaps
the ConfigMap, so a key rotation has no outage. Real RSA/EC/Ed25519 keys, real JWTs,
a real daemon on loopback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from aetherd.errors import SettingsError
from aetherd.settings import Settings
from aetherd.transport.access import AUTH
from aetherd.transport.auth import Authenticator, parse_key_set
from tests.support import wait_for

WID = "ws-test"


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private, kid: str | None) -> dict:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else None
    if algorithm is None:
        algorithm = (
            jwt.algorithms.ECAlgorithm
            if isinstance(private, ec.EllipticCurvePrivateKey)
            else jwt.algorithms.OKPAlgorithm
        )
    entry = json.loads(algorithm.to_jwk(private.public_key()))
    if kid is not None:
        entry["kid"] = kid
    entry["use"] = "sig"
    return entry


def _jwks(*entries: dict) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def _pem(private) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _token(private, algorithm: str = "RS256", kid: str | None = None, **claims) -> str:
    payload = {"exp": int(time.time()) + 120, "wid": WID, "aud": "aetherd", **claims}
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, private, algorithm=algorithm, headers=headers)


async def _status(url: str, token: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status


class ConfigMapDir:
    """A directory laid out as the kubelet mounts a ConfigMap: `keys.json ->
    ..data/keys.json`, `..data -> ..<timestamp>`; an update writes a new timestamped
    directory and renames a new `..data` symlink over the old one (atomic swap)."""

    def __init__(self, base: Path, name: str = "keys.json") -> None:
        self.base = base
        self.name = name
        self.generation = 0
        base.mkdir()
        (base / name).symlink_to(Path("..data") / name)

    @property
    def path(self) -> Path:
        return self.base / self.name

    def publish(self, data: bytes) -> None:
        self.generation += 1
        version = self.base / f"..2026_12_03_{self.generation:04d}"
        version.mkdir()
        (version / self.name).write_bytes(data)
        tmp = self.base / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.base / "..data")


def _kids(running) -> set[str | None]:
    state = running.app[AUTH].key_state
    return {key.kid for key in state.keys} if state else set()


async def test_rotation_through_a_configmap_swap_has_no_outage(start_daemon, tmp_path: Path):
    old, new = _rsa(), _rsa()
    mount = ConfigMapDir(tmp_path / "jwt-keys")
    mount.publish(_jwks(_jwk(old, "2026-11")))
    running = await start_daemon(
        token=None,
        jwt_public_key_file=mount.path,
        jwt_workspace_claim="wid",
        jwt_audience="aetherd",
        jwt_key_reload_interval=0.05,
    )
    info = running.url(f"/workspaces/{WID}/info")
    old_token = _token(old, kid="2026-11")
    new_token = _token(new, kid="2026-12")
    assert await _status(info, old_token) == 200
    assert await _status(info, new_token) == 401  # not published yet

    # Step 1: publish the new key beside the old one. Both are accepted.
    mount.publish(_jwks(_jwk(old, "2026-11"), _jwk(new, "2026-12")))
    await wait_for(lambda: _kids(running) == {"2026-11", "2026-12"}, timeout=10)
    assert await _status(info, old_token) == 200
    assert await _status(info, new_token) == 200
    # A socket opened with the old token during the overlap works too.
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(running.ws_url, protocols=("Bearer", old_token)) as ws,
    ):
        assert ws.protocol == "Bearer"

    # Step 2: the old key is withdrawn. Its tokens are refused, even unexpired ones.
    mount.publish(_jwks(_jwk(new, "2026-12")))
    await wait_for(lambda: _kids(running) == {"2026-12"}, timeout=10)
    assert await _status(info, old_token) == 401
    assert await _status(info, _token(old)) == 401  # without a kid: tried against all, fails
    assert await _status(info, new_token) == 200

    # The new key's tokens are still checked claim by claim.
    assert await _status(info, _token(new, kid="2026-12", wid="ws-other")) == 401
    assert await _status(info, _token(new, kid="2026-12", aud="elsewhere")) == 401
    expired = _token(new, kid="2026-12", exp=int(time.time()) - 5)
    assert await _status(info, expired) == 401
    # A kid that names the new key but a signature by another key.
    assert await _status(info, _token(_rsa(), kid="2026-12")) == 401


async def test_a_broken_update_keeps_the_keys_in_force(start_daemon, tmp_path: Path, caplog):
    key = _rsa()
    mount = ConfigMapDir(tmp_path / "jwt-keys")
    mount.publish(_jwks(_jwk(key, "k1")))
    running = await start_daemon(
        token=None, jwt_public_key_file=mount.path, jwt_key_reload_interval=0.05
    )
    info = running.url(f"/workspaces/{WID}/info")
    auth = running.app[AUTH]
    before = auth.key_state
    mount.publish(b'{"keys": [ truncated')
    await wait_for(lambda: "keeping the keys in force" in caplog.text, timeout=10)
    assert auth.key_state is before
    assert await _status(info, _token(key, kid="k1")) == 200
    # The next good update is picked up.
    mount.publish(_jwks(_jwk(key, "k2")))
    await wait_for(lambda: _kids(running) == {"k2"}, timeout=10)
    assert await _status(info, _token(key, kid="k2")) == 200
    # Logged once, not on every poll.
    assert caplog.text.count("keeping the keys in force") == 1


async def test_a_pem_bundle_holds_several_kinds_of_key(start_daemon, tmp_path: Path):
    keys = [
        (_rsa(), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ]
    bundle = tmp_path / "keys.pem"
    bundle.write_bytes(b"# the fleet's signing keys\n" + b"".join(_pem(k) for k, _ in keys))
    running = await start_daemon(token=None, jwt_public_key_file=bundle)
    info = running.url(f"/workspaces/{WID}/info")
    for private, algorithm in keys:
        assert await _status(info, _token(private, algorithm)) == 200, algorithm
    # Not in the bundle: refused. An HS256 token: refused (a public key never verifies
    # HMAC; tests/reliability/test_hostile.py forges one with the key's bytes).
    assert await _status(info, _token(_rsa())) == 401
    assert await _status(info, _token("x" * 64, "HS256")) == 401


def test_key_files_that_are_refused():
    private = _rsa()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases = {
        "private key": _pem(private) + private_pem,
        "no public key": b"nothing here\n",
        "not a JWKS": b'{"kty": "RSA"}',
        "bad JSON": b"{",
        "symmetric": _jwks({"kty": "oct", "k": "c2VjcmV0LXNlY3JldA", "kid": "hs"}),
        "too many": _jwks(*[_jwk(private, f"k{i}") for i in range(3)]),
    }
    for name, data in cases.items():
        with pytest.raises(SettingsError):
            parse_key_set(data, max_keys=2)
        assert name
    # An encryption key published beside a signing key is skipped, not an error.
    enc = {**_jwk(private, "enc"), "use": "enc"}
    keys = parse_key_set(_jwks(enc, _jwk(private, "sig")), max_keys=2)
    assert [k.kid for k in keys] == ["sig"] and keys[0].algorithm == "RS256"


def test_a_bad_key_file_stops_the_start(tmp_path: Path):
    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": []}')
    settings = Settings(
        root=tmp_path, data_dir=tmp_path / "data", token=None, jwt_public_key_file=bad
    )
    with pytest.raises(SettingsError, match="holds no public key"):
        Authenticator(settings, [])
