"""The console's HTTP side (aetherd/transport/console.py): redirects, the page and its CSP,
the assets, and the answers for another workspace or a missing build. The page itself is
exercised in a real browser by tests/console/."""

from __future__ import annotations

import re

import aiohttp
import pytest

from aetherd.transport.console import DIST as PAGE_DIST
from aetherd.transport.console import PAGE, console_url, content_security_policy
from tests.console.conftest import console_assets  # noqa: F401 (the built assets)

pytestmark = pytest.mark.usefixtures("console_assets")


@pytest.fixture
async def daemon(start_daemon):
    return await start_daemon()


async def test_root_redirects_to_the_workspace_console(daemon):
    async with aiohttp.ClientSession() as http:
        async with http.get(daemon.url("/"), allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/workspaces/ws-test/"
        async with http.get(daemon.url("/workspaces/ws-test"), allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/workspaces/ws-test/"


async def test_page_needs_no_token_and_carries_a_fresh_nonce(daemon):
    nonces = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(daemon.url("/workspaces/ws-test/")) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/html"
                assert resp.headers["Cache-Control"] == "no-store"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                csp = resp.headers["Content-Security-Policy"]
                body = await resp.text()
            nonce = re.search(r"'nonce-([^']+)'", csp)[1]
            assert csp == content_security_policy(nonce)
            assert "script-src 'self';" in csp and "unsafe" not in csp
            assert f'<meta name="aetherd-nonce" content="{nonce}">' in body
            assert '<meta name="aetherd-workspace" content="ws-test">' in body
            assert '<script src="assets/app.js" defer></script>' in body
            # No inline script at all: every <script> has a src.
            assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", body))
            nonces.append(nonce)
    assert nonces[0] != nonces[1]


async def test_assets_are_served_with_their_types_and_revalidated(daemon):
    async with aiohttp.ClientSession() as http:
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            async with http.get(daemon.url(f"/workspaces/ws-test/assets/{name}")) as resp:
                assert resp.status == 200
                assert resp.content_type == kind
                assert resp.headers["Cache-Control"] == "no-cache"
                etag = resp.headers["ETag"]
                assert len(await resp.read()) > 1000
            headers = {"If-None-Match": etag}
            async with http.get(
                daemon.url(f"/workspaces/ws-test/assets/{name}"), headers=headers
            ) as resp:
                assert resp.status == 304
        # The bundle goes precompressed to a client that accepts gzip (about a third).
        async with http.get(
            daemon.url("/workspaces/ws-test/assets/app.js"),
            headers={"Accept-Encoding": "gzip"},
        ) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.content_type == "text/javascript"
            assert int(resp.headers["Content-Length"]) < (PAGE_DIST / "app.js").stat().st_size / 2
            assert await resp.read() == (PAGE_DIST / "app.js").read_bytes()
        for path in (
            "/workspaces/ws-test/assets/app.js.gz",  # served as app.js, not by its own name
            "/workspaces/ws-test/assets/stamp.json",  # built, but not an asset
            "/workspaces/ws-test/assets/index.html",
            "/workspaces/ws-test/assets/..%2Fconsole.py",
        ):
            async with http.get(daemon.url(path)) as resp:
                assert resp.status == 404, path


async def test_another_workspace_is_not_found(daemon):
    async with aiohttp.ClientSession() as http:
        for path in ("/workspaces/other/", "/workspaces/other", "/workspaces/other/assets/app.js"):
            async with http.get(daemon.url(path), allow_redirects=False) as resp:
                assert resp.status == 404, path
                assert await resp.json() == {"error": "Workspace not found"}


async def test_missing_build_says_how_to_build_it(daemon, tmp_path):
    page = daemon.app[PAGE]
    page.dist, page._template = tmp_path / "nothing-here", None
    async with aiohttp.ClientSession() as http:
        async with http.get(daemon.url("/workspaces/ws-test/")) as resp:
            assert resp.status == 503
            assert "webbuild.py" in await resp.text()
            assert "Content-Security-Policy" in resp.headers


def test_console_url_puts_the_token_in_the_fragment(make_settings):
    settings = make_settings(workspace_id="my-ws")
    assert console_url(settings, "0.0.0.0", 3001, "a/b+c") == (
        "http://127.0.0.1:3001/workspaces/my-ws/#token=a%2Fb%2Bc"
    )
    assert console_url(settings, "::1", 80, None) == "http://[::1]:80/workspaces/my-ws/"
