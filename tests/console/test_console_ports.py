"""The console's Ports view in a real browser: a server started in the workspace appears
with its process, its preview opens in a new tab through the daemon's proxy, and Kill
(after the confirmation) stops it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import TOKEN
from tests.console.conftest import WAIT, open_console
from tests.support import free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def web_server(workspace):
    site = workspace / "site"
    site.mkdir()
    (site / "index.html").write_text(
        "<!doctype html><title>app</title><p id=msg>preview works</p>\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_port_preview_opens_through_the_proxy_and_kill_asks_first(
    start_daemon, console_assets, browser, screenshot, web_server
):
    port, proc = web_server
    running = await start_daemon(port_scan_interval=0.2)
    page, problems = await open_console(browser, running.url("").rstrip("/"), TOKEN, "ports")
    row = page.locator(f'table.ports tr[data-port="{port}"]')
    await row.wait_for(timeout=WAIT * 1000)
    assert "python" in (await row.inner_text()).lower()
    assert f"pid {proc.pid}" in await row.inner_text()

    async with page.context.expect_page(timeout=WAIT * 1000) as info:
        await row.get_by_role("button", name="Open preview").click()
    preview = await info.value
    await preview.wait_for_load_state()
    await preview.locator("#msg").wait_for(timeout=WAIT * 1000)
    assert await preview.locator("#msg").inner_text() == "preview works"
    origin = running.url("").rstrip("/")
    # Through the daemon's path-form proxy; the token left the address bar for a cookie.
    assert preview.url == f"{origin}/workspaces/ws-test/ports/{port}/"
    await preview.close()

    await row.get_by_role("button", name="Kill").click()
    dialog = page.locator("dialog[open]")
    await dialog.wait_for(timeout=WAIT * 1000)
    assert f"port {port}" in await dialog.inner_text()
    await screenshot(page, "confirm")
    await dialog.get_by_role("button", name="Cancel").click()
    assert proc.poll() is None  # cancelled: still running
    await row.get_by_role("button", name="Kill").click()
    await dialog.get_by_role("button", name="Kill").click()
    await wait_for(lambda: proc.poll() is not None, WAIT)
    await row.wait_for(state="detached", timeout=WAIT * 1000)
    await screenshot(page)
    assert problems.errors == [], problems.errors
