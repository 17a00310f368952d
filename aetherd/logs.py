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


def _encoded_pattern(secret: str) -> re.Pattern[str]:
    """Matches `secret` with any of its characters percent-encoded (either hex case), or a
    space as `+`: the forms a secret takes in a URL's query string."""
    parts = []
    for char in secret:
        encoded = "".join(f"%{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
        options = [re.escape(char), re.escape(encoded)]
        if char == " ":
            options.append(r"\+")
        parts.append("(?:" + "|".join(options) + ")")
    # IGNORECASE makes the hex digits match in either case (and the rest a little wider,
    # which only ever hides more).
    return re.compile("".join(parts), re.IGNORECASE)


class SecretRedactor(logging.Filter):
    """Defence in depth: scrub known secrets from every record, whatever the code logged.

    A secret is scrubbed as given and in its URL-encoded forms (`%2F` or `%2f`), since
    aiohttp logs the raw request line of a malformed request, query string included.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, re.Pattern[str]] = {}

    def add(self, secret: str | None) -> None:
        """Never let `secret` reach a log line."""
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets[secret] = _encoded_pattern(secret)

    def _scrub(self, text: str) -> str:
        encoded = "%" in text or "+" in text
        for secret, pattern in self._secrets.items():
            if secret in text:
                text = text.replace(secret, "***")
            if encoded:
                text = pattern.sub("***", text)
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


class BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (bad request line, line too long) at ERROR with a
    traceback that quotes the raw bytes. A client's garbage is not the daemon's error:
    the record becomes one INFO line that names the kind of error and quotes nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "bad request from %s: %s (HTTP %s)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class BenignWatchdogFilter(logging.Filter):
    """watchdog 7.1 logs at ERROR when an inotify event arrives while its emitter is
    stopping ("queue_events() called when the thread is inactive"): a race in its own
    shutdown that loses nothing. It becomes a DEBUG record."""

    MESSAGE = "called when the thread is inactive"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and self.MESSAGE in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def install_log_filters() -> None:
    """Install the filters that reword third-party records (once per logger)."""
    for name, kind in (
        ("aiohttp.server", BadRequestFilter),
        ("watchdog.observers.inotify", BenignWatchdogFilter),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


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
    install_log_filters()


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
