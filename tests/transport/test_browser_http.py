"""HTTP for browsers (section 16): CORS on the daemon's HTTP endpoints."""

from __future__ import annotations

import aiohttp
import pytest

from aetherd.errors import SettingsError
from aetherd.settings import load_settings
from tests.conftest import TOKEN

ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_preflight_and_responses_for_a_listed_origin(start_daemon, workspace):
    (workspace / "f.txt").write_bytes(b"hello")
    running = await start_daemon(cors_origins=f"{ORIGIN}, http://localhost:3000")
    content = running.url("/workspaces/ws-test/files/content")
    async with aiohttp.ClientSession() as http:
        preflight = {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with http.options(content + "?path=/f.txt", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "PUT" in resp.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
            assert "Access-Control-Allow-Credentials" not in resp.headers
        async with http.get(
            content, params={"path": "/f.txt"}, headers={**AUTH, "Origin": ORIGIN}
        ) as resp:
            assert resp.status == 200 and await resp.read() == b"hello"
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
            assert exposed == {"ETag", "Content-Range", "Content-Length", "Last-Modified"}
            assert "Origin" in resp.headers.getall("Vary")
        async with http.put(
            content,
            params={"path": "/up.txt"},
            data=b"uploaded",
            headers={**AUTH, "Origin": ORIGIN},
        ) as resp:
            assert resp.status in (200, 201)
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert (workspace / "up.txt").read_bytes() == b"uploaded"
        # info, and an error reply, both readable by the page.
        async with http.get(
            running.url("/workspaces/ws-test/info"), headers={**AUTH, "Origin": ORIGIN}
        ) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        async with http.get(
            running.url("/workspaces/ws-test/info"), headers={"Origin": ORIGIN}
        ) as resp:
            assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_other_origins_and_other_paths_get_nothing(start_daemon):
    running = await start_daemon(cors_origins=ORIGIN)
    info = running.url("/workspaces/ws-test/info")
    async with aiohttp.ClientSession() as http:
        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        async with http.options(info, headers=preflight) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.get(info, headers={**AUTH, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.get(running.url("/healthz"), headers={"Origin": ORIGIN}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_without_the_setting_there_is_no_cors(daemon):
    async with aiohttp.ClientSession() as http:
        preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
        async with http.options(daemon.url("/workspaces/ws-test/info"), headers=preflight) as resp:
            assert resp.status == 403
        async with http.get(
            daemon.url("/workspaces/ws-test/info"), headers={**AUTH, "Origin": ORIGIN}
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cors_origins": "app.example"}, "cors_origins"),
        ({"trusted_proxies": "10.0.0.0/8,nonsense"}, "trusted_proxies"),
        ({"preview_host": "preview.example.com"}, "preview_host"),
        ({"preview_host": "{port}-{nope}.example.com"}, "preview_host"),
    ],
)
def test_bad_browser_settings_are_refused(flags, message, workspace):
    with pytest.raises(SettingsError, match=message):
        load_settings({"root": str(workspace), **flags}, environ={})
