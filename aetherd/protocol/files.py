"""The files channel's frames (docs/protocol.md section 3), in both directions.

Client → server: `list`, `read`, `write`, `mkdir`, `delete`, `rename`, `stat`, `search`,
`find` (every frame needs a `requestId`). Server → client: the `change` and `resync` pushes of the
watcher, and each operation's reply.

Paths: `path` (text), or `rawPath` (base64 of the path's bytes) for names that are not
UTF-8. Replies carry the text form with undecodable bytes as U+FFFD, plus the exact
bytes as `rawName`/`rawPath`/`rawOldPath`/`rawNewPath` only for such names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from aetherd.protocol.models import Frame, Message, Model, omitted

__all__ = [
    "DeleteRequest",
    "FileContent",
    "FileEntry",
    "FilePath",
    "FileRenamed",
    "FileStat",
    "FileWritten",
    "FilesChange",
    "FilesResync",
    "FindRequest",
    "FindResult",
    "PathRequest",
    "ReadRequest",
    "RenameRequest",
    "SearchMatch",
    "SearchRange",
    "SearchRequest",
    "SearchResult",
    "WriteRequest",
]

ISO_MICROS = "ISO 8601 UTC with microseconds and `Z`"
RAW = "base64 of the exact bytes, only when the name is not valid UTF-8"
FileType = Literal["file", "directory"]

# -- client → server --------------------------------------------------------------------
# Integers and booleans are strict, as on the terminal channel: `"5"`, or `1` for `true`,
# is refused with INVALID_MESSAGE rather than guessed at.


class PathRequest(Message):
    """`list`, `mkdir`, `stat`: one path, as text or as base64 bytes (`rawPath`)."""

    path: str | None = None
    raw_path: str | None = None


class ReadRequest(PathRequest):
    """`read`: one page of a file from `offset` (at most `files_read_page` bytes)."""

    offset: int = Field(0, strict=True, ge=0)
    length: int | None = Field(None, strict=True, ge=0)


class WriteRequest(PathRequest):
    """`write`: replace the file atomically, or `append` to it."""

    content: str
    encoding: Literal["utf-8", "utf8", "base64"] = "utf-8"
    append: bool = Field(False, strict=True)
    expected_modified: str | None = None


class DeleteRequest(PathRequest):
    """`delete`: a file, a link (never its target), or a directory."""

    recursive: bool = Field(True, strict=True)


class RenameRequest(Message):
    """`rename`: move `oldPath` to `newPath` (parents created)."""

    old_path: str | None = None
    new_path: str | None = None
    raw_old_path: str | None = None
    raw_new_path: str | None = None
    overwrite: bool = Field(False, strict=True)


# -- server → client: reply data --------------------------------------------------------


class FileEntry(Model):
    """An item of the `list` reply."""

    name: str
    type: FileType
    size: int = Field(ge=0)
    modified: str = Field(description=ISO_MICROS)
    raw_name: str | None = omitted(description=RAW)
    symlink: Literal[True] | None = omitted(description="Present (true) for a symlink")
    broken: Literal[True] | None = omitted(
        description="Present (true) for a link that dangles or points outside the root"
    )


class FileContent(Model):
    """The reply of `read`: one page; ask for `nextOffset` next."""

    content: str
    encoding: Literal["utf-8", "base64"] = Field(description="Decided per reply")
    size: int = Field(ge=0)
    modified: str = Field(description=ISO_MICROS)
    offset: int = Field(ge=0)
    next_offset: int = Field(ge=0)
    eof: bool


class FileWritten(Model):
    """The reply of `write`."""

    path: str
    raw_path: str | None = omitted(description=RAW)
    size: int = Field(ge=0)
    modified: str = Field(description=ISO_MICROS)


class FilePath(Model):
    """The reply of `mkdir` and `delete`."""

    path: str
    raw_path: str | None = omitted(description=RAW)


class FileRenamed(Model):
    """The reply of `rename`."""

    old_path: str
    raw_old_path: str | None = omitted(description=RAW)
    new_path: str
    raw_new_path: str | None = omitted(description=RAW)


class FileStat(Model):
    """The reply of `stat`."""

    name: str = Field(description="`/` for the root")
    path: str
    raw_path: str | None = omitted(description=RAW)
    type: FileType
    size: int = Field(ge=0)
    modified: str = Field(description=ISO_MICROS)
    mode: int = Field(ge=0, le=0o7777, description="Permission bits (st_mode & 0o7777)")
    symlink: bool
    broken: Literal[True] | None = omitted(
        description="Present (true) for a link that dangles or points outside the root"
    )


# -- server → client: pushes ------------------------------------------------------------


class FilesChange(Frame):
    """`change`: a debounced, coalesced change in the workspace (never replayed)."""

    channel: Literal["files"] = "files"
    type: Literal["change"] = "change"
    action: Literal["create", "modify", "delete", "rename"]
    path: str
    raw_path: str | None = omitted(description=RAW)
    is_directory: bool
    old_path: str | None = omitted(description="On `rename` only")
    raw_old_path: str | None = omitted(description=RAW)


class FilesResync(Frame):
    """`resync`: events were dropped; clients should list again what they show."""

    channel: Literal["files"] = "files"
    type: Literal["resync"] = "resync"
    reason: Literal["watch_limit", "overflow"]


# -- search and find (docs/protocol.md section 12) ------------------------------------------

GLOBS_MAX = 100
GLOB_CHARS = 1000


class SearchRequest(Message):
    """`search`: lines of the workspace's files that match `query`."""

    query: str = Field(min_length=1, max_length=GLOB_CHARS)
    regex: bool = Field(False, strict=True)
    case_sensitive: bool | None = Field(None, strict=True)
    path: str | None = None
    raw_path: str | None = None
    include: list[str] = Field(default_factory=list, max_length=GLOBS_MAX)
    exclude: list[str] = Field(default_factory=list, max_length=GLOBS_MAX)
    max_results: int = Field(1000, strict=True, ge=1, le=10_000)
    context_lines: int = Field(0, strict=True, ge=0, le=10)

    @field_validator("include", "exclude")
    @classmethod
    def _short_globs(cls, value: list[str]) -> list[str]:
        if any(len(glob) > GLOB_CHARS for glob in value):
            raise ValueError(f"a glob is longer than {GLOB_CHARS} characters")
        return value


class FindRequest(Message):
    """`find`: files whose name holds `pattern`, or whose path matches it as a glob."""

    pattern: str = Field(min_length=1, max_length=GLOB_CHARS)
    path: str | None = None
    raw_path: str | None = None
    max_results: int = Field(1000, strict=True, ge=1, le=10_000)


class SearchRange(Model):
    """A match within `text`: character (code point) offsets, end excluded."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)


class SearchMatch(Model):
    """One matching line."""

    path: str
    raw_path: str | None = omitted(description=RAW)
    line: int = Field(ge=1, description="From 1")
    column: int = Field(ge=1, description="Of the first match, in characters from 1")
    text: str = Field(description="The line, at most 500 characters")
    text_offset: int = Field(
        ge=0, description="Characters of the line before `text` (0 unless a long line was cut)"
    )
    ranges: list[SearchRange]
    before: list[str] | None = omitted(description="Up to `contextLines` lines before")
    after: list[str] | None = omitted(description="Up to `contextLines` lines after")


class SearchResult(Model):
    """The reply of `search`."""

    matches: list[SearchMatch]
    truncated: bool
    files_searched: int = Field(ge=0)
    engine: Literal["ripgrep", "python"]


class FindResult(Model):
    """The reply of `find`."""

    paths: list[str]
    raw_paths: list[str | None] | None = omitted(
        description="Beside `paths`, one for one, when a path is not valid UTF-8"
    )
    truncated: bool
