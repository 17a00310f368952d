"""Domain errors. Every failure a client can see carries one stable code from `ErrorCode`."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """The stable error codes of the wire protocol (PROTOCOL.md section 1)."""

    # Frames
    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_CHANNEL = "UNKNOWN_CHANNEL"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    UNSUPPORTED_FRAME = "UNSUPPORTED_FRAME"
    # Lookups
    NOT_FOUND = "NOT_FOUND"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    TASK_NOT_FOUND = "TASK_NOT_FOUND"
    # Files
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INVALID_PATH = "INVALID_PATH"
    IS_DIRECTORY = "IS_DIRECTORY"
    NOT_DIRECTORY = "NOT_DIRECTORY"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NO_SPACE = "NO_SPACE"
    # State
    CONFLICT = "CONFLICT"
    INVALID_CONFIG = "INVALID_CONFIG"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    BUSY = "BUSY"
    # Agent
    PROVIDER_NOT_CONFIGURED = "PROVIDER_NOT_CONFIGURED"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    # Git
    NOT_A_REPOSITORY = "NOT_A_REPOSITORY"
    GIT_ERROR = "GIT_ERROR"
    GIT_NOT_INSTALLED = "GIT_NOT_INSTALLED"
    # Other
    INTERNAL_ERROR = "INTERNAL_ERROR"


class AetherError(Exception):
    """A failure with a stable code and a message meant for a person.

    `extra` holds additional reply fields (for example `errors` on INVALID_CONFIG);
    they are merged into the reply or error frame.
    """

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.extra = extra

    def __repr__(self) -> str:
        return f"AetherError({self.code.value}, {self.message!r})"


class SettingsError(Exception):
    """A bad daemon setting; the CLI prints it as one line and exits non-zero."""
