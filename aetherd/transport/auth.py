"""Authentication before the upgrade: static tokens (constant-time) and optional JWTs."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from aetherd.errors import SettingsError
from aetherd.logs import redactor
from aetherd.settings import Settings

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


class Authenticator:
    """Checks a presented token against static tokens and, if configured, JWT keys."""

    def __init__(self, settings: Settings, tokens: list[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]
        self._audience = settings.jwt_audience
        self._workspace_claim = settings.jwt_workspace_claim
        self._workspace_id = settings.workspace_id
        self._jwt_keys: list[
            tuple[str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey, list[str]]
        ] = []
        if settings.jwt_secret:
            redactor.add(settings.jwt_secret)
            self._jwt_keys.append((settings.jwt_secret, ["HS256"]))
        if settings.jwt_public_key_file is not None:
            pem = settings.jwt_public_key_file.read_bytes()
            try:
                public_key = load_pem_public_key(pem)
            except Exception as exc:
                raise SettingsError(
                    f"jwt_public_key_file {str(settings.jwt_public_key_file)!r} is not a PEM public key: {exc}"
                ) from None
            if isinstance(public_key, rsa.RSAPublicKey):
                algorithms = ["RS256"]
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                algorithms = ["ES256"]
            else:
                raise SettingsError("jwt_public_key_file must hold an RSA or EC public key")
            self._jwt_keys.append((public_key, algorithms))

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
        if self._jwt_keys and presented.token.count(".") == 2:
            return self._verify_jwt(presented.token)
        return False

    def _verify_jwt(self, token: str) -> bool:
        options: jwt.types.Options = {
            "require": ["exp"],
            "verify_aud": self._audience is not None,
        }
        for key, algorithms in self._jwt_keys:
            try:
                claims = jwt.decode(
                    token, key, algorithms=algorithms, audience=self._audience, options=options
                )
            except jwt.PyJWTError:
                continue
            if self._workspace_claim and claims.get(self._workspace_claim) != self._workspace_id:
                return False
            return True
        return False


def connect_url(settings: Settings, host: str, port: int, token: str) -> str:
    """The ready-to-paste WebSocket URL (the only place a token is ever printed)."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown_host and not shown_host.startswith("["):
        shown_host = f"[{shown_host}]"
    return f"ws://{shown_host}:{port}/workspaces/{settings.workspace_id}/ws?token={quote(token, safe='')}"
