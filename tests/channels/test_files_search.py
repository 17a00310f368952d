"""`files/search` and `files/find` over a real socket, with real ripgrep and real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from tests.support import WsClient, wait_for

pytestmark = pytest.mark.skipif(shutil.which("rg") is None, reason="ripgrep is not installed")

# Slow for ripgrep (a Unicode word boundary turns its fast engines off): seconds per MB.
SLOW = r"\b\w+\b.{0,100}\b\w{7}\b.{0,50}ta$"


async def ok(client: WsClient, type_: str, **fields: object) -> dict:
    reply = await client.request("files", type_, **fields)
    assert reply["success"] is True, reply
    return reply["data"]


async def fail(client: WsClient, type_: str, code: str, **fields: object) -> dict:
    reply = await client.request("files", type_, **fields)
    assert reply["success"] is False and reply["code"] == code, reply
    return reply


def slow_tree(root: Path, files: int = 40) -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    lines = [" ".join(words[(i * 7 + j) % 10] for j in range(12)) for i in range(20000)]
    text = "\n".join(lines) + "\n"
    for n in range(files):
        (root / f"slow{n:02}.txt").write_text(text)


def rg_searching() -> list[psutil.Process]:
    """The `rg --json` runs (the search itself, not the walk before it)."""
    out = []
    for child in rg_children():
        try:
            if "--json" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def rg_children() -> list[psutil.Process]:
    """ripgrep processes below this one (the daemon runs in this process), zombies too."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "rg":
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


async def test_search_and_find_replies(daemon, workspace: Path) -> None:
    (workspace / "src").mkdir()
    (workspace / "src" / "app.ts").write_text("const naïve = 'needle';\nneedle();\n")
    (workspace / "src" / "skip.js").write_text("needle\n")
    (workspace / "node_modules").mkdir()
    (workspace / "node_modules" / "x.ts").write_text("needle\n")
    (workspace / ".gitignore").write_text("*.js\n")
    client = await daemon.connect()
    data = await ok(client, "search", query="needle")
    assert data == {
        "matches": [
            {
                "path": "/src/app.ts",
                "line": 1,
                "column": 16,
                "text": "const naïve = 'needle';",
                "textOffset": 0,
                "ranges": [{"start": 15, "end": 21}],
            },
            {
                "path": "/src/app.ts",
                "line": 2,
                "column": 1,
                "text": "needle();",
                "textOffset": 0,
                "ranges": [{"start": 0, "end": 6}],
            },
        ],
        "truncated": False,
        "filesSearched": 2,  # .gitignore and app.ts
        "engine": "ripgrep",
    }
    data = await ok(client, "search", query="NEEDLE", maxResults=1, contextLines=1)
    assert data["matches"] == []
    data = await ok(client, "search", query="needle", maxResults=1, contextLines=1, path="/src")
    assert data["truncated"] is True and data["matches"][0]["after"] == ["needle();"]
    assert data["matches"][0]["before"] == []
    data = await ok(client, "find", pattern="**/*.ts")
    assert data == {"paths": ["/src/app.ts"], "truncated": False}
    data = await ok(client, "find", pattern="APP")
    assert data == {"paths": [], "truncated": False}


async def test_the_python_engine_is_a_setting(start_daemon, workspace: Path) -> None:
    (workspace / "a.txt").write_text("one needle\n")
    running = await start_daemon(search_engine="python")
    client = await running.connect()
    data = await ok(client, "search", query="needle")
    assert data["engine"] == "python"
    assert [(m["path"], m["ranges"]) for m in data["matches"]] == [
        ("/a.txt", [{"start": 4, "end": 10}])
    ]


async def test_bad_requests(daemon, workspace: Path, tmp_path: Path) -> None:
    (workspace / "f.txt").write_text("x\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "out").symlink_to(outside)
    client = await daemon.connect()
    await fail(client, "search", "INVALID_PATH", query="x", path="/../..")
    await fail(client, "search", "INVALID_PATH", query="x", path="/out")
    await fail(client, "find", "INVALID_PATH", pattern="x", path="/out")
    await fail(client, "search", "NOT_DIRECTORY", query="x", path="/f.txt")
    await fail(client, "search", "NOT_FOUND", query="x", path="/missing")
    reply = await fail(client, "search", "INVALID_MESSAGE", query="(?=x)y", regex=True)
    assert reply["field"] == "query"
    reply = await fail(client, "search", "INVALID_MESSAGE", query="(unclosed", regex=True)
    assert reply["field"] == "query"
    reply = await fail(client, "search", "INVALID_MESSAGE", query="x", include=["[a-"])
    assert reply["field"] == "include"
    await fail(client, "search", "INVALID_MESSAGE", query="x", maxResults=10_001)
    await fail(client, "search", "INVALID_MESSAGE", query="x", maxResults="5")
    await fail(client, "search", "INVALID_MESSAGE", query="")
    await fail(client, "find", "INVALID_MESSAGE", pattern="[")
    # the socket is still fine
    assert (await ok(client, "find", pattern="f.txt"))["paths"] == ["/f.txt"]


async def test_a_long_search_does_not_hold_other_requests(start_daemon, workspace: Path) -> None:
    slow_tree(workspace)
    running = await start_daemon(search_timeout=60.0)
    client = await running.connect()
    await client.send(
        {"channel": "files", "type": "search", "requestId": "slow", "query": SLOW, "regex": True}
    )
    await wait_for(lambda: bool(rg_searching()), timeout=20)
    stat = await ok(client, "stat", path="/slow00.txt")
    assert stat["type"] == "file"
    assert rg_searching(), "the search ended before the stat was answered: this proves nothing"
    await client.close()
    await wait_for(lambda: not rg_children(), timeout=20)


async def test_closing_the_socket_kills_the_search(start_daemon, workspace: Path) -> None:
    slow_tree(workspace)
    running = await start_daemon(search_timeout=120.0)
    client = await running.connect()
    await client.send(
        {"channel": "files", "type": "search", "requestId": "s", "query": SLOW, "regex": True}
    )
    await wait_for(lambda: bool(rg_searching()), timeout=20)
    searching = [p.pid for p in rg_searching()]
    await client.close()
    # Gone and reaped: not even a zombie is left below this process.
    await wait_for(lambda: not rg_children(), timeout=20)
    for pid in searching:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    search = running.daemon.services.search
    await wait_for(lambda: search.cancelled == 1, timeout=10)
