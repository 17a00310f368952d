"""Fixtures for the web console's browser tests: built assets, a cuttable TCP proxy,
headless Chromium (Debian's /usr/bin/chromium driven by Playwright) and screenshots.

Screenshots go to test-artifacts/console/ (ignored by git; CI can keep the directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "console"
WAIT = 20.0


def _webbuild() -> Any:
    spec = importlib.util.spec_from_file_location("webbuild", REPO / "web" / "webbuild.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


webbuild = _webbuild()


@pytest.fixture(scope="session")
def console_assets() -> Path:
    """The built console, rebuilt from web/ when stale (npm ci the first time)."""
    webbuild.build(log=lambda *_: None)
    assert webbuild.is_fresh(), "the console assets are stale after a build"
    return webbuild.OUT


class CuttableProxy:
    """A TCP relay in front of the daemon that a test can cut (and keep refusing).

    `cut()` closes every relayed connection at once, as a network drop would, and
    refuses new ones until `resume()`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.accepted = 0
        self._pairs: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.update((writer, up_writer))
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for w in (writer, up_writer):
                self._pairs.discard(w)
                w.transport.abort()
            self._tasks.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

    def cut(self) -> None:
        self.refusing = True
        for writer in list(self._pairs):
            writer.transport.abort()

    def resume(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def cuttable_proxy() -> AsyncIterator[Any]:
    proxies: list[CuttableProxy] = []

    async def make(port: int) -> CuttableProxy:
        proxy = CuttableProxy(port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


@pytest.fixture(scope="session")
def chromium() -> str:
    assert os.path.exists(CHROMIUM), "chromium is required (apt-get install chromium)"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    """Headless Chromium from /usr/bin/chromium (Playwright's own download is not used)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            yield instance
        finally:
            await instance.close()


class PageProblems:
    """Console errors and CSP violations a page reported (a test asserts there are none)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} @ {message.location}")

    def csp(self) -> list[str]:
        return [e for e in self.errors if re.search("Content.Security.Policy", e, re.I)]

    def unexpected(self, *allowed: str) -> list[str]:
        """The errors matching none of the `allowed` regexes."""
        return [e for e in self.errors if not any(re.search(a, e) for a in allowed)]


@pytest.fixture
def screenshot(request: pytest.FixtureRequest):
    """`await screenshot(page, "label")` saves test-artifacts/console/<test>-<label>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    async def take(page: Any, label: str = "final") -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        path = ARTIFACTS / f"{name}-{label}.png"
        await page.screenshot(path=str(path))
        return path

    return take


async def until(page: Any, script: str, arg: Any = None, timeout: float = WAIT) -> Any:
    """Evaluate `script` (a JS function) until it returns a truthy value; return that value.

    Playwright's `wait_for_function` compiles its predicate with eval inside the page,
    which the console's CSP (rightly) forbids; `evaluate` runs through the DevTools
    protocol and is not subject to it. Bounded by `timeout`.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await page.evaluate(script, arg)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{script} stayed falsy for {timeout}s")
        await asyncio.sleep(0.05)


async def open_console(
    browser: Any, origin: str, token: str, view: str | None = None, **page_options: Any
) -> tuple[Any, PageProblems]:
    """A new page on the console at `origin` (http://host:port), connected; optionally on
    `view` (a tab name such as "files")."""
    page = await browser.new_page(**({"viewport": {"width": 1100, "height": 700}} | page_options))
    problems = PageProblems(page)
    await page.goto(f"{origin}/workspaces/ws-test/#token={token}")
    await until(page, "() => window.aetherdConsole && window.aetherdConsole.state() === 'open'")
    if view:
        await page.click(f"#tab-{view}")
    return page, problems
