"""The git channel (PROTOCOL.md section 11). Every frame needs a requestId.

Thin handlers over `services.git` (the real git binary, as asyncio subprocesses). A
connection that has made any git request holds the root repository's watch and gets
the `changed` pushes; the watch closes when the last such connection goes.

A lazy channel (`aetherd.channels`): imported at the first git frame, with the git
service behind it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aetherd.errors import ErrorCode
from aetherd.protocol import Channel, Context, Slot
from aetherd.protocol.git import (
    GitBranches,
    GitChanged,
    GitCheckout,
    GitCheckoutRequest,
    GitCommitRequest,
    GitCommitted,
    GitDiff,
    GitDiffRequest,
    GitDone,
    GitLog,
    GitLogRequest,
    GitPathsRequest,
    GitRepoRequest,
    GitStatus,
)
from aetherd.protocol.models import encode
from aetherd.services.fs import decode_raw_path

if TYPE_CHECKING:
    from aetherd.daemon import Daemon
    from aetherd.services.git import GitService

channel = Channel("git", require_request_id=True, pushes=(GitChanged,))


class _Interest:
    """Per connection: whether it made a git request, and its hold on the watch."""

    def __init__(self) -> None:
        self.release: Callable[[], Any] | None = None

    async def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            await release()


INTEREST = Slot("git.interest", _Interest)

_ERRORS = (
    ErrorCode.INVALID_PATH,
    ErrorCode.NOT_A_REPOSITORY,
    ErrorCode.GIT_ERROR,
    ErrorCode.GIT_NOT_INSTALLED,
    ErrorCode.LIMIT_EXCEEDED,
)


# The git services whose `changed` events go to the hub. A lazy channel has no startup
# hook: the hub is subscribed at the first git request, which is also the first
# connection that can be interested (only those get `changed`).
_WIRED: weakref.WeakSet[GitService] = weakref.WeakSet()


def _wire(daemon: Daemon, git: GitService) -> None:
    """Send every `changed` to the connections that made a git request (once per service)."""
    if git in _WIRED:
        return
    _WIRED.add(git)

    def send(event: dict[str, Any]) -> None:
        text = encode(GitChanged.model_validate(event))
        for peer in daemon.hub:
            if peer.slot(INTEREST).release is not None:
                peer.send(text)

    git.subscribe(send)


def _interested(ctx: Context) -> None:
    interest = ctx.peer.slot(INTEREST)
    if interest.release is None and not ctx.peer.closed:
        git = ctx.services.git
        _wire(ctx.daemon, git)
        interest.release = git.hold()


def _all_paths(paths: list[str], raw_paths: list[str]) -> list[str]:
    return [*paths, *(decode_raw_path(raw) for raw in raw_paths)]


@channel.handler("status", GitRepoRequest, reply=GitStatus, errors=_ERRORS, concurrent=True)
async def status(ctx: Context, msg: GitRepoRequest) -> GitStatus:
    """Branch, upstream, ahead/behind and the changed files."""
    _interested(ctx)
    return GitStatus.model_validate(await ctx.services.git.status(msg.repo))


@channel.handler(
    "diff", GitDiffRequest, reply=GitDiff, errors=(*_ERRORS, ErrorCode.NOT_FOUND), concurrent=True
)
async def diff(ctx: Context, msg: GitDiffRequest) -> GitDiff:
    """The files changed in `mode`, with counts and capped patches."""
    _interested(ctx)
    data = await ctx.services.git.diff(
        msg.repo,
        msg.mode,
        _all_paths(msg.paths, msg.raw_paths),
        msg.context_lines,
        msg.max_bytes,
    )
    return GitDiff.model_validate(data)


@channel.handler("log", GitLogRequest, reply=GitLog, errors=_ERRORS, concurrent=True)
async def log(ctx: Context, msg: GitLogRequest) -> GitLog:
    """Commits reachable from `ref`, newest first."""
    _interested(ctx)
    path = decode_raw_path(msg.raw_path) if msg.raw_path is not None else msg.path
    data = await ctx.services.git.log(msg.repo, msg.ref, path, msg.limit, msg.skip)
    return GitLog.model_validate(data)


@channel.handler("branches", GitRepoRequest, reply=GitBranches, errors=_ERRORS, concurrent=True)
async def branches(ctx: Context, msg: GitRepoRequest) -> GitBranches:
    """The current branch, local and remote-tracking branches."""
    _interested(ctx)
    return GitBranches.model_validate(await ctx.services.git.branches(msg.repo))


@channel.handler("stage", GitPathsRequest, reply=GitDone, errors=_ERRORS, concurrent=True)
async def stage(ctx: Context, msg: GitPathsRequest) -> GitDone:
    """Stage new, modified and deleted files under the paths."""
    _interested(ctx)
    paths = _all_paths(msg.paths, msg.raw_paths)
    return GitDone.model_validate(await ctx.services.git.stage(msg.repo, paths))


@channel.handler("unstage", GitPathsRequest, reply=GitDone, errors=_ERRORS, concurrent=True)
async def unstage(ctx: Context, msg: GitPathsRequest) -> GitDone:
    """Give the paths HEAD's version back in the index."""
    _interested(ctx)
    paths = _all_paths(msg.paths, msg.raw_paths)
    return GitDone.model_validate(await ctx.services.git.unstage(msg.repo, paths))


@channel.handler("commit", GitCommitRequest, reply=GitCommitted, errors=_ERRORS, concurrent=True)
async def commit(ctx: Context, msg: GitCommitRequest) -> GitCommitted:
    """A new commit of the index (or of every tracked change with `all`)."""
    _interested(ctx)
    data = await ctx.services.git.commit(
        msg.repo,
        msg.message,
        all_=msg.all,
        author_name=msg.author_name,
        author_email=msg.author_email,
    )
    return GitCommitted.model_validate(data)


@channel.handler("checkout", GitCheckoutRequest, reply=GitCheckout, errors=_ERRORS, concurrent=True)
async def checkout(ctx: Context, msg: GitCheckoutRequest) -> GitCheckout:
    """Switch to a branch or commit, or create a branch."""
    _interested(ctx)
    data = await ctx.services.git.checkout(msg.repo, msg.ref, create=msg.create)
    return GitCheckout.model_validate(data)
