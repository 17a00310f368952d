"""A real Vite dev server, reached through the preview proxy by headless Chromium.

Vite binds `localhost` only, as dev servers do by default; the daemon is the only way
in. The page loads through the host form (Vite assumes it lives at `/`), the token is
exchanged for the preview cookie, and the hot-module-reload WebSocket runs through the
proxy: an edit to a source file changes the page in place, without a reload.

Needs Debian's `chromium`, Python `playwright` (the browser is launched from
/usr/bin/chromium; Playwright's own download does not work here) and the fixture's npm
packages (`npm ci` in tests/fixtures/vite; .ci/run installs all three).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.support import free_port

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "vite"
CHROMIUM = "/usr/bin/chromium"
WAIT = 60.0


def ensure_vite() -> Path:
    """The fixture's node_modules, installed from its package-lock when missing."""
    vite = FIXTURE / "node_modules" / "vite" / "bin" / "vite.js"
    if not vite.exists():
        npm = shutil.which("npm")
        assert npm, "npm is required for the Vite test"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=FIXTURE,
            check=True,
            timeout=300,
            stdout=subprocess.DEVNULL,
        )
    assert vite.exists()
    return vite


def listening(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return True
    return False


@pytest.fixture
def vite_server(tmp_path: Path):
    assert os.path.exists(CHROMIUM), "chromium is required (apt-get install chromium)"
    vite = ensure_vite()
    project = tmp_path / "app"
    project.mkdir()
    for name in ("index.html", "main.js", "message.js", "vite.config.js", "package.json"):
        shutil.copy(FIXTURE / name, project / name)
    (project / "node_modules").symlink_to(FIXTURE / "node_modules")
    port = free_port()
    log = (tmp_path / "vite.log").open("wb")
    node = shutil.which("node")
    assert node, "node is required for the Vite test"
    proc = subprocess.Popen(
        [node, str(vite), "--port", str(port)],
        cwd=project,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "BROWSER": "none", "CI": "1"},
    )
    try:
        deadline = time.monotonic() + WAIT
        while not listening(port):
            assert proc.poll() is None, (tmp_path / "vite.log").read_text()
            assert time.monotonic() < deadline, "Vite never listened"
            time.sleep(0.1)
        yield project, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def test_vite_page_and_hot_reload_through_the_proxy(start_daemon, vite_server):
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - a venv created before playwright joined [test]
        pytest.fail("playwright is missing: pip install -e '.[test]' (it joined the test extras)")

    project, vite_port = vite_server
    running = await start_daemon(preview_host="{port}-{workspacePrefix}.preview.localhost")
    origin = f"http://{vite_port}-ws-test.preview.localhost:{running.server.port}"
    sockets: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--host-resolver-rules=MAP *.localhost 127.0.0.1"],
        )
        try:
            page = await browser.new_page()
            page.on("websocket", lambda ws: sockets.append(ws.url))
            response = await page.goto(f"{origin}/?token={TOKEN}", timeout=WAIT * 1000)
            assert response is not None and response.status == 200
            assert page.url == f"{origin}/"  # the token left the address bar
            await page.wait_for_function(
                "document.querySelector('#app').textContent === 'version one'",
                timeout=WAIT * 1000,
            )
            cookies = await page.context.cookies()
            preview = [c for c in cookies if c["name"] == "aetherd_preview"]
            assert preview and preview[0]["httpOnly"] and preview[0]["sameSite"] == "Lax"
            # The HMR socket is open, through the proxy (never straight to Vite's port).
            proxy = running.app[_proxy_key()]
            for _ in range(int(WAIT * 10)):
                if proxy.active.get(vite_port):
                    break
                await asyncio.sleep(0.1)
            assert proxy.active.get(vite_port) == 1, sockets
            assert sockets and all(
                url.startswith(f"ws://{vite_port}-ws-test.preview.localhost:") for url in sockets
            )

            (project / "message.js").write_text('export const message = "version two";\n')
            await page.wait_for_function(
                "document.querySelector('#app').textContent === 'version two'",
                timeout=WAIT * 1000,
            )
            # Updated in place by HMR: the page was not reloaded.
            assert await page.evaluate("window.__pageLoads") == 1
        finally:
            await browser.close()


def _proxy_key():
    from aetherd.transport.proxy import PROXY

    return PROXY
