"""Hostile workspaces and inputs against the file layer, over a real socket and HTTP.

Regression tests of issue 11: a FIFO once hung an executor thread per read (nine
starved the daemon), a lone surrogate once escaped the jail as UnicodeEncodeError, an
absurd Range once gave a 500, and a nested-`[` YAML once cost seconds of CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import aiohttp
import pytest

from aetherd.services.fs import FileSystem
from aetherd.services.jail import Jail
from tests.conftest import TOKEN
from tests.support import (
    WsClient,
    aetherd_command,
    child_env,
    connect,
    read_port,
    wait_for,
    wait_ready,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def content_url(running, path: str) -> str:
    return running.url(f"/workspaces/{running.settings.workspace_id}/files/content")


async def reply_to(client: WsClient, channel: str, type_: str, **fields) -> dict:
    return await client.request(channel, type_, timeout=10, **fields)


async def test_fifos_fail_fast_and_the_daemon_keeps_answering(start_daemon, workspace, tmp_path):
    os.mkfifo(workspace / "pipe")
    (workspace / "f.bin").write_bytes(b"payload")
    # A small pool: with blocking opens, 4 FIFO reads would have taken every thread.
    running = await start_daemon(file_io_threads=4)
    client = await running.connect()
    ids = [f"fifo-{i}" for i in range(20)]
    for request_id in ids:
        await client.send(
            {"channel": "files", "type": "read", "requestId": request_id, "path": "/pipe"}
        )
    for request_id in ids:
        frame = await client.expect(lambda f, r=request_id: f.get("requestId") == r)
        assert frame["success"] is False and frame["code"] == "INVALID_PATH"
        assert "not a regular file" in frame["error"]
    appended = await reply_to(client, "files", "write", path="/pipe", content="x", append=True)
    assert appended["success"] is False and appended["code"] == "INVALID_PATH"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        for _ in range(20):
            async with http.get(content_url(running, "/pipe"), params={"path": "/pipe"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["code"] == "INVALID_PATH"
        # Everything else still answers.
        listing = await reply_to(client, "files", "list", path="/")
        assert listing["success"] is True
        assert {e["name"] for e in listing["data"]} >= {"pipe", "f.bin"}
        async with http.get(running.url("/metrics")) as resp:
            assert resp.status == 200
            assert 'aetherd_executor_max_threads{pool="file"} 4.0' in await resp.text()
        async with http.get(running.url("/healthz")) as resp:
            assert resp.status == 200
        async with http.get(content_url(running, "/f.bin"), params={"path": "/f.bin"}) as resp:
            assert resp.status == 200 and await resp.read() == b"payload"
    home = tmp_path / "home"
    home.mkdir()
    created = await reply_to(client, "terminal", "create", sessionId="t", env={"HOME": str(home)})
    assert created["success"] is True, created
    closed = await reply_to(client, "terminal", "close", sessionId="t")
    assert closed["success"] is True, closed
    executor = running.daemon.services.jail.executor
    await wait_for(lambda: executor.stats()["busy"] == 0)  # no thread is left stuck
    assert (workspace / "pipe").is_fifo()


async def test_lone_surrogates_are_invalid_paths_everywhere(daemon, workspace):
    fs = FileSystem(Jail(workspace))
    for call in (
        fs.read("/\ud800"),
        fs.stat("/a/\udfff"),
        fs.write("/\ud800.txt", b"x"),
        fs.list("/\ud800"),
        fs.rename("/a", "/\ud800"),
        fs.delete("/\ud800"),
        fs.mkdir("/\ud800"),
        fs.open_download("/\ud800"),
    ):
        try:
            await call
        except Exception as exc:  # the one allowed failure: a clean INVALID_PATH
            assert getattr(exc, "code", None) is not None, repr(exc)
            assert exc.code.value == "INVALID_PATH", repr(exc)
            exc.message.encode("utf-8")
        else:
            raise AssertionError("a lone surrogate was accepted")
    # Over the socket (the JSON escape gives the daemon a real lone surrogate).
    client = await daemon.connect()
    await client.send('{"channel":"files","type":"read","requestId":"s1","path":"/\\ud800"}')
    # (The frame guard may refuse it first: then an error frame whose `ref` names it.)
    frame = await client.expect(
        lambda f: f.get("requestId") == "s1" or f.get("ref") == {"channel": "files", "type": "read"}
    )
    assert frame.get("success") is not True
    assert frame["code"] in ("INVALID_PATH", "INVALID_MESSAGE")
    assert (await reply_to(client, "files", "list", path="/"))["success"] is True
    # Names that are not UTF-8 on disk still work (their surrogates are escapes).
    with open(os.path.join(os.fsencode(workspace), b"caf\xe9"), "wb") as handle:
        handle.write(b"ok")
    assert (await fs.read("/caf\udce9"))["content"] == "ok"


async def test_absurd_ranges_are_416_or_clamped(daemon, workspace):
    (workspace / "f.bin").write_bytes(b"0123456789")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = content_url(daemon, "/f.bin")

        async def get(range_header: str) -> tuple[int, bytes, str | None]:
            headers = {"Range": range_header}
            async with http.get(url, params={"path": "/f.bin"}, headers=headers) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Range")

        status, body, content_range = await get("bytes=" + "9" * 5000 + "-")
        assert status == 416 and content_range == "bytes */10"
        assert json.loads(body)["code"] == "INVALID_MESSAGE"
        assert await get("bytes=2-" + "9" * 5000) == (206, b"23456789", "bytes 2-9/10")
        assert await get("bytes=-" + "9" * 5000) == (206, b"0123456789", "bytes 0-9/10")
        # Non-ASCII digits are not a range: the header is ignored (whole file).
        assert (await get("bytes=\u0661-"))[0] in (200, 400)
        status, body, _ = await get("bytes=0-3")
        assert (status, body) == (206, b"0123")


async def test_config_fifo_surrogates_and_nesting_bombs(start_daemon, workspace):
    (workspace / ".aether").mkdir()
    os.mkfifo(workspace / ".aether" / "config.yaml")
    running = await start_daemon(config_poll_interval=0)  # start() would hang on a blocking read
    client = await running.connect()
    got = await reply_to(client, "config", "get")
    assert got["success"] is True and got["data"]["valid"] is False
    assert "not a regular file" in got["data"]["errors"][0]["message"]
    raw = await reply_to(client, "config", "validate", raw="a: '\\ud800'")
    assert raw["success"] is True  # (an escaped surrogate in YAML text is just text)
    await client.send('{"channel":"config","type":"set","requestId":"s","raw":"setup: \\ud800"}')
    frame = await client.expect(
        lambda f: f.get("requestId") == "s" or f.get("ref") == {"channel": "config", "type": "set"}
    )
    assert frame.get("success") is not True
    assert frame["code"] in ("INVALID_CONFIG", "INVALID_MESSAGE")
    # 32 nesting bombs at once: each refused with INVALID_CONFIG; /healthz keeps answering.
    bomb = "[" * 20_000
    ids = [f"bomb-{i}" for i in range(32)]
    for request_id in ids:
        await client.send(
            {"channel": "config", "type": "set", "requestId": request_id, "raw": bomb}
        )
    async with aiohttp.ClientSession() as http:
        async with http.get(running.url("/healthz"), timeout=aiohttp.ClientTimeout(10)) as resp:
            assert resp.status == 200
    for request_id in ids:
        frame = await client.expect(lambda f, r=request_id: f.get("requestId") == r)
        assert frame["success"] is False and frame["code"] == "INVALID_CONFIG"
        assert "nested deeper than 64 levels" in frame["errors"][0]["message"]
    valid = await reply_to(client, "config", "validate", raw="[" * 60 + "]" * 60)
    assert valid["data"]["errors"][0]["message"] == "the config must be a mapping of keys"
    # Setting the config replaces the FIFO with a regular file.
    done = await reply_to(client, "config", "set", raw="setup: echo hi\n")
    assert done["success"] is True
    assert (workspace / ".aether" / "config.yaml").read_text() == "setup: echo hi\n"


@pytest.mark.slow
async def test_sigterm_after_fifo_reads_stops_the_process(tmp_path):
    """Defect 2, the process: after reads of FIFOs (socket, HTTP, config), SIGTERM exits.

    The daemon once logged "stopped" and stayed alive until something opened the FIFO
    for writing: the blocked threads held the default executor's shutdown.
    """
    root = tmp_path / "project"
    (root / ".aether").mkdir(parents=True)
    os.mkfifo(root / "pipe")
    os.mkfifo(root / ".aether" / "config.yaml")
    proc = subprocess.Popen(
        [*aetherd_command(), "serve", "--port", "0", "--root", str(root)],
        cwd=root,
        env=child_env(tmp_path, AETHERD_TOKEN=TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, _ = await asyncio.to_thread(read_port, proc)
        await wait_ready(port, proc)
        client = await connect(f"http://127.0.0.1:{port}/workspaces/local/ws", TOKEN)
        try:
            for _ in range(20):
                reply = await client.request("files", "read", path="/pipe")
                assert reply["code"] == "INVALID_PATH"
            url = f"http://127.0.0.1:{port}/workspaces/local/files/content"
            async with aiohttp.ClientSession(headers=AUTH) as http:
                async with http.get(url, params={"path": "/pipe"}) as resp:
                    assert resp.status == 400
            got = await client.request("config", "get")
            assert got["data"]["valid"] is False
            proc.send_signal(signal.SIGTERM)
        finally:
            await client.close()
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        assert '"msg": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
