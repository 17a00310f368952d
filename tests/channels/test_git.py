"""The git channel end to end: a real daemon on loopback, a real WebSocket, the real git CLI."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.services.test_git import commit_file, git, init_repo
from tests.support import WsClient

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


async def ok(client: WsClient, type_: str, **fields: Any) -> Any:
    reply = await client.request("git", type_, **fields)
    assert reply["success"] is True, reply
    assert reply["channel"] == "git" and reply["type"] == type_
    return reply["data"]


async def fail(client: WsClient, type_: str, code: str, **fields: Any) -> dict[str, Any]:
    reply = await client.request("git", type_, **fields)
    assert reply["success"] is False, reply
    assert reply["code"] == code, reply
    assert isinstance(reply["error"], str) and reply["error"]
    return reply


@pytest.fixture
def repo(workspace: Path) -> Path:
    init_repo(workspace)
    commit_file(workspace, "a.txt", "one\ntwo\n", "first")
    return workspace


async def test_read_requests_over_the_socket(daemon, repo: Path) -> None:
    client = await daemon.connect()
    first = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "checkout", "-q", "-b", "feature")
    second = commit_file(repo, "b.txt", "b\n", "second")
    (repo / "a.txt").write_text("one\ntwo\nthree\n")
    (repo / "blob.bin").write_bytes(b"\x00\xff" * 10)

    status = await ok(client, "status")
    assert status["branch"] == "feature" and status["head"] == second
    assert status["repo"] == "/" and status["detached"] is False and status["truncated"] is False
    assert {f["path"]: (f["index"], f["worktree"]) for f in status["files"]} == {
        "/a.txt": ("unmodified", "modified"),
        "/blob.bin": ("untracked", "untracked"),
    }

    diff = await ok(client, "diff", mode="main")
    assert diff["baseRef"] == first and diff["truncated"] is False
    files = {f["path"]: f for f in diff["files"]}
    assert set(files) == {"/a.txt", "/b.txt", "/blob.bin"}
    assert files["/blob.bin"] == {
        "path": "/blob.bin",
        "oldPath": None,
        "status": "added",
        "additions": 0,
        "deletions": 0,
        "binary": True,
        "patch": None,
    }
    assert files["/a.txt"]["patch"].endswith(" two\n+three\n")

    cut = await ok(client, "diff", mode="head", maxBytes=10, contextLines=0)
    assert cut["truncated"] is True

    log = await ok(client, "log", limit=1)
    assert [c["sha"] for c in log["commits"]] == [second]
    assert set(log["commits"][0]) == {
        "sha",
        "parents",
        "authorName",
        "authorEmail",
        "authoredAt",
        "subject",
    }
    branches = await ok(client, "branches")
    assert branches == {
        "current": "feature",
        "local": [
            {"name": "feature", "sha": second, "upstream": None},
            {"name": "main", "sha": first, "upstream": None},
        ],
        "remote": [],
    }


async def test_writes_and_the_changed_push(daemon, repo: Path) -> None:
    client = await daemon.connect()
    bystander = await daemon.connect()  # never asks git anything: gets no push
    (repo / "a.txt").write_text("changed\n")
    assert await ok(client, "stage", paths=["."]) == {}
    made = await ok(
        client, "commit", message="from the socket", authorName="Ada", authorEmail="a@x"
    )
    assert made["sha"] == git(repo, "rev-parse", "HEAD").strip()
    await client.expect_type("git", "changed", head=made["sha"])

    # A commit made with the CLI, outside the daemon, is pushed too.
    sha = commit_file(repo, "cli.txt", "cli\n", "from the CLI")
    changed = await client.expect_type("git", "changed", head=sha)
    assert changed == {
        "channel": "git",
        "type": "changed",
        "repo": "/",
        "branch": "main",
        "head": sha,
    }

    switched = await ok(client, "checkout", ref="topic", create=True)
    assert switched == {"branch": "topic", "head": sha}
    await client.expect_type("git", "changed", branch="topic")
    (repo / "cli.txt").write_text("edit\n")
    await ok(client, "stage", paths=["/cli.txt"])
    await ok(client, "unstage", paths=["cli.txt"])
    status = await ok(client, "status")
    assert [(f["path"], f["index"], f["worktree"]) for f in status["files"]] == [
        ("/cli.txt", "unmodified", "modified")
    ]
    # /metrics counts the commands and shows the watch.
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.url("/metrics")) as response:
            text = await response.text()
    assert "aetherd_git_watching 1" in text
    assert "aetherd_git_commands_total" in text
    # The bystander saw no git frame; its socket works.
    assert (await bystander.request("files", "stat", path="/"))["success"] is True
    assert not [f for f in bystander.backlog if f.get("channel") == "git"]


async def test_raw_paths_round_trip(daemon, repo: Path) -> None:
    client = await daemon.connect()
    name = os.fsdecode(b"odd \xff\nname.txt")
    (repo / name).write_text("x\n")
    status = await ok(client, "status")
    entry = next(f for f in status["files"] if "rawPath" in f)
    assert base64.b64decode(entry["rawPath"]) == b"/odd \xff\nname.txt"
    assert entry["path"] == "/odd \ufffd\nname.txt"
    await ok(client, "stage", rawPaths=[entry["rawPath"]])
    staged = await ok(client, "diff", mode="staged")
    assert [f.get("rawPath") for f in staged["files"]] == [entry["rawPath"]]
    await ok(client, "commit", message="odd")
    log = await ok(client, "log", rawPath=entry["rawPath"])
    assert [c["subject"] for c in log["commits"]] == ["odd"]


async def test_errors_keep_the_socket_open(daemon, workspace: Path) -> None:
    client = await daemon.connect()
    proj = init_repo(workspace / "proj")
    commit_file(proj, "a.txt", "a\n")
    (workspace / "plain").mkdir()
    await fail(client, "status", "NOT_A_REPOSITORY", repo="/plain")
    await fail(client, "status", "NOT_A_REPOSITORY")
    await fail(client, "status", "INVALID_PATH", repo="/../outside")
    await fail(client, "diff", "INVALID_PATH", repo="/proj", paths=["/../../etc/passwd"])
    await fail(client, "stage", "INVALID_PATH", repo="/proj", paths=["/plain"])
    reply = await fail(client, "checkout", "GIT_ERROR", repo="/proj", ref="no-such-branch")
    assert "no-such-branch" in reply["error"] and isinstance(reply["exitCode"], int)
    assert reply["exitCode"] != 0
    # Never an option: a ref starting with '-' is refused before git runs.
    await fail(client, "log", "INVALID_MESSAGE", ref="--output=/tmp/x")
    await fail(client, "checkout", "INVALID_MESSAGE", ref="-b")
    await fail(client, "log", "INVALID_MESSAGE", limit=1001)
    await fail(client, "stage", "INVALID_MESSAGE", paths=[])
    await fail(client, "commit", "INVALID_MESSAGE", message="x", authorName="a <b>")
    await fail(client, "diff", "INVALID_MESSAGE", mode="sideways")
    assert (await ok(client, "status", repo="/proj"))["branch"] == "main"


async def test_git_not_installed(start_daemon, repo: Path, tmp_path: Path) -> None:
    running = await start_daemon(git_binary=str(tmp_path / "no" / "git"))
    client = await running.connect()
    reply = await fail(client, "status", "GIT_NOT_INSTALLED")
    assert "not installed" in reply["error"]
    assert (await client.request("files", "stat", path="/"))["success"] is True


async def test_a_repository_made_after_start_is_watched(daemon, workspace: Path) -> None:
    client = await daemon.connect()
    await fail(client, "status", "NOT_A_REPOSITORY")  # registers this socket for pushes
    init_repo(workspace)
    await client.expect_type("git", "changed", branch="main", head=None)
    sha = commit_file(workspace, "a.txt", "a\n")
    await client.expect_type("git", "changed", head=sha)


async def test_watch_closes_with_the_last_interested_socket(daemon, repo: Path) -> None:
    service = daemon.daemon.services.git
    client = await daemon.connect()
    await ok(client, "status")
    assert service.watching
    await client.close()
    from tests.support import wait_for

    await wait_for(lambda: not service.watching)
