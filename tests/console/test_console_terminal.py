"""The console in a real browser: a terminal, and a dropped connection that loses nothing.

The page is loaded through a TCP proxy that the test cuts, so the browser's WebSocket
really drops (as on a flaky network) and the page must reconnect and resume by offset.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import TOKEN
from tests.console.conftest import WAIT, PageProblems, open_console, until
from tests.support import wait_for

pytestmark = pytest.mark.slow

LINES = 300


async def wait_text(page, pattern: str, timeout: float = WAIT) -> str:
    """Wait until the active terminal's buffer matches `pattern` (a regex); return it."""
    return await until(
        page,
        "p => { const t = window.aetherdConsole.terminalText(); return new RegExp(p, 'm').test(t) && t; }",
        pattern,
        timeout,
    )


async def test_terminal_echo_then_a_dropped_socket_loses_nothing(
    start_daemon, console_assets, cuttable_proxy, browser, screenshot
):
    running = await start_daemon()
    proxy = await cuttable_proxy(running.server.port)
    page = await browser.new_page(viewport={"width": 1100, "height": 700})
    problems = PageProblems(page)
    # `/` redirects to the console; the fragment survives the redirect, then leaves the bar.
    await page.goto(f"http://127.0.0.1:{proxy.port}/#token={TOKEN}")
    await until(page, "() => window.aetherdConsole && window.aetherdConsole.state() === 'open'")
    assert page.url == f"http://127.0.0.1:{proxy.port}/workspaces/ws-test/"
    assert await page.evaluate("sessionStorage.getItem('aetherd.token')") == TOKEN
    # No session existed, so the page created one; the daemon has it.
    await until(page, "() => window.aetherdConsole.terminalIds().length === 1")
    (session_id,) = await page.evaluate("window.aetherdConsole.terminalIds()")
    await wait_for(lambda: running.daemon.services.terminals.find(session_id) is not None, WAIT)

    await page.locator(".term-pane:not([hidden]) .xterm").click()
    await page.keyboard.type("echo hello")
    await page.keyboard.press("Enter")
    await wait_text(page, r"^hello$")

    # A steady stream of numbered lines; the socket drops in the middle of it.
    await page.keyboard.type(
        f'for i in $(seq 1 {LINES}); do echo "n:$i"; sleep 0.01; done; echo "stream""-end"'
    )
    await page.keyboard.press("Enter")
    await wait_text(page, r"^n:40$")
    proxy.cut()
    await until(page, "() => document.getElementById('status').textContent === 'reconnecting…'")
    assert await page.locator(".term-host .overlay").is_visible()
    await screenshot(page, "reconnecting")
    # The shell keeps running meanwhile (sessions belong to the workspace).
    session = running.daemon.services.terminals.get(session_id)
    await wait_for(lambda: b"n:120\r\n" in session.ring.contents()[-4096:], WAIT)
    proxy.resume()
    text = await wait_text(page, r"^stream-end$", timeout=WAIT * 2)
    assert await page.evaluate("window.aetherdConsole.connections()") == 2
    numbers = [int(m) for m in re.findall(r"^n:(\d+)$", text, re.M)]
    assert numbers == list(range(1, LINES + 1)), "lines lost or repeated across the reconnect"
    assert await page.locator(".term-host .overlay").is_hidden()
    await screenshot(page)
    # The browser reports the refused reconnects while the proxy was cut; nothing else.
    assert problems.unexpected(r"WebSocket connection to .* failed") == [], problems.errors


async def test_tabs_new_close_fit_and_reattach_after_reload(
    start_daemon, console_assets, browser, screenshot
):
    running = await start_daemon()
    terminals = running.daemon.services.terminals
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN)
    await until(page, "() => window.aetherdConsole.terminalIds().length === 1")
    (first,) = await page.evaluate("window.aetherdConsole.terminalIds()")

    # The PTY has the size xterm.js fits into the pane, and follows the window.
    async def pty_matches_xterm() -> bool:
        cols, rows = await page.evaluate("window.aetherdConsole.terminalSize()")
        session = terminals.find(page_active[0])
        return session is not None and (session.cols, session.rows) == (cols, rows)

    page_active = [first]
    await wait_for_async(pty_matches_xterm)
    wide = terminals.get(first).cols
    assert wide > 80
    await page.set_viewport_size({"width": 600, "height": 500})
    await until(page, "w => window.aetherdConsole.terminalSize()[0] < w", wide)
    await wait_for_async(pty_matches_xterm)
    assert terminals.get(first).cols < wide

    # New tab: a second session; typing goes to it.
    await page.get_by_role("button", name="New terminal").click()
    await until(page, "() => window.aetherdConsole.terminalIds().length === 2")
    second = (await page.evaluate("window.aetherdConsole.terminalIds()"))[1]
    assert await page.evaluate("window.aetherdConsole.activeTerminal()") == second
    await wait_for(lambda: terminals.find(second) is not None, WAIT)
    await page.keyboard.type("echo in-second")
    await page.keyboard.press("Enter")
    await until(page, "() => /^in-second$/m.test(window.aetherdConsole.terminalText())")

    # A reload re-attaches both sessions (pushed on connect) and replays their output.
    await page.reload()
    await until(page, "() => window.aetherdConsole && window.aetherdConsole.state() === 'open'")
    await until(page, "() => window.aetherdConsole.terminalIds().length === 2")
    assert sorted(await page.evaluate("window.aetherdConsole.terminalIds()")) == sorted(
        [first, second]
    )
    await until(page, "id => /^in-second$/m.test(window.aetherdConsole.terminalText(id))", second)

    # Close (the tab's close mark): the session ends on the daemon.
    tab = page.locator(f'.term-tab[data-session="{second}"]')
    await tab.locator(".close").click()
    await wait_for(lambda: getattr(terminals.find(second), "exit", True) is not None, WAIT)
    assert await page.evaluate("window.aetherdConsole.terminalIds()") == [first]
    await screenshot(page)
    assert problems.errors == [], problems.errors


async def wait_for_async(predicate, timeout: float = WAIT) -> None:
    """Like tests.support.wait_for, for an async predicate (bounded)."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.05)
