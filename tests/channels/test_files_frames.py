"""Files frames are models: their bytes equal what the service's dicts produced.

Every reply of a real `FileSystem` (odd names, links in and out, text and binary
pages) and every watcher event shape is validated into its model and encoded, and
the bytes must equal the plain JSON of the service's dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aetherd.channels.files import LIST_STEP, entries_of, event_frame
from aetherd.protocol import dumps, encode
from aetherd.protocol.files import (
    FileContent,
    FileEntry,
    FilePath,
    FileRenamed,
    FilesChange,
    FilesResync,
    FileStat,
    FileWritten,
)
from aetherd.services.fs import FileLimits, FileSystem, path_fields
from aetherd.services.jail import Jail

BAD = os.fsdecode(b"caf\xe9")  # not UTF-8: a surrogate-escaped str, as the OS gives it


@pytest.fixture
def fs(tmp_path: Path) -> FileSystem:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "dir é").mkdir(parents=True)
    outside.mkdir()
    (root / "a.txt").write_text('héllo "x" \\ \x1b\n')
    (root / "bin").write_bytes(b"\x00\x01\xff" * 10)
    (root / "dir é" / "n.txt").write_text("n")
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    os.symlink("a.txt", root / "link-in")
    os.symlink(outside, root / "link-out")
    os.symlink("missing", root / "dangling")
    return FileSystem(Jail(root), FileLimits(max_file_size=1 << 20, read_page_size=4096))


def encode_list(models: list[Any]) -> str:
    return "[" + ",".join(encode(m) for m in models) + "]"


def same(model: Any, data: Any) -> None:
    assert encode(model) == dumps(data)


async def test_list_entries(fs: FileSystem):
    entries = await fs.list("/")
    assert any("rawName" in e for e in entries) and any(e.get("broken") for e in entries)
    assert any(e.get("symlink") and not e.get("broken") for e in entries)
    for entry in entries:
        same(FileEntry.model_validate(entry), entry)


async def test_a_long_listing_is_validated_in_steps_and_keeps_every_entry():
    raw = [
        {"name": f"f{i}", "type": "file", "size": i, "modified": "2026-11-27T21:03:01.123456Z"}
        for i in range(LIST_STEP * 2 + 5)
    ]
    entries = await entries_of(raw)
    assert encode_list(entries) == dumps(raw)
    assert await entries_of([]) == []


@pytest.mark.parametrize("path", ["/", "/a.txt", "/dir é", "/link-in", "/link-out", "/dangling"])
async def test_stat(fs: FileSystem, path: str):
    result = await fs.stat(path)
    same(FileStat.model_validate(result), result)


async def test_stat_of_a_name_that_is_not_utf8(fs: FileSystem):
    result = await fs.stat("/" + BAD)
    assert "rawPath" in result
    same(FileStat.model_validate(result), result)


@pytest.mark.parametrize(("path", "encoding"), [("/a.txt", "utf-8"), ("/bin", "base64")])
async def test_read_pages(fs: FileSystem, path: str, encoding: str):
    for offset in (0, 3, 10_000):
        page = await fs.read(path, offset)
        assert page["encoding"] == encoding
        same(FileContent.model_validate(page), page)


async def test_write_mkdir_delete_rename(fs: FileSystem):
    for result, model in (
        (await fs.write("/new é.txt", b"x"), FileWritten),
        (await fs.write("/" + BAD + "/f", b"x"), FileWritten),
        (await fs.mkdir("/m/n"), FilePath),
        (await fs.mkdir("/" + BAD + "/d"), FilePath),
        (await fs.rename("/m", "/" + BAD + "/m2"), FileRenamed),
        (await fs.rename("/" + BAD + "/f", "/g"), FileRenamed),
        (await fs.delete("/" + BAD + "/d"), FilePath),
        (await fs.delete("/g"), FilePath),
    ):
        same(model.model_validate(result), result)
    assert "rawNewPath" in (await fs.rename("/new é.txt", "/" + BAD + "/z"))


WATCHER_EVENTS = [
    {"type": "change", "action": "create", **path_fields("path", "/a"), "isDirectory": False},
    {"type": "change", "action": "modify", **path_fields("path", "/é"), "isDirectory": False},
    {"type": "change", "action": "delete", **path_fields("path", "/" + BAD), "isDirectory": True},
    {
        "type": "change",
        "action": "rename",
        **path_fields("path", "/b"),
        "isDirectory": False,
        **path_fields("oldPath", "/x/" + BAD),
    },
    {"type": "resync", "reason": "watch_limit"},
    {"type": "resync", "reason": "overflow"},
]


@pytest.mark.parametrize("event", WATCHER_EVENTS)
def test_watcher_events(event: dict[str, Any]):
    frame = event_frame(event)
    assert isinstance(frame, FilesResync if event["type"] == "resync" else FilesChange)
    same(frame, {"channel": "files", **event})


def test_an_event_the_protocol_does_not_declare_is_refused():
    with pytest.raises(ValueError):
        event_frame({"type": "change", "action": "chmod", "path": "/a", "isDirectory": False})
    with pytest.raises(ValueError):
        event_frame({"type": "resync", "reason": "bored"})
