"""The git service alone: the real git CLI, real repositories built in temporary directories."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.git import GitService, _split_patch
from aetherd.services.jail import Jail
from tests.support import wait_for

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

IDENTITY = {
    "GIT_AUTHOR_NAME": "Ada Lovelace",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada Lovelace",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
}
CLI_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    **IDENTITY,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str, check: bool = True, data: bytes | None = None) -> str:
    """Run the git CLI as a user would (with an identity), return its stdout."""
    done = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", *args],
        cwd=cwd,
        env=CLI_ENV,
        input=data,
        capture_output=True,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"git {args} failed: {done.stderr.decode()}")
    return done.stdout.decode("utf-8", "surrogateescape")


def init_repo(path: Path, branch: str = "main") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    git(path, "config", "user.name", "Ada Lovelace")
    git(path, "config", "user.email", "ada@example.com")
    return path


def commit_file(repo: Path, name: str, text: str, message: str | None = None) -> str:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(text)
    git(repo, "add", "--", name)
    git(repo, "commit", "-q", "-m", message or f"change {name}")
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
async def service(workspace: Path) -> AsyncIterator[GitService]:
    svc = GitService(Jail(workspace), watch_debounce=0.05, timeout=30)
    yield svc
    await svc.stop()


@pytest.fixture
def repo(workspace: Path) -> Path:
    """The workspace root as a repository with one commit on main."""
    init_repo(workspace)
    commit_file(workspace, "a.txt", "one\ntwo\n", "first")
    return workspace


def by_path(files: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in files}


# -- status --------------------------------------------------------------------------------


async def test_status_reports_each_state(service: GitService, repo: Path) -> None:
    commit_file(repo, "gone.txt", "bye\n")
    commit_file(repo, "old.txt", "moving\n")
    commit_file(repo, "staged.txt", "s\n")
    (repo / "a.txt").write_text("one\ntwo\nthree\n")  # modified in the worktree
    (repo / "staged.txt").write_text("s2\n")
    git(repo, "add", "staged.txt")  # modified in the index
    (repo / "gone.txt").unlink()  # deleted in the worktree
    git(repo, "mv", "old.txt", "new.txt")  # renamed in the index
    (repo / "fresh.txt").write_text("new\n")
    git(repo, "add", "fresh.txt")  # added
    (repo / "dir").mkdir()
    (repo / "dir" / "untracked.txt").write_text("u\n")

    status = await service.status(None)
    assert status["repo"] == "/"
    assert status["branch"] == "main" and not status["detached"]
    assert status["head"] == git(repo, "rev-parse", "HEAD").strip()
    assert status["upstream"] is None and status["ahead"] is None and status["behind"] is None
    assert status["truncated"] is False
    files = by_path(status["files"])
    assert files["/a.txt"] == {
        "path": "/a.txt",
        "oldPath": None,
        "index": "unmodified",
        "worktree": "modified",
    }
    assert (files["/staged.txt"]["index"], files["/staged.txt"]["worktree"]) == (
        "modified",
        "unmodified",
    )
    assert (files["/gone.txt"]["index"], files["/gone.txt"]["worktree"]) == (
        "unmodified",
        "deleted",
    )
    assert files["/new.txt"]["index"] == "renamed" and files["/new.txt"]["oldPath"] == "/old.txt"
    assert files["/fresh.txt"]["index"] == "added"
    # Untracked files are listed one by one, not as their directory.
    assert files["/dir/untracked.txt"]["index"] == "untracked"
    assert files["/dir/untracked.txt"]["worktree"] == "untracked"
    assert "submodule" not in files["/a.txt"]


async def test_status_of_a_fresh_repository(service: GitService, workspace: Path) -> None:
    init_repo(workspace)
    (workspace / "x").write_text("x")
    status = await service.status("/")
    assert status["branch"] == "main" and status["head"] is None
    assert [f["path"] for f in status["files"]] == ["/x"]


async def test_conflict_after_a_failing_merge(service: GitService, repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "side")
    commit_file(repo, "a.txt", "side\n")
    git(repo, "checkout", "-q", "main")
    commit_file(repo, "a.txt", "main\n")
    merged = subprocess.run(
        ["git", "merge", "side"], cwd=repo, env=CLI_ENV, capture_output=True, timeout=60
    )
    assert merged.returncode != 0  # the conflict the test needs
    status = await service.status(None)
    entry = by_path(status["files"])["/a.txt"]
    assert entry["index"] == "conflicted" and entry["worktree"] == "conflicted"
    # The worktree diff of a conflicted file is the combined diff, still one entry.
    diff = await service.diff(None, "worktree")
    conflicted = by_path(diff["files"])["/a.txt"]
    assert conflicted["status"] == "modified"
    assert conflicted["patch"] is not None and "<<<<<<<" in conflicted["patch"]


async def test_detached_head(service: GitService, repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD").strip()
    commit_file(repo, "b.txt", "b\n")
    git(repo, "checkout", "-q", "--detach", first)
    status = await service.status(None)
    assert status["detached"] is True and status["branch"] is None
    assert status["head"] == first
    branches = await service.branches(None)
    assert branches["current"] is None


async def test_submodule_is_reported_as_such(
    service: GitService, repo: Path, tmp_path: Path
) -> None:
    lib = init_repo(tmp_path / "lib")
    commit_file(lib, "lib.txt", "lib\n")
    git(repo, "submodule", "add", "-q", str(lib), "vendor/lib")
    status = await service.status(None)
    files = by_path(status["files"])
    assert files["/vendor/lib"]["submodule"] is True
    assert files["/vendor/lib"]["index"] == "added"
    assert "submodule" not in files["/.gitmodules"]
    git(repo, "commit", "-q", "-m", "add lib")
    commit_file(repo / "vendor" / "lib", "lib.txt", "changed inside\n")  # new commit in it
    status = await service.status(None)
    entry = by_path(status["files"])["/vendor/lib"]
    assert entry["submodule"] is True and entry["worktree"] == "modified"
    diff = await service.diff(None, "worktree")
    sub = by_path(diff["files"])["/vendor/lib"]
    assert sub["submodule"] is True and sub["status"] == "modified"
    assert "Subproject commit" in (sub["patch"] or "")


async def test_upstream_ahead_and_behind(service: GitService, tmp_path: Path) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    seed = init_repo(tmp_path / "seed")
    commit_file(seed, "a.txt", "a\n")
    git(seed, "push", "-q", str(bare), "main")
    workspace = Path(service.jail.root)
    git(workspace, "clone", "-q", str(bare), ".")
    git(workspace, "config", "user.name", "Ada Lovelace")
    git(workspace, "config", "user.email", "ada@example.com")
    commit_file(seed, "b.txt", "b\n")  # the remote moves on: behind 1
    git(seed, "push", "-q", str(bare), "main")
    git(workspace, "fetch", "-q")
    commit_file(workspace, "c.txt", "c\n")  # local work: ahead 2
    commit_file(workspace, "d.txt", "d\n")
    status = await service.status(None)
    assert status["upstream"] == "origin/main"
    assert (status["ahead"], status["behind"]) == (2, 1)
    branches = await service.branches(None)
    assert branches["current"] == "main"
    assert branches["local"] == [
        {
            "name": "main",
            "sha": git(workspace, "rev-parse", "main").strip(),
            "upstream": "origin/main",
        }
    ]
    # origin/HEAD (a symbolic ref) is not a branch.
    assert [b["name"] for b in branches["remote"]] == ["origin/main"]


# -- diff ----------------------------------------------------------------------------------


async def test_diff_modes(service: GitService, repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD").strip()
    second = commit_file(repo, "b.txt", "b\n")
    (repo / "a.txt").write_text("one\ntwo\nstaged\n")
    git(repo, "add", "a.txt")
    (repo / "a.txt").write_text("one\ntwo\nstaged\nunstaged\n")
    (repo / "new.txt").write_text("brand\nnew\n")

    worktree = await service.diff(None, "worktree")
    assert worktree["baseRef"] is None and worktree["truncated"] is False
    files = by_path(worktree["files"])
    assert set(files) == {"/a.txt", "/new.txt"}
    assert (files["/a.txt"]["additions"], files["/a.txt"]["deletions"]) == (1, 0)
    assert "+unstaged" in files["/a.txt"]["patch"] and "+staged" not in files["/a.txt"]["patch"]
    # Untracked counts as added, with its whole content.
    assert files["/new.txt"]["status"] == "added"
    assert files["/new.txt"]["additions"] == 2 and "+brand\n+new\n" in files["/new.txt"]["patch"]

    staged = await service.diff(None, "staged")
    assert staged["baseRef"] == second
    assert [f["path"] for f in staged["files"]] == ["/a.txt"]
    assert (
        "+staged" in staged["files"][0]["patch"] and "unstaged" not in staged["files"][0]["patch"]
    )

    head = await service.diff(None, "head")
    assert head["baseRef"] == second
    files = by_path(head["files"])
    assert set(files) == {"/a.txt", "/new.txt"}
    assert files["/a.txt"]["additions"] == 2

    last = await service.diff(None, "lastCommit")
    assert last["baseRef"] == first
    assert [(f["path"], f["status"]) for f in last["files"]] == [("/b.txt", "added")]

    # The untracked file and the git index on disk are untouched by all this.
    assert "?? new.txt" in git(repo, "status", "--porcelain")


async def test_diff_main_uses_the_merge_base(service: GitService, repo: Path) -> None:
    base = commit_file(repo, "shared.txt", "shared\n")
    git(repo, "checkout", "-q", "-b", "feature")
    commit_file(repo, "feature.txt", "feature\n")
    git(repo, "checkout", "-q", "main")
    commit_file(repo, "main-only.txt", "later on main\n")  # not part of the feature's diff
    git(repo, "checkout", "-q", "feature")
    (repo / "scratch.txt").write_text("untracked\n")
    diff = await service.diff(None, "main")
    assert diff["baseRef"] == base
    files = by_path(diff["files"])
    assert set(files) == {"/feature.txt", "/scratch.txt"}
    assert files["/scratch.txt"]["status"] == "added"


async def test_diff_main_prefers_origin_head_then_master(
    service: GitService, workspace: Path, tmp_path: Path
) -> None:
    init_repo(workspace, branch="master")
    base = commit_file(workspace, "a.txt", "a\n")
    git(workspace, "checkout", "-q", "-b", "topic")
    commit_file(workspace, "t.txt", "t\n")
    assert (await service.diff(None, "main"))["baseRef"] == base  # master
    # An origin/HEAD wins over master.
    commit_file(workspace, "t2.txt", "t2\n")
    tip = git(workspace, "rev-parse", "HEAD~1").strip()
    git(workspace, "update-ref", "refs/remotes/origin/trunk", tip)
    git(workspace, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/trunk")
    assert (await service.diff(None, "main"))["baseRef"] == tip


async def test_diff_main_without_a_default_branch(service: GitService, workspace: Path) -> None:
    init_repo(workspace, branch="trunk")
    commit_file(workspace, "a.txt", "a\n")
    with pytest.raises(AetherError) as caught:
        await service.diff(None, "main")
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_diff_binary_rename_and_truncation(service: GitService, repo: Path) -> None:
    (repo / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (repo / "big.txt").write_text("".join(f"line {i}\n" for i in range(2000)))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "blobs")
    (repo / "blob.bin").write_bytes(b"\x00\x03" * 100)
    git(repo, "mv", "big.txt", "renamed.txt")
    diff = await service.diff(None, "head")
    files = by_path(diff["files"])
    assert files["/blob.bin"]["binary"] is True and files["/blob.bin"]["patch"] is None
    renamed = files["/renamed.txt"]
    assert renamed["status"] == "renamed" and renamed["oldPath"] == "/big.txt"
    assert (renamed["additions"], renamed["deletions"]) == (0, 0)

    (repo / "renamed.txt").write_text("".join(f"changed {i}\n" for i in range(2000)))
    (repo / "z.txt").write_text("after the cut\n")
    full = await service.diff(None, "worktree")
    assert full["truncated"] is False
    cut = await service.diff(None, "worktree", max_bytes=1000)
    assert cut["truncated"] is True
    files = by_path(cut["files"])
    patch = files["/renamed.txt"]["patch"]
    assert files["/renamed.txt"]["truncated"] is True
    assert 0 < len(patch.encode()) <= 1000 and patch.endswith("\n")
    # A file after the cut is still listed, with its counts, without a patch.
    assert files["/z.txt"]["patch"] is None and files["/z.txt"]["additions"] == 1
    nothing = await service.diff(None, "worktree", max_bytes=0)
    assert nothing["truncated"] is True and all(f["patch"] is None for f in nothing["files"])


async def test_diff_paths_and_context_lines(service: GitService, repo: Path) -> None:
    commit_file(repo, "long.txt", "".join(f"{i}\n" for i in range(20)))
    (repo / "long.txt").write_text("".join(f"{i}\n" if i != 10 else "ten\n" for i in range(20)))
    (repo / "a.txt").write_text("other\n")
    (repo / "untracked.txt").write_text("u\n")
    only = await service.diff(None, "worktree", paths=["/long.txt"], context_lines=0)
    assert [f["path"] for f in only["files"]] == ["/long.txt"]
    assert (
        "@@ -11 +11 @@" in only["files"][0]["patch"] and "\n 9\n" not in only["files"][0]["patch"]
    )
    wide = await service.diff(None, "worktree", paths=["long.txt"], context_lines=5)
    assert "\n 5\n" in wide["files"][0]["patch"]
    untracked = await service.diff(None, "worktree", paths=["/untracked.txt"])
    assert [f["path"] for f in untracked["files"]] == ["/untracked.txt"]


async def test_names_with_space_newline_and_non_utf8_bytes(service: GitService, repo: Path) -> None:
    odd = os.fsdecode(b"we\xffird dir")
    (repo / odd).mkdir()
    names = ["with space.txt", "new\nline.txt", f"{odd}/caf\u00e9 .txt"]
    raw_name = os.fsdecode(b"bad\xfe.txt")
    for name in [*names, raw_name]:
        (repo / name).write_text(f"{name!r}\n")
    status = await service.status(None)
    files = by_path(status["files"])
    assert "/with space.txt" in files and "/new\nline.txt" in files
    raw_entries = [f for f in status["files"] if "rawPath" in f]
    raw_bytes = {base64.b64decode(f["rawPath"]) for f in raw_entries}
    assert raw_bytes == {b"/bad\xfe.txt", b"/we\xffird dir/caf\xc3\xa9 .txt"}
    # The display form never carries undecodable bytes.
    assert all("\ufffd" in f["path"] for f in raw_entries)

    # Stage them all by the exact names the status gave, then commit, then rename one.
    paths = [os.fsdecode(base64.b64decode(f["rawPath"])) for f in raw_entries]
    paths += ["/with space.txt", "/new\nline.txt"]
    await service.stage(None, paths)
    staged = await service.diff(None, "staged")
    assert {f.get("rawPath") for f in staged["files"]} >= {
        base64.b64encode(b"/bad\xfe.txt").decode()
    }
    assert {f["status"] for f in staged["files"]} == {"added"}
    await service.commit(None, "odd names")
    git(repo, "mv", raw_name, "plain.txt")
    git(repo, "mv", "new\nline.txt", "still\nodd.txt")
    diff = await service.diff(None, "staged")
    files = by_path(diff["files"])
    assert files["/plain.txt"]["rawOldPath"] == base64.b64encode(b"/bad\xfe.txt").decode()
    assert files["/still\nodd.txt"]["oldPath"] == "/new\nline.txt"
    log = await service.log(None, path=os.fsdecode(b"/bad\xfe.txt"))
    assert [c["subject"] for c in log["commits"]] == ["odd names"]


def test_split_patch_cuts_only_at_file_headers() -> None:
    data = b"diff --git a/x b/x\n-diff --git a/y\n+diff y\ndiff --cc z\n z\n"
    assert _split_patch(data) == [
        b"diff --git a/x b/x\n-diff --git a/y\n+diff y\n",
        b"diff --cc z\n z\n",
    ]
    assert _split_patch(b"") == []


# -- log and branches --------------------------------------------------------------------


async def test_log_limit_skip_ref_and_path(service: GitService, repo: Path) -> None:
    shas = [git(repo, "rev-parse", "HEAD").strip()]
    for i in range(4):
        shas.append(commit_file(repo, f"f{i % 2}.txt", f"{i}\n", f"commit {i}"))
    log = await service.log(None)
    assert [c["sha"] for c in log["commits"]] == shas[::-1]
    newest = log["commits"][0]
    assert newest["parents"] == [shas[3]] and newest["subject"] == "commit 3"
    assert newest["authorName"] == "Ada Lovelace" and newest["authorEmail"] == "ada@example.com"
    assert newest["authoredAt"][:4].isdigit() and newest["authoredAt"][10] == "T"
    assert log["commits"][-1]["parents"] == []
    page = await service.log(None, limit=2, skip=1)
    assert [c["sha"] for c in page["commits"]] == [shas[3], shas[2]]
    only = await service.log(None, path="/f0.txt")
    assert [c["subject"] for c in only["commits"]] == ["commit 2", "commit 0"]
    older = await service.log(None, ref=shas[2])
    assert [c["sha"] for c in older["commits"]] == shas[2::-1]


async def test_log_of_an_unborn_branch_is_empty(service: GitService, workspace: Path) -> None:
    init_repo(workspace)
    assert await service.log(None) == {"commits": []}


async def test_subject_with_odd_text(service: GitService, repo: Path) -> None:
    (repo / "a.txt").write_text("x\n")
    git(repo, "commit", "-q", "-a", "-F", "-", data=b"tab\there \x1f unit\n\nbody line\n")
    log = await service.log(None, limit=1)
    assert log["commits"][0]["subject"] == "tab\there \x1f unit"


# -- writes ----------------------------------------------------------------------------


async def test_stage_unstage_commit_checkout(service: GitService, repo: Path) -> None:
    (repo / "a.txt").write_text("changed\n")
    (repo / "new.txt").write_text("new\n")
    await service.stage(None, ["/new.txt"])
    files = by_path((await service.status(None))["files"])
    assert files["/new.txt"]["index"] == "added" and files["/a.txt"]["index"] == "unmodified"
    await service.stage(None, ["."])
    files = by_path((await service.status(None))["files"])
    assert files["/a.txt"]["index"] == "modified"
    await service.unstage(None, ["/a.txt"])
    files = by_path((await service.status(None))["files"])
    assert files["/a.txt"]["index"] == "unmodified" and files["/a.txt"]["worktree"] == "modified"
    assert (repo / "a.txt").read_text() == "changed\n"

    made = await service.commit(None, "add new\n\nwith a body")
    assert made["sha"] == git(repo, "rev-parse", "HEAD").strip()
    assert git(repo, "log", "-1", "--format=%s|%b").strip() == "add new|with a body"
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["new.txt"]
    made = await service.commit(
        None, "everything", all_=True, author_name="Grace Hopper", author_email="grace@example.com"
    )
    assert (
        git(repo, "log", "-1", "--format=%an <%ae>").strip() == "Grace Hopper <grace@example.com>"
    )
    assert (await service.status(None))["files"] == []

    switched = await service.checkout(None, "topic", create=True)
    assert switched == {"branch": "topic", "head": made["sha"]}
    back = await service.checkout(None, "main")
    assert back == {"branch": "main", "head": made["sha"]}
    first = git(repo, "rev-list", "--max-parents=0", "HEAD").strip()
    detached = await service.checkout(None, first)
    assert detached == {"branch": None, "head": first}
    assert (repo / "a.txt").read_text() == "one\ntwo\n"


async def test_unstage_before_the_first_commit(service: GitService, workspace: Path) -> None:
    init_repo(workspace)
    (workspace / "a.txt").write_text("a\n")
    await service.stage(None, ["."])
    assert by_path((await service.status(None))["files"])["/a.txt"]["index"] == "added"
    await service.unstage(None, ["."])
    assert by_path((await service.status(None))["files"])["/a.txt"]["index"] == "untracked"


async def test_checkout_with_a_file_named_like_the_ref(service: GitService, repo: Path) -> None:
    """`ref --` keeps git from reading a missing ref as a path (which would discard edits)."""
    (repo / "a.txt").write_text("my edit\n")
    with pytest.raises(AetherError) as caught:
        await service.checkout(None, "a.txt")
    assert caught.value.code is ErrorCode.GIT_ERROR
    assert (repo / "a.txt").read_text() == "my edit\n"


# -- errors --------------------------------------------------------------------------------


async def test_not_a_repository(service: GitService, workspace: Path, tmp_path: Path) -> None:
    # The workspace lies inside a repository (tmp_path), which must not be found.
    init_repo(tmp_path)
    (workspace / "sub").mkdir()
    for repo in (None, "/sub"):
        with pytest.raises(AetherError) as caught:
            await service.status(repo)
        assert caught.value.code is ErrorCode.NOT_A_REPOSITORY
    with pytest.raises(AetherError) as caught:
        await service.status("/missing")
    assert caught.value.code is ErrorCode.NOT_A_REPOSITORY


async def test_a_repository_below_the_root(service: GitService, workspace: Path) -> None:
    inner = init_repo(workspace / "projects" / "app")
    commit_file(inner, "x.txt", "x\n")
    (inner / "x.txt").write_text("y\n")
    status = await service.status("/projects/app/")
    assert status["repo"] == "/projects/app"
    assert [f["path"] for f in status["files"]] == ["/projects/app/x.txt"]
    # A subdirectory of the work tree selects the same repository.
    (inner / "deep").mkdir()
    assert (await service.status("/projects/app/deep"))["repo"] == "/projects/app"
    with pytest.raises(AetherError) as caught:
        await service.stage("/projects/app", ["/elsewhere.txt"])
    assert caught.value.code is ErrorCode.INVALID_PATH


async def test_invalid_path_outside_the_root(service: GitService, repo: Path) -> None:
    for bad in ("/../..", "../outside", "/a/../../x"):
        with pytest.raises(AetherError) as caught:
            await service.status(bad)
        assert caught.value.code is ErrorCode.INVALID_PATH
    with pytest.raises(AetherError) as caught:
        await service.diff(None, paths=["/../etc/passwd"])
    assert caught.value.code is ErrorCode.INVALID_PATH
    link = repo / "link"
    link.symlink_to("/etc")
    with pytest.raises(AetherError) as caught:
        await service.status("/link")
    assert caught.value.code is ErrorCode.INVALID_PATH


async def test_git_error_carries_stderr_and_status(service: GitService, repo: Path) -> None:
    with pytest.raises(AetherError) as caught:
        await service.checkout(None, "no-such-branch")
    assert caught.value.code is ErrorCode.GIT_ERROR
    assert "no-such-branch" in caught.value.message
    assert caught.value.extra["exitCode"] not in (0, None)
    with pytest.raises(AetherError) as caught:
        await service.log(None, ref="no-such-ref")
    assert caught.value.code is ErrorCode.GIT_ERROR and caught.value.extra["exitCode"] == 128
    with pytest.raises(AetherError) as caught:
        await service.commit(None, "nothing staged")
    assert caught.value.code is ErrorCode.GIT_ERROR
    assert "nothing" in caught.value.message  # git says it on stdout; we pass it on


async def test_git_not_installed(workspace: Path, tmp_path: Path) -> None:
    init_repo(workspace)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    svc = GitService(Jail(workspace), search_path=str(empty))
    with pytest.raises(AetherError) as caught:
        await svc.status(None)
    assert caught.value.code is ErrorCode.GIT_NOT_INSTALLED
    missing = GitService(Jail(workspace), binary=str(tmp_path / "nowhere" / "git"))
    with pytest.raises(AetherError) as caught:
        await missing.log(None)
    assert caught.value.code is ErrorCode.GIT_NOT_INSTALLED
    # The same service finds git once PATH has it.
    real = GitService(Jail(workspace), search_path=os.path.dirname(shutil.which("git") or ""))
    assert (await real.status(None))["branch"] == "main"


def test_environment_never_prompts(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_DIR", "/elsewhere")
    monkeypatch.setenv("GIT_INDEX_FILE", "/elsewhere/index")
    env = GitService(Jail(workspace)).environment()
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["GIT_PAGER"] == "cat" and env["GIT_EDITOR"] == "true"
    assert env["LC_ALL"] == "C" and env["GIT_OPTIONAL_LOCKS"] == "0"
    assert "GIT_DIR" not in env and "GIT_INDEX_FILE" not in env
    assert "GIT_OPTIONAL_LOCKS" not in GitService(Jail(workspace)).environment(read=False)


async def test_a_hook_cannot_prompt_on_the_terminal(service: GitService, repo: Path) -> None:
    """Git runs without a controlling terminal: a hook asking /dev/tty fails at once."""
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'Password:' >&2\nread answer < /dev/tty || exit 3\n")
    hook.chmod(0o755)
    (repo / "a.txt").write_text("x\n")
    await service.stage(None, ["/a.txt"])
    with pytest.raises(AetherError) as caught:
        await service.commit(None, "blocked by the hook")
    assert caught.value.code is ErrorCode.GIT_ERROR
    assert "Password:" in caught.value.message


async def test_commit_without_identity_fails_quickly(
    service: GitService, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for name in IDENTITY:
        monkeypatch.delenv(name, raising=False)
    git(repo, "config", "--unset", "user.name")
    git(repo, "config", "--unset", "user.email")
    git(repo, "config", "user.useConfigOnly", "true")
    (repo / "a.txt").write_text("x\n")
    await service.stage(None, ["."])
    with pytest.raises(AetherError) as caught:
        await service.commit(None, "who am I")
    assert caught.value.code is ErrorCode.GIT_ERROR
    assert "identity" in caught.value.message.lower() or "name" in caught.value.message.lower()
    # Given an identity, it commits.
    made = await service.commit(None, "me", author_name="Ada", author_email="ada@example.com")
    assert len(made["sha"]) == 40


async def test_timeout_kills_the_whole_group(repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "hook.pid"
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\necho $$ > '{marker}'\nexec sleep 60\n")
    hook.chmod(0o755)
    svc = GitService(Jail(repo), timeout=2.0)
    (repo / "a.txt").write_text("x\n")
    await svc.stage(None, ["."])
    with pytest.raises(AetherError) as caught:
        await svc.commit(None, "slow hook")
    assert caught.value.code is ErrorCode.GIT_ERROR and "timed out" in caught.value.message
    assert caught.value.extra["exitCode"] is None
    assert svc.timeouts == 1 and svc.running == 0
    pid = int(marker.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie awaiting its reaper is gone too.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"

    await wait_for(gone, timeout=10)


async def test_output_is_bounded(repo: Path) -> None:
    for i in range(500):
        (repo / f"untracked-{i:03}.txt").write_text("x")
    svc = GitService(Jail(repo), max_output=4096)
    status = await svc.status(None)
    assert status["truncated"] is True
    assert 0 < len(status["files"]) < 500
    assert all(f["path"].startswith("/untracked-") for f in status["files"])
    for i in range(40):
        commit_file(repo, "a.txt", f"{i}\n", "x" * 100)
    with pytest.raises(AetherError) as caught:
        await svc.log(None, limit=1000)
    assert caught.value.code is ErrorCode.LIMIT_EXCEEDED


# -- the changed watch ---------------------------------------------------------------------


async def collect(service: GitService) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    events: list[dict[str, Any]] = []
    return events, service.subscribe(events.append)


async def test_changed_after_a_cli_commit(service: GitService, repo: Path) -> None:
    events, _ = await collect(service)
    release = service.hold()
    await wait_for(
        lambda: service.watching and service._watch is not None and len(service._watch._kinds) > 2
    )
    sha = commit_file(repo, "b.txt", "b\n")
    await wait_for(lambda: any(e["head"] == sha for e in events))
    assert events[-1] == {"repo": "/", "branch": "main", "head": sha}
    # Staging alone (the index) is a change too; so is a new branch ref.
    count = len(events)
    (repo / "c.txt").write_text("c\n")
    git(repo, "add", "c.txt")
    await wait_for(lambda: len(events) > count)
    count = len(events)
    git(repo, "branch", "deep/nested/branch")
    await wait_for(lambda: len(events) > count)
    count = len(events)
    git(repo, "checkout", "-q", "deep/nested/branch")
    await wait_for(lambda: any(e["branch"] == "deep/nested/branch" for e in events[count:]))
    await release()
    assert not service.watching


async def test_changed_for_a_repository_created_later(service: GitService, workspace: Path) -> None:
    events, _ = await collect(service)
    release = service.hold()
    await asyncio.sleep(0)
    assert service.watching
    init_repo(workspace)
    await wait_for(lambda: any(e["branch"] == "main" and e["head"] is None for e in events))
    sha = commit_file(workspace, "a.txt", "a\n")
    await wait_for(lambda: any(e["head"] == sha for e in events))
    await release()


async def test_holds_share_one_watch_and_stop_closes_it(service: GitService, repo: Path) -> None:
    first = service.hold()
    second = service.hold()
    watch = service._watch
    assert watch is not None and watch.fd is not None
    fd = watch.fd
    await first()
    await first()  # releasing twice counts once
    assert service._watch is watch
    await second()
    assert service._watch is None
    with pytest.raises(OSError):
        os.fstat(fd)  # the inotify fd is closed
    third = service.hold()
    assert service.watching
    await service.stop()
    assert not service.watching
    await third()
