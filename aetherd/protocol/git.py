"""The git channel's frames (docs/protocol.md section 11), in both directions.

Client → server (every frame needs a `requestId`): `status`, `diff`, `log`, `branches`,
`stage`, `unstage`, `commit`, `checkout`. Server → client: the `changed` push and each
request's reply.

`repo` is a workspace path (default `/`, the root). Paths in replies are workspace
paths; a name that is not valid UTF-8 also comes as `rawPath`/`rawOldPath` (base64 of
its bytes), and requests accept such names back in `rawPaths`/`rawPath`, as on the
files channel.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from aetherd.protocol.models import Frame, Message, Model, omitted

__all__ = [
    "GitBranch",
    "GitBranches",
    "GitChanged",
    "GitCheckout",
    "GitCheckoutRequest",
    "GitCommitInfo",
    "GitCommitRequest",
    "GitCommitted",
    "GitDiff",
    "GitDiffFile",
    "GitDiffRequest",
    "GitDone",
    "GitLog",
    "GitLogRequest",
    "GitPathsRequest",
    "GitRemoteBranch",
    "GitRepoRequest",
    "GitStatus",
    "GitStatusFile",
]

RAW = "base64 of the exact bytes, only when the path is not valid UTF-8"
MAX_PATHS = 1000
# A revision or branch name: no leading `-` (never an option), no control characters.
Ref = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^[^\-\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"),
]
WirePath = Annotated[str, Field(max_length=4096)]
FileState = Literal[
    "unmodified",
    "modified",
    "added",
    "deleted",
    "renamed",
    "copied",
    "untracked",
    "ignored",
    "conflicted",
]

# -- client → server --------------------------------------------------------------------


class GitRepoRequest(Message):
    """`status`, `branches`: one repository (default the root)."""

    repo: WirePath | None = None


class GitPathsRequest(GitRepoRequest):
    """`stage`, `unstage`: workspace paths (`["."]`: every change of the repository)."""

    paths: list[WirePath] = Field(default_factory=list, max_length=MAX_PATHS)
    raw_paths: list[str] = Field(default_factory=list, max_length=MAX_PATHS)

    @model_validator(mode="after")
    def _some_path(self) -> GitPathsRequest:
        if not self.paths and not self.raw_paths:
            raise ValueError("'paths' must name at least one path (\".\" for all)")
        return self


class GitDiffRequest(GitRepoRequest):
    """`diff`: the changes of `mode`, limited to `paths` when given."""

    mode: Literal["worktree", "staged", "head", "main", "lastCommit"] = "worktree"
    paths: list[WirePath] = Field(default_factory=list, max_length=MAX_PATHS)
    raw_paths: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    context_lines: int = Field(3, strict=True, ge=0, le=10_000)
    max_bytes: int = Field(1024 * 1024, strict=True, ge=0, le=1 << 40)


class GitLogRequest(GitRepoRequest):
    """`log`: commits reachable from `ref`, newest first."""

    ref: Ref | None = None
    path: WirePath | None = None
    raw_path: str | None = None
    limit: int = Field(50, strict=True, ge=1, le=1000)
    skip: int = Field(0, strict=True, ge=0, le=1 << 40)


class GitCommitRequest(GitRepoRequest):
    """`commit`: the index (or, with `all`, every tracked change) as a new commit."""

    message: str = Field(min_length=1, max_length=256 * 1024)
    all: bool = Field(False, strict=True)
    author_name: str | None = Field(None, min_length=1, max_length=256)
    author_email: str | None = Field(None, max_length=256)

    @field_validator("message")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("holds a NUL character")
        return value

    @field_validator("author_name", "author_email")
    @classmethod
    def _ident(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "<>\n\r\x00"):
            raise ValueError("may not hold '<', '>', a newline or NUL")
        return value


class GitCheckoutRequest(GitRepoRequest):
    """`checkout`: switch to `ref`, or create branch `ref` at HEAD and switch to it."""

    ref: Ref
    create: bool = Field(False, strict=True)


# -- server → client: reply data --------------------------------------------------------


class GitStatusFile(Model):
    """One file of the `status` reply."""

    path: str
    raw_path: str | None = omitted(description=RAW)
    old_path: str | None = Field(description="The source of a rename or copy, else null")
    raw_old_path: str | None = omitted(description=RAW)
    index: FileState
    worktree: FileState
    submodule: Literal[True] | None = omitted(description="Present (true) for a submodule")


class GitStatus(Model):
    """The reply of `status`."""

    repo: str = Field(description="The workspace path of the repository's work tree")
    branch: str | None = Field(description="null when HEAD is detached")
    head: str | None = Field(description="HEAD's commit; null before the first commit")
    upstream: str | None
    ahead: int | None = Field(description="null without an upstream")
    behind: int | None = Field(description="null without an upstream")
    detached: bool
    files: list[GitStatusFile]
    truncated: bool = Field(description="The file list was cut at git_max_output")


class GitDiffFile(Model):
    """One file of the `diff` reply."""

    path: str
    raw_path: str | None = omitted(description=RAW)
    old_path: str | None = Field(description="The source of a rename, else null")
    raw_old_path: str | None = omitted(description=RAW)
    status: Literal["added", "modified", "deleted", "renamed"]
    additions: int = Field(ge=0)
    deletions: int = Field(ge=0)
    binary: bool
    patch: str | None = Field(description="null for a binary file, or past the maxBytes cap")
    truncated: Literal[True] | None = omitted(description="Present (true): `patch` was cut")
    submodule: Literal[True] | None = omitted(description="Present (true) for a submodule")


class GitDiff(Model):
    """The reply of `diff`."""

    base_ref: str | None = Field(description="The commit compared against; null for the index")
    files: list[GitDiffFile]
    truncated: bool


class GitCommitInfo(Model):
    """One commit of the `log` reply."""

    sha: str
    parents: list[str]
    author_name: str
    author_email: str
    authored_at: str = Field(description="ISO 8601 with the author's UTC offset")
    subject: str


class GitLog(Model):
    """The reply of `log`."""

    commits: list[GitCommitInfo]


class GitBranch(Model):
    """A local branch."""

    name: str
    sha: str
    upstream: str | None


class GitRemoteBranch(Model):
    """A remote-tracking branch (`origin/main`)."""

    name: str
    sha: str


class GitBranches(Model):
    """The reply of `branches`."""

    current: str | None = Field(description="null when HEAD is detached")
    local: list[GitBranch]
    remote: list[GitRemoteBranch]


class GitDone(Model):
    """The reply of `stage` and `unstage`: `{}`."""


class GitCommitted(Model):
    """The reply of `commit`."""

    sha: str


class GitCheckout(Model):
    """The reply of `checkout`."""

    branch: str | None = Field(description="null when HEAD is now detached")
    head: str | None


# -- server → client: pushes ------------------------------------------------------------


class GitChanged(Frame):
    """`changed`: HEAD, the index or a ref of the root repository changed (debounced)."""

    channel: Literal["git"] = "git"
    type: Literal["changed"] = "changed"
    repo: str = Field(description="Always `/`: only the root repository is watched")
    branch: str | None
    head: str | None
