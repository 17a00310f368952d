"""The files channel (PROTOCOL.md section 3). Every frame needs a requestId.

Thin handlers over `services.fs` (jailed file operations, disk work in threads),
`services.search` (`search` and `find`, section 12) and `services.watcher` (change
events, broadcast to every connection). The service
answers with wire-shaped dicts; each is validated into its reply model here, so a
shape the protocol does not declare never reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, TypeAdapter

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Context
from aetherd.protocol.files import (
    DeleteRequest,
    FileContent,
    FileEntry,
    FilePath,
    FileRenamed,
    FilesChange,
    FilesResync,
    FileStat,
    FileWritten,
    FindRequest,
    FindResult,
    PathRequest,
    ReadRequest,
    RenameRequest,
    SearchRequest,
    SearchResult,
    WriteRequest,
)
from aetherd.protocol.registry import Deferred, Wire
from aetherd.services.fs import FileSystem, decode_raw_path

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

channel = Channel("files", require_request_id=True, pushes=(FilesChange, FilesResync))

# What any path can answer: a bad path (jail), or an OS error of the shared errno table.
_PATH_ERRORS = (
    ErrorCode.INVALID_MESSAGE,  # neither `path` nor `rawPath`
    ErrorCode.INVALID_PATH,
    ErrorCode.NOT_FOUND,
    ErrorCode.NOT_DIRECTORY,
    ErrorCode.PERMISSION_DENIED,
)


def _pick(value: str | None, raw: str | None, name: str) -> str:
    """The path from `name`, or from its base64 `raw<Name>` form (non-UTF-8 names)."""
    if raw is not None:
        return decode_raw_path(raw)
    if value is None:
        raise AetherError(ErrorCode.INVALID_MESSAGE, f"missing field '{name}'", field=name)
    return value


def _target(msg: PathRequest) -> str:
    return _pick(msg.path, msg.raw_path, "path")


_ENTRIES: TypeAdapter[list[FileEntry]] = TypeAdapter(
    list[FileEntry], config=ConfigDict(defer_build=True)
)
# Entries validated per step of `list`: a directory may hold `files_list_max_entries`
# (100,000) of them, and validating them all at once would hold the event loop for
# about a second; in steps, the loop runs between them.
LIST_STEP = 2048


async def entries_of(raw: list[dict[str, Any]]) -> list[FileEntry]:
    """The service's entry dicts as models, yielding to the loop between steps."""
    out: list[FileEntry] = []
    for start in range(0, len(raw), LIST_STEP):
        if start:
            await asyncio.sleep(0)
        out.extend(_ENTRIES.validate_python(raw[start : start + LIST_STEP]))
    return out


@channel.handler(
    "list",
    PathRequest,
    reply=list[FileEntry],
    errors=(*_PATH_ERRORS, ErrorCode.LIMIT_EXCEEDED),
    concurrent=True,
)
async def list_(ctx: Context, msg: PathRequest) -> list[FileEntry]:
    """The entries of a directory: directories first, then by name."""
    return await entries_of(await ctx.services.fs.list(_target(msg)))


@channel.handler(
    "read",
    ReadRequest,
    reply=FileContent,
    errors=(*_PATH_ERRORS, ErrorCode.IS_DIRECTORY, ErrorCode.FILE_TOO_LARGE),
)
async def read(ctx: Context, msg: ReadRequest) -> Wire[FileContent] | Deferred:
    """One page of a file.

    Not `concurrent`: a small cached file is read on the loop at once (no task of its
    own, no extra loop iteration), and any other read is `Deferred` to the file
    executor, so it runs concurrently as before. The page is the service's wire-shaped
    dict, sent as `Wire` (tests/channels/test_files.py holds its bytes to FileContent's).
    """
    fs, path = ctx.services.fs, _target(msg)
    page = fs.read_cached(path, msg.offset, msg.length)
    if page is None:
        return Deferred(_read_in_thread(fs, path, msg.offset, msg.length))
    return Wire(page)


async def _read_in_thread(
    fs: FileSystem, path: str, offset: int, length: int | None
) -> Wire[FileContent]:
    return Wire(await fs.read_in_thread(path, offset, length))


@channel.handler(
    "write",
    WriteRequest,
    reply=FileWritten,
    errors=(
        *_PATH_ERRORS,
        ErrorCode.IS_DIRECTORY,
        ErrorCode.FILE_TOO_LARGE,
        ErrorCode.NO_SPACE,
        ErrorCode.CONFLICT,
    ),
    concurrent=True,
)
async def write(ctx: Context, msg: WriteRequest) -> FileWritten:
    """Write a file atomically (or append); CONFLICT when `expectedModified` is stale."""
    if msg.encoding == "base64":
        try:
            data = base64.b64decode(msg.content, validate=True)
        except (binascii.Error, ValueError):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'content': not valid base64",
                field="content",
            ) from None
    else:
        try:
            data = msg.content.encode("utf-8")
        except UnicodeEncodeError:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'content': holds a lone surrogate; send binary as base64",
                field="content",
            ) from None
    written = await ctx.services.fs.write(
        _target(msg), data, append=msg.append, expected_modified=msg.expected_modified
    )
    return FileWritten.model_validate(written)


@channel.handler(
    "mkdir",
    PathRequest,
    reply=FilePath,
    errors=(*_PATH_ERRORS, ErrorCode.ALREADY_EXISTS, ErrorCode.NO_SPACE),
    concurrent=True,
)
async def mkdir(ctx: Context, msg: PathRequest) -> FilePath:
    """Create a directory and its parents; an existing directory is fine."""
    return FilePath.model_validate(await ctx.services.fs.mkdir(_target(msg)))


@channel.handler(
    "delete",
    DeleteRequest,
    reply=FilePath,
    errors=(*_PATH_ERRORS, ErrorCode.CONFLICT),
    concurrent=True,
)
async def delete(ctx: Context, msg: DeleteRequest) -> FilePath:
    """Delete a file, a link, or a directory (CONFLICT: not empty and not recursive)."""
    deleted = await ctx.services.fs.delete(_target(msg), recursive=msg.recursive)
    return FilePath.model_validate(deleted)


@channel.handler(
    "rename",
    RenameRequest,
    reply=FileRenamed,
    errors=(
        *_PATH_ERRORS,
        ErrorCode.ALREADY_EXISTS,
        ErrorCode.IS_DIRECTORY,
        ErrorCode.NO_SPACE,
        ErrorCode.CONFLICT,
    ),
    concurrent=True,
)
async def rename(ctx: Context, msg: RenameRequest) -> FileRenamed:
    """Move `oldPath` to `newPath`; ALREADY_EXISTS unless `overwrite`."""
    old = _pick(msg.old_path, msg.raw_old_path, "oldPath")
    new = _pick(msg.new_path, msg.raw_new_path, "newPath")
    renamed = await ctx.services.fs.rename(old, new, overwrite=msg.overwrite)
    return FileRenamed.model_validate(renamed)


@channel.handler("stat", PathRequest, reply=FileStat, errors=_PATH_ERRORS, concurrent=True)
async def stat(ctx: Context, msg: PathRequest) -> FileStat:
    """A file's type, size, time and mode; a symlink is reported as its target."""
    return FileStat.model_validate(await ctx.services.fs.stat(_target(msg)))


def _where(path: str | None, raw: str | None) -> str:
    """The directory a search or find starts from (default: the root)."""
    if raw is not None:
        return decode_raw_path(raw)
    return "/" if path is None else path


_SEARCH_ERRORS = (*_PATH_ERRORS, ErrorCode.LIMIT_EXCEEDED)


@channel.handler(
    "search", SearchRequest, reply=SearchResult, errors=_SEARCH_ERRORS, concurrent=True
)
async def search(ctx: Context, msg: SearchRequest) -> SearchResult:
    """Lines that match, in path then line order (section 12); cancelled with the socket."""
    from aetherd.services.search import SearchQuery  # with the service, on first use

    result = await ctx.services.search.search(
        SearchQuery(
            query=msg.query,
            path=_where(msg.path, msg.raw_path),
            regex=msg.regex,
            case_sensitive=msg.case_sensitive,
            include=tuple(msg.include),
            exclude=tuple(msg.exclude),
            max_results=msg.max_results,
            context_lines=msg.context_lines,
        )
    )
    return SearchResult.model_validate(result)


@channel.handler("find", FindRequest, reply=FindResult, errors=_SEARCH_ERRORS, concurrent=True)
async def find(ctx: Context, msg: FindRequest) -> FindResult:
    """Files by name or glob, in path order (section 12)."""
    from aetherd.services.search import FindQuery  # with the service, on first use

    result = await ctx.services.search.find(
        FindQuery(
            pattern=msg.pattern,
            path=_where(msg.path, msg.raw_path),
            max_results=msg.max_results,
        )
    )
    return FindResult.model_validate(result)


def event_frame(event: dict[str, Any]) -> FilesChange | FilesResync:
    """The frame of one watcher event (`{"type": "change" | "resync", ...}`)."""
    if event.get("type") == "resync":
        return FilesResync.model_validate(event)
    return FilesChange.model_validate(event)


@channel.on_startup
async def wire_watcher(daemon: Daemon) -> None:
    """Broadcast every watcher event (change, resync) to every connection."""
    watcher = getattr(daemon.services, "watcher", None)
    if watcher is None:
        return

    def forward(event: dict[str, Any]) -> None:
        daemon.hub.broadcast(event_frame(event))

    watcher.subscribe(forward)
