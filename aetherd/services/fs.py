"""File operations on the workspace, every path through the jail (PROTOCOL.md section 3).

`FileSystem` is the service the files channel, the HTTP bulk routes and the agent's
tools call. Every public coroutine runs its disk work in a thread, so no file of any
size blocks the event loop, and raises only `AetherError`.

Names on disk that are not valid UTF-8 arrive from `os.listdir` as surrogate-escaped
strings, which cannot be sent as UTF-8 JSON. `wire_text` replaces such bytes with
U+FFFD for `name`/`path`; `raw_b64` gives the exact bytes (base64) that a client
sends back as `rawPath` to address the same file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
import stat as stat_mod
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.fileio import (
    TEMP_NEW,
    TEMP_PREFIX,
    TEMP_UPD,
    AtomicWriter,
    LoopReadGate,
    advance_mtime,
    current_umask,
    is_temp_name,
    loop_read_gate,
    open_append,
    open_workspace_file,
    os_error,
    pread_cached,
    read_regular,
    wire_text,
    write_atomic,
)
from aetherd.services.jail import Jail

__all__ = [
    "TEMP_NEW",
    "TEMP_PREFIX",
    "TEMP_UPD",
    "AtomicWriter",
    "FileLimits",
    "FileSystem",
    "decode_raw_path",
    "is_temp_name",
    "os_error",
    "path_fields",
    "raw_b64",
    "wire_text",
    "write_atomic",
]

MiB = 1024 * 1024
BINARY_SNIFF = 8192
T = TypeVar("T")


# -- Wire helpers -------------------------------------------------------------------------


def raw_b64(text: str) -> str | None:
    """Base64 of the exact bytes of `text` when it is not valid UTF-8, else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    try:
        return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")
    except UnicodeEncodeError:  # a lone surrogate names no file: there are no bytes to give
        return None


def path_fields(key: str, wire_path: str) -> dict[str, str]:
    """`{key: display}` plus `raw<Key>` (base64 bytes) when the path is not valid UTF-8."""
    out = {key: wire_text(wire_path)}
    raw = raw_b64(wire_path)
    if raw is not None:
        out["raw" + key[0].upper() + key[1:]] = raw
    return out


def decode_raw_path(raw: str) -> str:
    """A `rawPath` (base64 of the path bytes) as the surrogate-escaped str the OS uses."""
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise AetherError(ErrorCode.INVALID_PATH, "rawPath is not valid base64") from None
    return data.decode("utf-8", "surrogateescape")


def iso_mtime(st: os.stat_result) -> str:
    """ISO 8601 UTC with microseconds and `Z`, e.g. `2026-11-27T21:03:01.123456Z`."""
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=nanos // 1000)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: str) -> datetime:
    """Parse a client's `expectedModified` (ISO 8601, `Z` or an offset)."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid field 'expectedModified': {value!r} is not an ISO 8601 time",
            field="expectedModified",
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp


def _mtime_dt(st: os.stat_result) -> datetime:
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=nanos // 1000)


# -- The service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileLimits:
    """Sizes the service enforces (from settings)."""

    max_file_size: int = 100 * MiB
    read_page_size: int = 4 * MiB
    max_list_entries: int = 100_000
    temp_max_age: float = 3600.0  # a writer's temp file older than this is a dead writer's
    loop_read_max: int = 64 * 1024  # files/read of a file this small runs on the loop; 0: never


class FileSystem:
    """Jailed file operations. Public coroutines return wire-ready dicts."""

    def __init__(
        self, jail: Jail, limits: FileLimits | None = None, gate: LoopReadGate | None = None
    ) -> None:
        self.jail = jail
        self.limits = limits or FileLimits()
        self._umask = current_umask()
        self._gate = gate

    # -- plumbing
    async def _run(self, wire_path: str, func: Callable[..., T], *args: Any) -> T:
        try:
            return await self.jail.executor.run(func, *args)
        except AetherError:
            raise
        except OSError as exc:
            raise os_error(exc, wire_path) from None

    def normalize(self, wire_path: str) -> str:
        """The lexical wire form of `wire_path` (`a/../b/` → `/b`); INVALID_PATH on escape."""
        self.jail.resolve(wire_path, follow_final=False)  # validates: NUL, length, escapes
        out: list[str] = []
        for part in wire_path.split("/"):
            if part == "..":
                out.pop()  # cannot underflow: the jail refused paths that climb out
            elif part not in ("", "."):
                out.append(part)
        return "/" + "/".join(out)

    def _inside(self, real: str) -> bool:
        return self.jail.is_inside(os.path.realpath(real))

    def _entry(self, directory: str, entry: os.DirEntry[str]) -> dict[str, Any]:
        is_link = entry.is_symlink()
        st: os.stat_result | None = None
        broken = False
        if is_link:
            target = os.path.join(directory, entry.name)
            if self._inside(target):
                try:
                    st = os.stat(target)
                except OSError:
                    broken = True
            else:
                broken = True  # dangling and outside look the same: nothing leaks
            if st is None:
                st = entry.stat(follow_symlinks=False)
        else:
            st = entry.stat(follow_symlinks=False)
        is_dir = stat_mod.S_ISDIR(st.st_mode) and not broken
        item: dict[str, Any] = {
            "name": wire_text(entry.name),
            "type": "directory" if is_dir else "file",
            "size": 0 if is_dir or broken else st.st_size,
            "modified": iso_mtime(st),
        }
        raw = raw_b64(entry.name)
        if raw is not None:
            item["rawName"] = raw
        if is_link:
            item["symlink"] = True
            if broken:
                item["broken"] = True
        return item

    # -- list
    def _list(self, wire_path: str) -> list[dict[str, Any]]:
        real = self.jail.resolve(wire_path)
        st = os.stat(real)
        if not stat_mod.S_ISDIR(st.st_mode):
            raise AetherError(ErrorCode.NOT_DIRECTORY, f"{wire_text(wire_path)}: not a directory")
        items: list[dict[str, Any]] = []
        limit = self.limits.max_list_entries
        with os.scandir(real) as entries:
            for entry in entries:
                if is_temp_name(entry.name):
                    self._drop_if_stale(entry)  # never listed: in flight, or a dead writer's
                    continue
                if len(items) >= limit:
                    raise AetherError(
                        ErrorCode.LIMIT_EXCEEDED,
                        f"{wire_text(wire_path)}: more than {limit} entries",
                    )
                try:
                    items.append(self._entry(str(real), entry))
                except FileNotFoundError:
                    continue  # removed while listing
        items.sort(key=lambda i: (i["type"] != "directory", i["name"]))
        return items

    def _drop_if_stale(self, entry: os.DirEntry[str]) -> None:
        """Remove the temp file of a writer that died (SIGKILL, power loss) long ago.

        A live write keeps its temp file's mtime fresh; one untouched for
        `files_temp_max_age` belongs to no one.
        """
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if (
                stat_mod.S_ISREG(st.st_mode)
                and time.time() - st.st_mtime > self.limits.temp_max_age
            ):
                os.unlink(entry.path)

    async def list(self, wire_path: str) -> list[dict[str, Any]]:
        """Entries of a directory: directories first, then by name."""
        return await self._run(wire_path, self._list, wire_path)

    # -- stat
    def _stat(self, wire_path: str) -> dict[str, Any]:
        wire = self.normalize(wire_path)
        real = self.jail.resolve(wire_path, follow_final=False)
        lst = os.lstat(real)
        is_link = stat_mod.S_ISLNK(lst.st_mode)
        st = lst
        broken = False
        if is_link:
            if self._inside(str(real)):
                try:
                    st = os.stat(real)
                except OSError:
                    broken = True
            else:
                broken = True
        is_dir = stat_mod.S_ISDIR(st.st_mode) and not broken
        name = wire.rsplit("/", 1)[-1] or "/"
        out: dict[str, Any] = {
            "name": wire_text(name),
            **path_fields("path", wire),
            "type": "directory" if is_dir else "file",
            "size": 0 if is_dir or broken else st.st_size,
            "modified": iso_mtime(st),
            "mode": stat_mod.S_IMODE(st.st_mode),
            "symlink": is_link,
        }
        if broken:
            out["broken"] = True
        return out

    async def stat(self, wire_path: str) -> dict[str, Any]:
        """`{name, path, type, size, modified, mode, symlink}` (mode: permission bits)."""
        return await self._run(wire_path, self._stat, wire_path)

    # -- read
    def _read(self, wire_path: str, offset: int, length: int | None) -> dict[str, Any]:
        fd, st = open_workspace_file(self.jail, wire_path)
        try:
            page = self._page(wire_path, fd, st, offset, length, cached_only=False)
        finally:
            os.close(fd)
        assert page is not None
        return page

    def _page(
        self,
        wire_path: str,
        fd: int,
        st: os.stat_result,
        offset: int,
        length: int | None,
        *,
        cached_only: bool,
    ) -> dict[str, Any] | None:
        """One page of the open file; with `cached_only`, None unless it is all in memory."""
        size = st.st_size
        if size > self.limits.max_file_size:
            raise AetherError(
                ErrorCode.FILE_TOO_LARGE,
                f"{wire_text(wire_path)}: {size} bytes is more than the "
                f"{self.limits.max_file_size}-byte limit; use the HTTP content route",
                size=size,
            )
        page = self.limits.read_page_size
        want = page if length is None else min(length, page)
        start = min(offset, size)
        if cached_only:
            cached = pread_cached(fd, min(want, size - start), start)
            if cached is None:
                return None
            data = cached
            sniffed = (
                data[:BINARY_SNIFF] if start == 0 else pread_cached(fd, min(BINARY_SNIFF, size), 0)
            )
            if sniffed is None:
                return None
            head = sniffed
        else:
            data = os.pread(fd, want, start) if want > 0 else b""
            head = data[:BINARY_SNIFF] if start == 0 else os.pread(fd, BINARY_SNIFF, 0)
        binary = b"\x00" in head
        content: str
        encoding = "base64"
        if not binary:
            end_of_file = start + len(data) >= size
            text_bytes = data if end_of_file else _trim_partial_utf8(data)
            try:
                content = text_bytes.decode("utf-8")
                encoding = "utf-8"
                data = text_bytes
            except UnicodeDecodeError:
                binary = True
        if encoding == "base64":
            content = base64.b64encode(data).decode("ascii")
        next_offset = start + len(data)
        return {
            "content": content,
            "encoding": encoding,
            "size": size,
            "modified": iso_mtime(st),
            "offset": start,
            "nextOffset": next_offset,
            "eof": next_offset >= size,
        }

    def _loop_reads(self) -> bool:
        if self.limits.loop_read_max <= 0:
            return False
        gate = self._gate or loop_read_gate()
        return gate.allowed()

    async def read(
        self, wire_path: str, offset: int = 0, length: int | None = None
    ) -> dict[str, Any]:
        """One page (at most `read_page_size` raw bytes) of a file.

        A small regular file (at most `loop_read_max` bytes) whose data is in the page
        cache is read on the event loop, without the hop to a thread: the opener never
        blocks on a FIFO or device (O_NONBLOCK, then fstat), the data is read with
        RWF_NOWAIT, and `LoopReadGate` keeps it off any network file system. Any other
        read, and a small one whose data is not cached, runs in the file executor.
        """
        page = self.read_cached(wire_path, offset, length)
        if page is not None:
            return page
        return await self.read_in_thread(wire_path, offset, length)

    def read_cached(
        self, wire_path: str, offset: int = 0, length: int | None = None
    ) -> dict[str, Any] | None:
        """`read`'s page when it can be read on the event loop now (a small regular file
        all in the page cache, on local file systems only), else None: the caller then
        reads it with `read_in_thread`. Runs on the loop; raises AetherError."""
        if not self._loop_reads():
            return None
        fd, st = open_workspace_file(self.jail, wire_path)  # raises AetherError only
        try:
            if st.st_size > self.limits.loop_read_max:
                return None
            return self._page(wire_path, fd, st, offset, length, cached_only=True)
        except OSError as exc:
            raise os_error(exc, wire_path) from None
        finally:
            os.close(fd)

    async def read_in_thread(
        self, wire_path: str, offset: int = 0, length: int | None = None
    ) -> dict[str, Any]:
        """`read` in the file executor, from the start (a thread that outlives a
        cancelled request must never hold an fd the loop closed)."""
        return await self._run(wire_path, self._read, wire_path, offset, length)

    def _read_bytes(self, wire_path: str, limit: int) -> bytes:
        data, st = read_regular(self.jail, self.jail.resolve(wire_path), wire_path, limit)
        if len(data) > limit:
            raise AetherError(
                ErrorCode.FILE_TOO_LARGE,
                f"{wire_text(wire_path)}: more than the {limit}-byte limit",
                size=st.st_size,
            )
        return data

    async def read_bytes(self, wire_path: str, max_size: int | None = None) -> bytes:
        """A whole file's bytes (for in-process callers such as the agent's tools).

        FILE_TOO_LARGE beyond `max_size` (default: the file cap).
        """
        limit = self.limits.max_file_size if max_size is None else max_size
        return await self._run(wire_path, self._read_bytes, wire_path, limit)

    # -- write
    def _write(
        self, wire_path: str, data: bytes, append: bool, expected: datetime | None
    ) -> dict[str, Any]:
        wire = self.normalize(wire_path)
        if wire == "/":
            raise AetherError(ErrorCode.IS_DIRECTORY, "/: is a directory")
        real = self.jail.resolve(wire_path)
        limit = self.limits.max_file_size
        try:
            current: os.stat_result | None = os.stat(real)
        except FileNotFoundError:
            current = None
        if current is not None and stat_mod.S_ISDIR(current.st_mode):
            raise AetherError(ErrorCode.IS_DIRECTORY, f"{wire_text(wire)}: is a directory")
        self._check_expected(wire, current, expected)
        total = len(data) + (current.st_size if append and current is not None else 0)
        if total > limit:
            raise AetherError(
                ErrorCode.FILE_TOO_LARGE,
                f"{wire_text(wire)}: {total} bytes is more than the {limit}-byte limit",
            )
        if append:
            fd, _ = open_append(self.jail, real, wire, self._umask)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if current is not None:
                    advance_mtime(fd, current)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        else:
            writer = AtomicWriter(self.jail, real, limit, self._umask).open()
            try:
                writer.write(data)
                # Checked again right before the rename: the narrowest window we can get.
                self._check_expected(wire, _stat_or_none(real), expected)
                st = writer.commit()
            except BaseException:
                writer.abort()
                raise
        return {**path_fields("path", wire), "size": st.st_size, "modified": iso_mtime(st)}

    def _check_expected(
        self, wire: str, current: os.stat_result | None, expected: datetime | None
    ) -> None:
        if expected is None:
            return
        if current is None or _mtime_dt(current) != expected:
            raise AetherError(
                ErrorCode.CONFLICT,
                f"{wire_text(wire)}: changed since {expected.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}",
                modified=iso_mtime(current) if current is not None else None,
            )

    async def write(
        self,
        wire_path: str,
        data: bytes,
        *,
        append: bool = False,
        expected_modified: str | None = None,
    ) -> dict[str, Any]:
        """Write (atomically unless `append`), creating parents. `{path, size, modified}`."""
        expected = parse_iso(expected_modified) if expected_modified is not None else None
        return await self._run(wire_path, self._write, wire_path, data, append, expected)

    # -- streaming, for HTTP bulk transfer
    async def begin_upload(self, wire_path: str) -> tuple[str, AtomicWriter]:
        """An open AtomicWriter for `wire_path` (parents created); the caller commits or aborts."""

        def begin() -> tuple[str, AtomicWriter]:
            wire = self.normalize(wire_path)
            if wire == "/":
                raise AetherError(ErrorCode.IS_DIRECTORY, "/: is a directory")
            real = self.jail.resolve(wire_path)
            return wire, AtomicWriter(
                self.jail, real, self.limits.max_file_size, self._umask
            ).open()

        return await self._run(wire_path, begin)

    async def upload_chunk(
        self, wire_path: str, writer: AtomicWriter, data: bytes | Sequence[bytes]
    ) -> None:
        """Write one chunk (or a list of pieces, written with one writev) of an upload."""
        await self._run(wire_path, writer.write, data)

    async def finish_upload(self, wire_path: str, writer: AtomicWriter) -> dict[str, Any]:
        """Commit an upload: `{path, size, modified}`."""
        st = await self._run(wire_path, writer.commit)
        wire = self.normalize(wire_path)
        return {**path_fields("path", wire), "size": st.st_size, "modified": iso_mtime(st)}

    async def abort_upload(self, writer: AtomicWriter) -> None:
        """Drop an upload's temp file."""
        await self.jail.executor.run(writer.abort)

    async def open_download(self, wire_path: str) -> tuple[int, os.stat_result]:
        """An open read-only fd of a regular file and its stat; the caller closes the fd."""

        return await self._run(wire_path, open_workspace_file, self.jail, wire_path)

    # -- mkdir
    def _mkdir(self, wire_path: str) -> dict[str, Any]:
        wire = self.normalize(wire_path)
        real = self.jail.resolve(wire_path)
        try:
            os.makedirs(real, exist_ok=True)
        except FileExistsError:
            raise AetherError(
                ErrorCode.ALREADY_EXISTS, f"{wire_text(wire)}: exists and is not a directory"
            ) from None
        return path_fields("path", wire)

    async def mkdir(self, wire_path: str) -> dict[str, Any]:
        """Create a directory and its parents; an existing directory is fine. `{path}`."""
        return await self._run(wire_path, self._mkdir, wire_path)

    # -- delete
    def _delete(self, wire_path: str, recursive: bool) -> dict[str, Any]:
        wire = self.normalize(wire_path)
        real = self.jail.resolve(wire_path, follow_final=False)
        if self.jail.is_root(real):
            raise AetherError(ErrorCode.INVALID_PATH, "the workspace root cannot be deleted")
        st = os.lstat(real)
        if stat_mod.S_ISDIR(st.st_mode):
            if recursive:
                shutil.rmtree(real)
            else:
                os.rmdir(real)
        else:
            os.unlink(real)  # a symlink is removed itself, never its target
        return path_fields("path", wire)

    async def delete(self, wire_path: str, *, recursive: bool = True) -> dict[str, Any]:
        """Delete a file, a symlink, or a directory (with its contents unless not recursive)."""
        return await self._run(wire_path, self._delete, wire_path, recursive)

    # -- rename
    def _rename(self, old_path: str, new_path: str, overwrite: bool) -> dict[str, Any]:
        old_wire, new_wire = self.normalize(old_path), self.normalize(new_path)
        old = self.jail.resolve(old_path, follow_final=False)
        new = self.jail.resolve(new_path, follow_final=False)
        if self.jail.is_root(old) or self.jail.is_root(new):
            raise AetherError(ErrorCode.INVALID_PATH, "the workspace root cannot be renamed")
        old_st = os.lstat(old)
        old_is_dir = stat_mod.S_ISDIR(old_st.st_mode)
        if old_is_dir and (str(new) + "/").startswith(str(old) + "/"):
            raise AetherError(
                ErrorCode.INVALID_PATH,
                f"{wire_text(old_wire)}: cannot move a directory into itself",
            )
        new_st = _lstat_or_none(new)
        if new_st is not None and old != new:
            if not overwrite:
                raise AetherError(
                    ErrorCode.ALREADY_EXISTS,
                    f"{wire_text(new_wire)}: already exists (pass overwrite: true)",
                )
            new_is_dir = stat_mod.S_ISDIR(new_st.st_mode)
            if new_is_dir and not old_is_dir:
                raise AetherError(ErrorCode.IS_DIRECTORY, f"{wire_text(new_wire)}: is a directory")
            if old_is_dir and not new_is_dir:
                raise AetherError(
                    ErrorCode.NOT_DIRECTORY, f"{wire_text(new_wire)}: not a directory"
                )
            if new_is_dir:
                shutil.rmtree(new)
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old, new)
        return {**path_fields("oldPath", old_wire), **path_fields("newPath", new_wire)}

    async def rename(
        self, old_path: str, new_path: str, *, overwrite: bool = False
    ) -> dict[str, Any]:
        """Move `old_path` to `new_path` (parents created). `{oldPath, newPath}`."""
        return await self._run(old_path, self._rename, old_path, new_path, overwrite)


def _trim_partial_utf8(data: bytes) -> bytes:
    """Drop an incomplete UTF-8 sequence at the end of a page (at most 3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII
            need = (
                1 if byte < 0x80 else 2 if byte >= 0xC0 and byte < 0xE0 else 3 if byte < 0xF0 else 4
            )
            return data if need <= back else data[:-back]
    return data


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
