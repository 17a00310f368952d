"""Shared fixtures: settings in a temporary workspace, a real daemon on loopback, clients."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aetherd.app import create_app, runner_options
from aetherd.daemon import Daemon
from aetherd.logs import install_log_filters
from aetherd.protocol import registry as registry_module
from aetherd.settings import Settings
from aetherd.transport.access import DAEMON
from aetherd.transport.auth import setup_tokens
from tests.support import WsClient, connect

TOKEN = "test-token-0123456789"

# Every `Wire` reply (data encoded without its model, aetherd/protocol/registry.py) is
# compared with its model's bytes in the daemons served in this process (child daemons
# get no AETHERD_* variables: tests/support.child_env).
registry_module.CHECK_WIRE = True

# The daemon runs on uvloop when it is installed (aetherd/eventloop.py) and on asyncio's
# own loop otherwise: tests marked `event_loops` (the terminal suite) run on each.
ASYNCIO_LOOP: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop
}
EVENT_LOOPS = dict(ASYNCIO_LOOP)
try:
    import uvloop
except ImportError:  # not a dependency on this platform: asyncio alone
    pass
else:
    EVENT_LOOPS["uvloop"] = uvloop.new_event_loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every event loop for tests marked `event_loops`, asyncio's for the others."""
    return EVENT_LOOPS if item.get_closest_marker("event_loops") else ASYNCIO_LOOP


class _ErrorRecords(logging.Handler):
    """Collects every ERROR-or-worse record, and every record that carries a traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            with self._guard:
                self.records.append(record)


class ExpectLog:
    """Declares the error records a test expects; anything else fails the test.

    Call `expect_log(pattern)` (a regex searched in the logger name + message + traceback),
    or mark the test `@pytest.mark.expect_log(pattern, ...)`. Each pattern must match at
    least one record unless given with `required=False`.
    """

    def __init__(self) -> None:
        self.patterns: list[tuple[re.Pattern[str], bool]] = []

    def __call__(self, pattern: str, required: bool = True) -> None:
        self.patterns.append((re.compile(pattern, re.DOTALL), required))


def _describe(record: logging.LogRecord) -> str:
    text = f"{record.levelname} {record.name}: {record.getMessage()}"
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text


def log_verdict(records: list[logging.LogRecord], expected: ExpectLog) -> list[str]:
    """What is wrong with `records` given `expected`: one line per problem, [] when fine."""
    unexpected: list[str] = []
    matched: set[int] = set()
    for record in records:
        text = _describe(record)
        hits = [i for i, (pattern, _) in enumerate(expected.patterns) if pattern.search(text)]
        matched.update(hits)
        if not hits:
            unexpected.append(text)
    lines = [f"unexpected error log record:\n{text}" for text in unexpected[:5]]
    if len(unexpected) > 5:
        lines.append(f"... and {len(unexpected) - 5} more")
    lines += [
        f"expected error log record never came: {pattern.pattern!r}"
        for i, (pattern, required) in enumerate(expected.patterns)
        if required and i not in matched
    ]
    return lines


@pytest.fixture
def expect_log(_error_log: ExpectLog) -> ExpectLog:
    """Declare an ERROR record (or traceback) this test expects its daemon to log."""
    return _error_log


@pytest.fixture(autouse=True)
def _error_log(request: pytest.FixtureRequest) -> Iterator[ExpectLog]:
    """Fail any test whose code logged a traceback or an ERROR it did not declare."""
    expected = ExpectLog()
    for marker in request.node.iter_markers("expect_log"):
        for pattern in marker.args:
            expected(pattern, **marker.kwargs)
    # The daemon rewords some third-party records (see aetherd.logs); tests that build
    # services without the app get the same filters.
    install_log_filters()
    handler = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield expected
        if os.environ.get("AETHERD_TEST_GC"):
            gc.collect()  # an unclosed session in a cycle is reported by the test that left it
    finally:
        root.removeHandler(handler)
    problems = log_verdict(handler.records, expected)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty workspace root."""
    root = tmp_path / "workspace"
    root.mkdir()
    return root


@pytest.fixture
def make_settings(tmp_path: Path, workspace: Path) -> Callable[..., Settings]:
    """Settings for a test daemon: temporary root and data dir, a known token."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "workspace_id": "ws-test",
            "root": workspace,
            "data_dir": tmp_path / "data",
            "token": TOKEN,
            "log_format": "text",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@dataclass
class RunningDaemon:
    """A daemon served by a real aiohttp server on 127.0.0.1."""

    server: TestServer
    app: web.Application
    settings: Settings
    token: str | None

    @property
    def daemon(self) -> Daemon:
        """The daemon's shared state."""
        return self.app[DAEMON]

    def url(self, path: str) -> str:
        """An http:// URL on the test server."""
        return str(self.server.make_url(path))

    @property
    def ws_url(self) -> str:
        """The workspace WebSocket URL."""
        return self.url(f"/workspaces/{self.settings.workspace_id}/ws")

    async def connect(self, token: str | None = "default", **kwargs: Any) -> WsClient:
        """A WebSocket client authenticated with `?token=` (the test token by default)."""
        return await connect(self.ws_url, self.token if token == "default" else token, **kwargs)


@pytest.fixture
async def start_daemon(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Start daemons with setting overrides; all are stopped at teardown."""
    servers: list[TestServer] = []
    clients: list[WsClient] = []

    async def start(**overrides: Any) -> RunningDaemon:
        settings = make_settings(**overrides)
        tokens = setup_tokens(settings)
        app = create_app(settings, tokens)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**runner_options(settings))
        servers.append(server)
        running = RunningDaemon(server, app, settings, tokens.tokens[0] if tokens.tokens else None)
        original = running.connect

        async def tracked(*args: Any, **kwargs: Any) -> WsClient:
            client = await original(*args, **kwargs)
            clients.append(client)
            return client

        running.connect = tracked  # type: ignore[method-assign]
        return running

    yield start
    for client in clients:
        await client.close()
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def daemon(start_daemon: Callable[..., Any]) -> RunningDaemon:
    """One daemon with default test settings."""
    return await start_daemon()
