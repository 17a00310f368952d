"""Authentication before the upgrade: static tokens (constant-time) and optional JWTs,
verified with a shared secret or a reloadable set of public keys (PEM or JWKS)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from aetherd.errors import SettingsError
from aetherd.logs import redactor
from aetherd.settings import Settings

if TYPE_CHECKING:
    # PyJWT and cryptography are imported on first use (a JWT configured, a JWT-shaped
    # token presented): together about 8 MiB and 40 ms that a daemon with static tokens
    # never needs (docs/performance.md, Start-up).
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    VerifyKey = str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

log = logging.getLogger("aetherd.auth")

SUBPROTOCOL_SCHEMES = ("bearer", "access_token")


@dataclass(frozen=True)
class Presented:
    """A token as the client presented it; `scheme` is the subprotocol word, if any."""

    token: str
    scheme: str | None = None


def extract_token(request: web.Request) -> Presented | None:
    """Find the token in the subprotocol header, `?token=`, or `Authorization: Bearer`."""
    header = request.headers.get("Sec-WebSocket-Protocol")
    if header:
        items = [item.strip() for item in header.split(",")]
        for index, item in enumerate(items[:-1]):
            if item.lower() in SUBPROTOCOL_SCHEMES and items[index + 1]:
                return Presented(items[index + 1], item)
    query_token = request.query.get("token")
    if query_token:
        return Presented(query_token)
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Presented(value.strip())
    return None


def _write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


@dataclass
class TokenSetup:
    """The static tokens in force, and whether one was generated on this start."""

    tokens: list[str]
    generated: bool = False


def setup_tokens(settings: Settings) -> TokenSetup:
    """Collect static tokens; generate and store one (0600) when nothing is configured."""
    tokens: list[str] = []
    if settings.token:
        tokens.append(settings.token)
    if settings.token_file is not None:
        try:
            text = settings.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"cannot read token file {str(settings.token_file)!r}: {exc}"
            ) from None
        if not text:
            raise SettingsError(f"token file {str(settings.token_file)!r} is empty")
        tokens.append(text)
    jwt_configured = bool(settings.jwt_secret or settings.jwt_public_key_file)
    generated = False
    if not tokens and not jwt_configured:
        path = settings.token_path
        try:
            if path.exists():
                stored = path.read_text(encoding="utf-8").strip()
                if not stored:
                    raise SettingsError(f"stored token file {str(path)!r} is empty; delete it")
                tokens.append(stored)
            else:
                token = secrets.token_urlsafe(32)
                _write_private(path, token)
                tokens.append(token)
                generated = True
        except OSError as exc:
            raise SettingsError(f"cannot keep a token in {str(path)!r}: {exc.strerror}") from None
    for token in tokens:
        redactor.add(token)
    return TokenSetup(tokens, generated)


KEY_FILE_BYTES_PER_KEY = 16 * 1024
"""A key file may hold `jwt_max_keys` times this many bytes (a 4096-bit RSA JWK is ~1 KiB)."""

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True)
class PublicKey:
    """One verification key: the algorithm is fixed by the key, never by the token."""

    key: VerifyKey
    algorithm: str
    kid: str | None = None


def _pem_algorithm(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return _EC_ALGORITHMS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise SettingsError("holds a key that is not RSA, EC (P-256/384/521) or Ed25519")


def _parse_pem_bundle(data: bytes) -> list[PublicKey]:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = []
    for match in _PEM_BLOCK.finditer(data):
        if b"PRIVATE" in match.group(1):
            raise SettingsError("holds a private key; give only public keys")
        try:
            key = load_pem_public_key(match.group(0))
        except Exception as exc:
            raise SettingsError(f"has a PEM block that is not a public key: {exc}") from None
        keys.append(PublicKey(key, _pem_algorithm(key)))  # type: ignore[arg-type]  # checked by _pem_algorithm
    return keys


def _parse_jwks(data: bytes) -> list[PublicKey]:
    import jwt

    try:
        document = json.loads(data)
    except ValueError as exc:
        raise SettingsError(f"is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise SettingsError('is JSON but not a JWKS document ({"keys": [...]})')
    keys = []
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict):
            raise SettingsError(f"key {index} is not a JSON object")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key published alongside: not ours to use
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise SettingsError(f"key {index} is not a usable JWK: {exc}") from None
        if jwk.algorithm_name not in _ASYMMETRIC_ALGORITHMS:
            # A symmetric (oct) key would let every holder of the file mint tokens.
            raise SettingsError(
                f"key {index} has algorithm {jwk.algorithm_name}; only public keys "
                f"({', '.join(sorted(_ASYMMETRIC_ALGORITHMS))}) are accepted"
            )
        kid = entry.get("kid")
        keys.append(PublicKey(jwk.key, jwk.algorithm_name, kid if isinstance(kid, str) else None))
    return keys


def parse_key_set(data: bytes, max_keys: int) -> list[PublicKey]:
    """The keys of a key file: a JWKS document (JSON) or PEM public keys, concatenated.

    Raises SettingsError (the message continues "the key file ...") when the file is
    malformed, holds a private or symmetric key, no key at all, or more than `max_keys`.
    """
    if data.lstrip().startswith(b"{"):
        keys = _parse_jwks(data)
    else:
        keys = _parse_pem_bundle(data)
    if not keys:
        raise SettingsError("holds no public key")
    if len(keys) > max_keys:
        raise SettingsError(f"holds {len(keys)} keys, more than jwt_max_keys ({max_keys})")
    return keys


@dataclass(frozen=True)
class KeyFileState:
    """What was loaded, and the identity of the file it came from."""

    stamp: tuple[int, int, int, int]
    keys: list[PublicKey]


def read_key_file(path: Path, max_keys: int, previous: KeyFileState | None) -> KeyFileState | None:
    """Load the key file, or None when it is the one already loaded (blocking: run it in
    the file executor). `stat` follows symlinks, so Kubernetes' ConfigMap update (a new
    directory, then the `..data` symlink swapped to it) shows as a new inode."""
    limit = max_keys * KEY_FILE_BYTES_PER_KEY
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SettingsError(f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SettingsError("is not a regular file")
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if previous is not None and previous.stamp == stamp:
            return None
        if st.st_size > limit:
            raise SettingsError(f"is larger than {limit} bytes")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise SettingsError(f"is larger than {limit} bytes")
    except OSError as exc:
        raise SettingsError(f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    return KeyFileState(stamp, parse_key_set(b"".join(chunks), max_keys))


class Authenticator:
    """Checks a presented token against static tokens and, if configured, JWT keys."""

    def __init__(self, settings: Settings, tokens: list[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]
        self._audience = settings.jwt_audience
        self._workspace_claim = settings.jwt_workspace_claim
        self._workspace_id = settings.workspace_id
        self._secret_keys: list[PublicKey] = []
        if settings.jwt_secret:
            redactor.add(settings.jwt_secret)
            self._secret_keys.append(PublicKey(settings.jwt_secret, "HS256"))
        self.key_file = settings.jwt_public_key_file
        self.max_keys = settings.jwt_max_keys
        self.key_state: KeyFileState | None = None
        if self.key_file is not None:
            try:
                self.key_state = read_key_file(self.key_file, self.max_keys, None)
            except SettingsError as exc:
                raise SettingsError(f"jwt_public_key_file {str(self.key_file)!r} {exc}") from None
            log.info("JWT public keys loaded", extra=self._key_summary())

    def _key_summary(self) -> dict[str, object]:
        keys = self.key_state.keys if self.key_state else []
        return {"keys": len(keys), "kids": [k.kid for k in keys if k.kid]}

    def replace_keys(self, state: KeyFileState) -> None:
        """Swap in a freshly read key set (on the event loop: one reference assignment)."""
        self.key_state = state
        log.info("JWT public keys reloaded", extra=self._key_summary())

    def verify(self, presented: Presented | None) -> bool:
        """True when the token is valid. Static tokens are compared in constant time."""
        if presented is None:
            return False
        candidate = presented.token.encode("utf-8", "surrogateescape")
        matched = False
        for token in self._tokens:
            # No early exit: every configured token is compared, each in constant time.
            matched |= hmac.compare_digest(candidate, token)
        if matched:
            return True
        if (self._secret_keys or self.key_state) and presented.token.count(".") == 2:
            return self._verify_jwt(presented.token)
        return False

    def _candidates(self, token: str) -> list[PublicKey]:
        """The keys to try: with a `kid` in the header, the keys carrying that kid (or,
        when none does, the keys without one); without a kid, every key."""
        import jwt

        keys = self._secret_keys + (self.key_state.keys if self.key_state else [])
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return []
        if not isinstance(kid, str):
            return keys
        named = [k for k in keys if k.kid == kid]
        return named or [k for k in keys if k.kid is None]

    def _verify_jwt(self, token: str) -> bool:
        import jwt

        options: jwt.types.Options = {
            "require": ["exp"],
            "verify_aud": self._audience is not None,
        }
        for key in self._candidates(token):
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self._audience,
                    options=options,
                )
            except jwt.PyJWTError:
                continue
            if self._workspace_claim and claims.get(self._workspace_claim) != self._workspace_id:
                return False
            return True
        return False


async def watch_key_file(
    auth: Authenticator, interval: float, run: Callable[..., Awaitable[KeyFileState | None]]
) -> None:
    """Re-read the key file every `interval` seconds until cancelled; `run` runs the
    blocking read in the file executor. A broken file keeps the keys in force (logged
    once per distinct problem), so a bad rollout never locks every client out."""
    path = auth.key_file
    assert path is not None
    last_problem = ""
    while True:
        await asyncio.sleep(interval)
        try:
            state = await run(read_key_file, path, auth.max_keys, auth.key_state)
        except SettingsError as exc:
            problem = f"jwt_public_key_file {str(path)!r} {exc}"
            if problem != last_problem:
                log.warning("%s; keeping the keys in force", problem)
            last_problem = problem
            continue
        last_problem = ""
        if state is not None:
            auth.replace_keys(state)


def connect_url(settings: Settings, host: str, port: int, token: str) -> str:
    """The ready-to-paste WebSocket URL (the only place a token is ever printed)."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown_host and not shown_host.startswith("["):
        shown_host = f"[{shown_host}]"
    return f"ws://{shown_host}:{port}/workspaces/{settings.workspace_id}/ws?token={quote(token, safe='')}"
