"""Where the client connects: a URL and a token, resolved once.

Accepted URL forms:

- the connect URL `aetherd serve` prints, `ws://127.0.0.1:3001/workspaces/local/ws?token=T`
  (the token is taken out of the URL and sent in a header instead);
- any `ws://`, `wss://`, `http://` or `https://` URL of the socket endpoint;
- a bare base such as `http://127.0.0.1:3001` or `127.0.0.1:3001` (the workspace id
  then defaults to `local`, or comes from `workspace=`).

`resolve()` adds the CLI's defaults: flags, then `AETHERD_URL` / `AETHERD_TOKEN`, then
the local daemon (its port from `AETHERD_PORT`, its token file in its data dir).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aetherd.client.errors import AetherdError

__all__ = ["Target", "default_data_dir", "resolve"]

DEFAULT_PORT = 3001
DEFAULT_WORKSPACE = "local"
_WS_PATH = re.compile(r"^(?P<prefix>.*?)/workspaces/(?P<id>[^/]+)(?:/ws)?/?$")


@dataclass(frozen=True)
class Target:
    """A daemon's socket URL (without any token), its HTTP base, and the token."""

    ws_url: str
    http_base: str  # ends with /workspaces/{id}
    workspace_id: str
    token: str | None

    @classmethod
    def parse(cls, url: str, token: str | None = None, workspace: str | None = None) -> Target:
        """A target from any accepted URL form; a `?token=` in the URL is moved out."""
        if "://" not in url:
            url = "ws://" + url
        parts = urlsplit(url)
        scheme = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}.get(parts.scheme)
        if scheme is None or not parts.netloc:
            raise AetherdError("INVALID_URL", f"not a daemon URL: {url!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_token = next((value for key, value in query if key == "token"), None)
        rest = [(key, value) for key, value in query if key != "token"]
        match = _WS_PATH.match(parts.path)
        if match:
            prefix, workspace_id = match["prefix"], match["id"]
        else:
            prefix, workspace_id = parts.path.rstrip("/"), workspace or DEFAULT_WORKSPACE
        path = f"{prefix}/workspaces/{workspace_id}"
        http = "https" if scheme == "wss" else "http"
        ws_url = urlunsplit((scheme, parts.netloc, path + "/ws", urlencode(rest), ""))
        http_base = urlunsplit((http, parts.netloc, path, "", ""))
        return cls(ws_url, http_base, workspace_id, token or url_token)

    def http_url(self, path: str) -> str:
        """An HTTP endpoint of the workspace, e.g. `files/content`."""
        return f"{self.http_base}/{path.lstrip('/')}"


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """The daemon's default data dir: `$AETHERD_DATA_DIR`, `$XDG_DATA_HOME/aetherd`, or
    `~/.local/share/aetherd` (the same rule as the daemon's settings)."""
    if environ.get("AETHERD_DATA_DIR"):
        return Path(environ["AETHERD_DATA_DIR"])
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "aetherd"


def _read_token_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def resolve(
    url: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """The CLI's target: flags, then the environment, then the local daemon's defaults.

    - URL: `url`, else `AETHERD_URL`, else `127.0.0.1:$AETHERD_PORT` (3001) with
      workspace `$AETHERD_WORKSPACE_ID` (`local`).
    - Token: `token`, else a token in the URL, else `AETHERD_TOKEN`, else the file
      `$AETHERD_TOKEN_FILE`, else the token the local daemon generated in its data dir.
    """
    env = os.environ if environ is None else environ
    chosen = url or env.get("AETHERD_URL")
    if not chosen:
        port = env.get("AETHERD_PORT") or str(DEFAULT_PORT)
        chosen = f"ws://127.0.0.1:{port}"
    target = Target.parse(chosen, token, env.get("AETHERD_WORKSPACE_ID"))
    if target.token:
        return target
    found = env.get("AETHERD_TOKEN") or None
    if found is None and env.get("AETHERD_TOKEN_FILE"):
        found = _read_token_file(Path(env["AETHERD_TOKEN_FILE"]))
    if found is None:
        found = _read_token_file(default_data_dir(env) / "token")
    return Target(target.ws_url, target.http_base, target.workspace_id, found)
