"""HTTP bulk transfer: GET with ranges and validators, PUT streamed and atomic, bounded memory."""

from __future__ import annotations

import asyncio
import os
import threading

import aiohttp
import psutil
import pytest

from aetherd.services.fs import is_temp_name
from tests.conftest import TOKEN
from tests.support import wait_for

MiB = 1024 * 1024


def content_url(running, path: str | None = "/f.bin", token: str | None = TOKEN, ws_id=None) -> str:
    ws_id = ws_id or running.settings.workspace_id
    url = running.url(f"/workspaces/{ws_id}/files/content")
    params = []
    if path is not None:
        params.append(f"path={path}")
    if token is not None:
        params.append(f"token={token}")
    return url + ("?" + "&".join(params) if params else "")


async def test_get_streams_with_validators(daemon, workspace):
    body = bytes(range(256)) * 40
    (workspace / "f.bin").write_bytes(body)
    async with aiohttp.ClientSession() as http:
        async with http.get(content_url(daemon)) as resp:
            assert resp.status == 200
            assert await resp.read() == body
            assert resp.headers["Content-Length"] == str(len(body))
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert resp.headers["Last-Modified"].endswith("GMT")
            etag = resp.headers["ETag"]
            assert etag.startswith('"') and etag.endswith('"')
        async with http.get(content_url(daemon), headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        # Bearer header instead of ?token=
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(content_url(daemon, token=None), headers=headers) as resp:
            assert resp.status == 200 and await resp.read() == body
        async with http.head(content_url(daemon)) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == str(len(body))


async def test_get_ranges(daemon, workspace):
    body = b"0123456789"
    (workspace / "f.bin").write_bytes(body)
    async with aiohttp.ClientSession() as http:
        cases = [
            ("bytes=2-5", b"2345", "bytes 2-5/10"),
            ("bytes=7-", b"789", "bytes 7-9/10"),
            ("bytes=-3", b"789", "bytes 7-9/10"),
            ("bytes=8-100", b"89", "bytes 8-9/10"),
        ]
        for header, expected, content_range in cases:
            async with http.get(content_url(daemon), headers={"Range": header}) as resp:
                assert resp.status == 206, header
                assert await resp.read() == expected
                assert resp.headers["Content-Range"] == content_range
                assert resp.headers["Content-Length"] == str(len(expected))
        for header in ("bytes=10-", "bytes=5-2", "bytes=-0"):
            async with http.get(content_url(daemon), headers={"Range": header}) as resp:
                assert resp.status == 416, header
                assert resp.headers["Content-Range"] == "bytes */10"
        # A stale If-Range means the whole file.
        headers = {"Range": "bytes=0-1", "If-Range": '"stale"'}
        async with http.get(content_url(daemon), headers=headers) as resp:
            assert resp.status == 200 and await resp.read() == body


async def test_access_and_path_errors(daemon, workspace, tmp_path):
    (workspace / "d").mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", workspace / "out")
    async with aiohttp.ClientSession() as http:
        async with http.get(content_url(daemon, token=None)) as resp:
            assert resp.status == 401 and await resp.json() == {"error": "Unauthorized"}
        async with http.get(content_url(daemon, token="wrong")) as resp:
            assert resp.status == 401
        async with http.put(content_url(daemon, token="wrong"), data=b"x") as resp:
            assert resp.status == 401
        async with http.get(content_url(daemon, ws_id="other")) as resp:
            assert resp.status == 404 and await resp.json() == {"error": "Workspace not found"}
        expectations = [
            ("/missing", 404, "NOT_FOUND"),
            ("/../etc/passwd", 400, "INVALID_PATH"),
            ("/out", 400, "INVALID_PATH"),
            ("/d", 400, "IS_DIRECTORY"),
            (None, 400, "INVALID_MESSAGE"),
        ]
        for path, status, code in expectations:
            async with http.get(content_url(daemon, path=path)) as resp:
                assert resp.status == status, path
                reply = await resp.json()
                assert reply["code"] == code and str(tmp_path) not in reply["error"]
        async with http.put(content_url(daemon, path="/out"), data=b"x") as resp:
            assert resp.status == 400
    assert (tmp_path / "secret").read_text() == "s"


async def test_put_is_atomic_and_keeps_mode(daemon, workspace):
    async with aiohttp.ClientSession() as http:
        async with http.put(content_url(daemon, path="/new/dir/f.txt"), data=b"first") as resp:
            assert resp.status == 201
            reply = await resp.json()
            assert reply["path"] == "/new/dir/f.txt" and reply["size"] == 5
        target = workspace / "new" / "dir" / "f.txt"
        os.chmod(target, 0o600)

        async def body():
            for _ in range(4):
                yield b"x" * 100_000

        async with http.put(content_url(daemon, path="/new/dir/f.txt"), data=body()) as resp:
            assert resp.status == 200
            assert (await resp.json())["size"] == 400_000
    assert target.read_bytes() == b"x" * 400_000
    assert target.stat().st_mode & 0o777 == 0o600
    assert not [p for p in target.parent.iterdir() if is_temp_name(p.name)]


async def test_put_over_the_cap_is_413_and_the_old_file_stays(start_daemon, workspace):
    running = await start_daemon(files_max_size=100_000)
    (workspace / "f.bin").write_bytes(b"old")
    async with aiohttp.ClientSession() as http:
        # Declared too large: refused before the body is read.
        async with http.put(content_url(running), data=b"y" * 100_001) as resp:
            assert resp.status == 413
            assert (await resp.json())["code"] == "FILE_TOO_LARGE"

        async def chunked():  # no Content-Length: counted while streaming
            for _ in range(30):
                yield b"z" * 8192

        async with http.put(content_url(running), data=chunked()) as resp:
            assert resp.status == 413
        async with http.put(content_url(running), data=b"w" * 100_000) as resp:
            assert resp.status == 200
    assert (workspace / "f.bin").read_bytes() == b"w" * 100_000
    assert not [p for p in workspace.iterdir() if is_temp_name(p.name)]


class PeakRss:
    """Samples this process's RSS in a thread (the server runs in-process)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.slow
@pytest.mark.parametrize("sendfile", [True, False])
async def test_100_mib_each_way_in_bounded_memory(start_daemon, workspace, sendfile):
    daemon = await start_daemon(files_http_sendfile=sendfile)
    size = 100 * MiB
    piece = os.urandom(MiB)

    async def body():
        for _ in range(size // MiB):
            yield piece

    async with aiohttp.ClientSession() as http:
        with PeakRss() as up:
            async with http.put(content_url(daemon, path="/big.bin"), data=body()) as resp:
                assert resp.status == 201, await resp.text()
        assert (workspace / "big.bin").stat().st_size == size
        received = 0
        with PeakRss() as down:
            async with http.get(content_url(daemon, path="/big.bin")) as resp:
                assert resp.headers["Content-Length"] == str(size)
                async for chunk in resp.content.iter_chunked(MiB):
                    received += len(chunk)
        assert received == size
    # Both sides (client and server) live in this process; the whole file would be 100 MiB.
    assert up.growth < 24 * MiB, up.growth
    assert down.growth < 24 * MiB, down.growth
    with open(workspace / "big.bin", "rb") as handle:
        assert handle.read(MiB) == piece


def test_temp_names_are_recognised():
    assert is_temp_name(".~aetherd-0123456789ab.new")
    assert not is_temp_name("notes.new")
    assert not is_temp_name(".~aetherd-0123456789ab.txt")


async def test_an_upload_cut_short_leaves_no_temp_file(daemon, workspace):
    (workspace / "f.bin").write_bytes(b"old")
    port = daemon.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"PUT /workspaces/{daemon.settings.workspace_id}/files/content?path=/f.bin&token={TOKEN}"
        f" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {4 * MiB}\r\n\r\n"
    )
    writer.write(head.encode() + b"p" * 300_000)
    await writer.drain()
    await wait_for(lambda: any(is_temp_name(p.name) for p in workspace.iterdir()))
    writer.close()  # the client vanishes mid-body
    await writer.wait_closed()
    await wait_for(lambda: not any(is_temp_name(p.name) for p in workspace.iterdir()))
    assert (workspace / "f.bin").read_bytes() == b"old"
    del reader


async def test_put_keeps_every_byte_of_a_chunked_body_in_order(daemon, workspace):
    """The body is taken piece by piece as the parser hands it over (no join): pieces of
    every size, HTTP chunk ends among them, arrive in order and complete."""
    rng = __import__("random").Random(7)
    sizes = [rng.choice([1, 7, 4096, 65_535, 65_536, 200_000]) for _ in range(60)]
    data = os.urandom(sum(sizes))

    async def body():
        offset = 0
        for size in sizes:
            yield data[offset : offset + size]
            offset += size

    async with aiohttp.ClientSession() as http:
        async with http.put(content_url(daemon, path="/chunked.bin"), data=body()) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["size"] == len(data)
    assert (workspace / "chunked.bin").read_bytes() == data
