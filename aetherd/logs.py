"""Logging: JSON lines off a terminal, text on one; connection ids; secrets never logged."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

connection_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aetherd_connection_id", default=None
)


def request_key(name: str, kind: type) -> Any:
    """A typed request-storage key (`web.RequestKey` on aiohttp >= 3.13, else the name)."""
    factory = getattr(web, "RequestKey", None)
    return factory(name, kind) if factory is not None else name


CLIENT_ADDRESS = request_key("aetherd_client_address", str)
"""The real client address of a request, behind trusted proxies (transport/browser.py)."""

_TOKEN_QUERY = re.compile(r"((?:^|[?&])(?:token|access_token)=)[^&\s]*", re.IGNORECASE)
_STD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "conn"}


def redact_url(url: str) -> str:
    """Replace the value of `token=` / `access_token=` query parameters with `***`."""
    return _TOKEN_QUERY.sub(r"\1***", url)


class SecretRedactor(logging.Filter):
    """Defence in depth: scrub known secrets from every record, whatever the code logged."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        """Never let `secret` reach a log line."""
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.conn = connection_id.get()
        if self._secrets:
            message = record.getMessage()
            scrubbed = self._scrub(message)
            if scrubbed != message or record.exc_info:
                record.msg, record.args = scrubbed, None
            for key, value in list(record.__dict__.items()):
                if key not in _STD_ATTRS and isinstance(value, str):
                    setattr(record, key, self._scrub(value))
        return True


redactor = SecretRedactor()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, conn, plus `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        conn = getattr(record, "conn", None)
        if conn:
            entry["conn"] = conn
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redactor._scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the connection id and `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        conn = getattr(record, "conn", None)
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STD_ATTRS and not k.startswith("_")
        )
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname:<7} {record.name}"
        if conn:
            line += f" [{conn}]"
        line += f": {record.getMessage()}"
        if extras:
            line += f" ({extras})"
        if record.exc_info:
            line += "\n" + redactor._scrub(self.formatException(record.exc_info))
        return line


def setup_logging(log_format: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure the root logger once for the daemon."""
    stream = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by AccessLogger below.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log with the token redacted from the query string."""

    def log(self, request: Any, response: Any, duration: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            redact_url(request.path_qs),
            response.status,
            extra={
                # The real client behind a trusted proxy (aetherd/transport/browser.py).
                "remote": request.get(CLIENT_ADDRESS) or request.remote,
                "durationMs": round(duration * 1000, 2),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
