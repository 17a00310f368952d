"""The files channel end to end: a real daemon on loopback, a real WebSocket, real inotify."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess

import aiohttp
import pytest

from aetherd.protocol.files import FileContent
from aetherd.protocol.frames import success_reply
from aetherd.protocol.models import encode
from tests.support import WsClient


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def ok(client: WsClient, type_: str, **fields) -> object:
    reply = await client.request("files", type_, **fields)
    assert reply["success"] is True, reply
    assert reply["channel"] == "files" and reply["type"] == type_
    return reply["data"]


async def fail(client: WsClient, type_: str, code: str, **fields) -> dict:
    reply = await client.request("files", type_, **fields)
    assert reply["success"] is False, reply
    assert reply["code"] == code, reply
    assert isinstance(reply["error"], str) and reply["error"]
    return reply


async def test_operations_round_trip(daemon, workspace):
    client = await daemon.connect()
    data = await ok(client, "write", path="/src/app.ts", content="let a = 1;\n")
    assert data["path"] == "/src/app.ts" and data["size"] == 11 and data["modified"].endswith("Z")
    assert (workspace / "src" / "app.ts").read_text() == "let a = 1;\n"
    data = await ok(client, "read", path="src/app.ts")
    assert data == {
        "content": "let a = 1;\n",
        "encoding": "utf-8",
        "size": 11,
        "modified": data["modified"],
        "offset": 0,
        "nextOffset": 11,
        "eof": True,
    }
    await ok(client, "mkdir", path="/src/lib/deep")
    await ok(
        client,
        "write",
        path="/b.bin",
        content=base64.b64encode(b"\x00\xff").decode(),
        encoding="base64",
    )
    listing = await ok(client, "list", path="/")
    assert [(i["name"], i["type"]) for i in listing] == [("src", "directory"), ("b.bin", "file")]
    data = await ok(client, "read", path="/b.bin")
    assert data["encoding"] == "base64" and base64.b64decode(data["content"]) == b"\x00\xff"
    stat = await ok(client, "stat", path="/src/app.ts")
    assert stat == {
        "name": "app.ts",
        "path": "/src/app.ts",
        "type": "file",
        "size": 11,
        "modified": stat["modified"],
        "mode": 0o666 & ~_umask(),
        "symlink": False,
    }
    data = await ok(client, "rename", oldPath="/src/app.ts", newPath="/src/main.ts")
    assert data == {"oldPath": "/src/app.ts", "newPath": "/src/main.ts"}
    await fail(client, "rename", "ALREADY_EXISTS", oldPath="/b.bin", newPath="/src/main.ts")
    assert await ok(client, "delete", path="/src") == {"path": "/src"}
    assert not (workspace / "src").exists()


async def test_write_options(daemon, workspace):
    client = await daemon.connect()
    await ok(client, "write", path="/t.txt", content="a", encoding="utf8")
    data = await ok(client, "write", path="/t.txt", content="b", append=True)
    assert data["size"] == 2 and (workspace / "t.txt").read_text() == "ab"
    stamp = data["modified"]
    await ok(client, "write", path="/t.txt", content="c", expectedModified=stamp)
    reply = await fail(
        client, "write", "CONFLICT", path="/t.txt", content="d", expectedModified=stamp
    )
    assert reply["modified"] != stamp
    assert (workspace / "t.txt").read_text() == "c"
    await fail(client, "write", "INVALID_MESSAGE", path="/x", content="!!!", encoding="base64")
    await fail(client, "write", "INVALID_MESSAGE", path="/x", content="x", encoding="latin-1")


async def test_bad_paths_and_bad_frames_keep_the_socket(daemon, workspace, tmp_path):
    outside = tmp_path / "secret-outside"
    outside.mkdir()
    os.symlink(outside, workspace / "out")
    client = await daemon.connect()
    for path in ("../x", "/out/x", "/a\x00b", "/" + "n" * 300):
        reply = await fail(client, "write", "INVALID_PATH", path=path, content="x")
        assert str(tmp_path) not in reply["error"]
    assert os.listdir(outside) == []
    for type_ in ("delete", "rename"):
        fields = {"path": "/"} if type_ == "delete" else {"oldPath": "/", "newPath": "/x"}
        await fail(client, type_, "INVALID_PATH", **fields)
    await fail(client, "read", "INVALID_MESSAGE", offset=0)  # no path
    await fail(client, "read", "INVALID_MESSAGE", path="/x", offset=-1)
    await fail(client, "read", "NOT_FOUND", path="/missing")
    (workspace / "keep.txt").write_text("keep")
    for type_, field, fields in (
        ("read", "offset", {"path": "/keep.txt", "offset": "1"}),
        ("read", "length", {"path": "/keep.txt", "length": 2.0}),
        ("write", "append", {"path": "/keep.txt", "content": "x", "append": "true"}),
        ("delete", "recursive", {"path": "/keep.txt", "recursive": 0}),
        ("rename", "overwrite", {"oldPath": "/keep.txt", "newPath": "/k", "overwrite": 1}),
    ):
        reply = await fail(client, type_, "INVALID_MESSAGE", **fields)
        assert reply["field"] == field
    assert (workspace / "keep.txt").read_text() == "keep"  # nothing was guessed at
    await client.send({"channel": "files", "type": "list", "path": "/"})
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "INVALID_MESSAGE" and "requestId" in frame["error"]
    assert await ok(client, "list", path="/")  # still serving


async def test_file_cap_and_paged_reads(start_daemon, workspace):
    running = await start_daemon(files_max_size=64 * 1024, files_read_page=4096)
    client = await running.connect()
    await fail(client, "write", "FILE_TOO_LARGE", path="/big", content="x" * (64 * 1024 + 1))
    (workspace / "big").write_bytes(b"y" * (64 * 1024 + 1))
    await fail(client, "read", "FILE_TOO_LARGE", path="/big")
    (workspace / "paged").write_bytes(b"z" * 10_000)
    chunks, offset = [], 0
    for _ in range(10):
        data = await ok(client, "read", path="/paged", offset=offset)
        chunks.append(data["content"])
        assert data["offset"] == offset
        offset = data["nextOffset"]
        if data["eof"]:
            break
    assert [len(c) for c in chunks] == [4096, 4096, 1808]


async def test_non_utf8_names_over_the_socket(daemon, workspace):
    (workspace / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin")
    client = await daemon.connect()
    listing = await ok(client, "list", path="/")
    assert listing[0]["name"] == "caf\ufffd.txt"
    raw_name = listing[0]["rawName"]
    data = await ok(
        client, "read", rawPath=base64.b64encode(b"/" + base64.b64decode(raw_name)).decode()
    )
    assert data["content"] == "latin"
    # A path sent with JSON \udcXX escapes (a lone surrogate) is refused before the
    # channel sees it: rawPath is the one way to name bytes that are not UTF-8.
    await client.send(
        '{"channel":"files","type":"stat","requestId":"esc1","path":"/caf\\udce9.txt"}'
    )
    error = await client.expect(lambda f: f.get("requestId") == "esc1")
    assert error["success"] is False and error["code"] == "INVALID_MESSAGE"
    assert error["field"] == "path"
    await fail(client, "read", "INVALID_PATH", rawPath="***")


async def test_changes_are_pushed_to_every_connection(start_daemon, workspace):
    running = await start_daemon(watcher_debounce=0.02)
    first = await running.connect()
    second = await running.connect()
    await ok(first, "write", path="/notes/a.md", content="# hi")
    for client in (first, second):
        frame = await client.expect_type("files", "change", path="/notes/a.md")
        assert frame == {
            "channel": "files",
            "type": "change",
            "action": "create",
            "path": "/notes/a.md",
            "isDirectory": False,
        }
        assert "requestId" not in frame
    await ok(first, "write", path="/notes/a.md", content="# changed")
    await second.expect_type("files", "change", path="/notes/a.md", action="modify")
    # A program in a terminal (any process) is seen the same way.
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "mv notes/a.md notes/b.md", cwd=workspace
    )
    assert await proc.wait() == 0
    frame = await second.expect_type("files", "change", path="/notes/b.md")
    assert frame["action"] == "rename" and frame["oldPath"] == "/notes/a.md"


async def test_watch_limit_resync_reaches_clients(start_daemon, workspace):
    running = await start_daemon(watcher_max_watches=2, watcher_debounce=0.02)
    client = await running.connect()
    await ok(client, "mkdir", path="/one")
    await ok(client, "mkdir", path="/two")
    frame = await client.expect_type("files", "resync")
    assert frame == {"channel": "files", "type": "resync", "reason": "watch_limit"}
    await ok(client, "write", path="/still.txt", content="x")
    await client.expect_type("files", "change", path="/still.txt", action="create")


@pytest.mark.parametrize("type_", ["list", "read", "write", "mkdir", "delete", "rename", "stat"])
async def test_every_type_requires_request_id(daemon, type_):
    client = await daemon.connect()
    await client.send({"channel": "files", "type": type_, "path": "/"})
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "INVALID_MESSAGE"


@pytest.fixture
def tiny_root(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_over_the_socket_and_http(start_daemon, tiny_root):
    running = await start_daemon(root=tiny_root, watcher_enabled=False)
    client = await running.connect()
    await ok(client, "write", path="/keep.txt", content="old")
    big = base64.b64encode(b"x" * (200 * 1024)).decode()
    reply = await fail(
        client, "write", "NO_SPACE", path="/keep.txt", content=big, encoding="base64"
    )
    assert "keep.txt" in reply["error"]
    assert (tiny_root / "keep.txt").read_text() == "old"
    url = running.url(f"/workspaces/{running.settings.workspace_id}/files/content")
    async with aiohttp.ClientSession() as http:
        params = {"path": "/keep.txt", "token": running.token}
        async with http.put(url, params=params, data=b"y" * (200 * 1024)) as resp:
            assert resp.status == 507
            assert (await resp.json())["code"] == "NO_SPACE"
    assert (tiny_root / "keep.txt").read_text() == "old"
    assert os.listdir(tiny_root) == ["keep.txt"]


@pytest.mark.parametrize("loop_read_max", [65536, 0])
async def test_read_replies_are_the_bytes_of_their_model(start_daemon, workspace, loop_read_max):
    """`read` sends the service's page as Wire data (no model on the way): its bytes must
    be those of FileContent, for text with escapes and non-ASCII, binary, empty and
    paged files, read on the loop and in a thread."""
    running = await start_daemon(files_loop_read_max=loop_read_max, files_read_page=4096)
    client = await running.connect()
    contents = {
        "controls": bytes(range(1, 32)) + b'\x7f"\\/<>&',
        "unicode": "é中😀\u2028\u2029\ufeff".encode(),
        "binary": bytes(range(256)),
        "empty": b"",
        "paged": "é".encode() * 3000,  # a page ends inside a character
        "invalid": b"ok \xff\xfe",
    }
    for name, data in contents.items():
        (workspace / name).write_bytes(data)
        offset = 0
        for _ in range(5):
            request_id = f"{name}-{offset}"
            frame = {"channel": "files", "type": "read", "requestId": request_id}
            await client.send({**frame, "path": f"/{name}", "offset": offset})
            for _ in range(50):  # skip the pushes a new connection gets
                text = (await client.ws.receive(timeout=10)).data
                reply = json.loads(text)
                if reply.get("requestId") == request_id:
                    break
            assert reply["success"] is True, reply
            model = FileContent.model_validate(reply["data"])
            assert text == success_reply("files", "read", request_id, encode(model))
            offset = reply["data"]["nextOffset"]
            if reply["data"]["eof"]:
                break
        assert offset == len(data)
