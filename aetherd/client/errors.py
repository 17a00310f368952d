"""The one exception type of the client: every failure carries a stable `code`.

A failed reply from the daemon raises `AetherdError` with the daemon's code
(`SESSION_NOT_FOUND`, `INVALID_PATH`, ...). Failures that happen on the client's side
use the same type with codes of their own, so a script catches one thing:

| code | meaning |
|---|---|
| `TIMEOUT` | no reply within the request timeout |
| `CONNECTION_LOST` | the socket dropped while the request was in flight, or the client gave up reconnecting |
| `UNAUTHORIZED` | the daemon refused the token (HTTP 401) |
| `WORKSPACE_NOT_FOUND` | no workspace with that id at that address (HTTP 404) |
| `CLOSED` | the client was closed |
| `HTTP_ERROR` | an HTTP transfer failed without a code from the daemon |
"""

from __future__ import annotations

from typing import Any

__all__ = ["AetherdError", "ConnectionLost"]


class AetherdError(Exception):
    """A failure with a stable `code`; `frame` is the daemon's reply when there was one."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame or {}

    def __repr__(self) -> str:
        return f"AetherdError({self.code!r}, {self.message!r})"


class ConnectionLost(AetherdError):
    """The connection dropped under a request, or the client stopped reconnecting."""

    def __init__(self, message: str = "the connection to the daemon was lost") -> None:
        super().__init__("CONNECTION_LOST", message)
