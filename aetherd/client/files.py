"""Files: the socket's typed requests, the change stream, and streaming HTTP transfers.

`changes()` yields `FilesChange` events and `FilesResync` markers. The daemon sends a
resync when its watcher lost events; the client adds one of its own after every
reconnect (`reason: "reconnect"`: events are not replayed) and when a slow consumer's
queue overflowed (`reason: "client_overflow"`). On a resync, list again what you show.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from aetherd.client.errors import AetherdError
from aetherd.client.stream import Stream, Subscribers
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

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["FilesAPI", "Progress"]

FileEvent = FilesChange | FilesResync
Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def _resync(reason: str) -> FilesResync:
    # The wire model lists the daemon's reasons; the client's own are added unvalidated.
    return FilesResync.model_construct(reason=reason)  # type: ignore[arg-type]


class FilesAPI:
    """`client.files`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._subscribers: Subscribers[FileEvent] = Subscribers(client.options.stream_limit)
        client.on_push("files", "change", self._on_push)
        client.on_push("files", "resync", self._on_push)
        client.on_restore(self._restore)
        client.on_end(self._subscribers.end)

    # -- requests -----------------------------------------------------------------------

    async def _call(self, type_: str, reply: Any, **fields: Any) -> Any:
        return await self.client.request("files", type_, fields, reply=reply)

    async def list(self, path: str = "/") -> list[FileEntry]:
        """A directory's entries, directories first."""
        result: list[FileEntry] = await self._call("list", list[FileEntry], path=path)
        return result

    async def read(self, path: str, offset: int = 0, length: int | None = None) -> FileContent:
        """One page of a file (text, or base64 for binary)."""
        result: FileContent = await self._call(
            "read", FileContent, path=path, offset=offset, length=length
        )
        return result

    async def read_bytes(self, path: str, limit: int = 100 * 1024 * 1024) -> bytes:
        """A whole file over the socket, page by page (at most `limit` bytes)."""
        chunks: list[bytes] = []
        offset = total = 0
        while True:
            page = await self.read(path, offset)
            raw = (
                base64.b64decode(page.content)
                if page.encoding == "base64"
                else page.content.encode("utf-8")
            )
            chunks.append(raw)
            total += len(raw)
            if total > limit:
                raise AetherdError("FILE_TOO_LARGE", f"{path} is larger than {limit} bytes")
            if page.eof or page.next_offset <= offset:
                return b"".join(chunks)
            offset = page.next_offset

    async def write(
        self,
        path: str,
        content: str | bytes,
        *,
        append: bool = False,
        expected_modified: str | None = None,
    ) -> FileWritten:
        """Write a file (atomically unless `append`); bytes travel as base64."""
        if isinstance(content, bytes):
            text, encoding = base64.b64encode(content).decode("ascii"), "base64"
        else:
            text, encoding = content, "utf-8"
        result: FileWritten = await self._call(
            "write",
            FileWritten,
            path=path,
            content=text,
            encoding=encoding,
            append=append or None,
            expectedModified=expected_modified,
        )
        return result

    async def mkdir(self, path: str) -> FilePath:
        """Create a directory and its parents."""
        result: FilePath = await self._call("mkdir", FilePath, path=path)
        return result

    async def delete(self, path: str, recursive: bool = True) -> FilePath:
        """Delete a file or a directory."""
        result: FilePath = await self._call("delete", FilePath, path=path, recursive=recursive)
        return result

    async def rename(self, old_path: str, new_path: str, overwrite: bool = False) -> FileRenamed:
        """Move a file or directory."""
        result: FileRenamed = await self._call(
            "rename", FileRenamed, oldPath=old_path, newPath=new_path, overwrite=overwrite
        )
        return result

    async def stat(self, path: str) -> FileStat:
        """A path's type, size, time and mode."""
        result: FileStat = await self._call("stat", FileStat, path=path)
        return result

    # -- the change stream --------------------------------------------------------------

    def changes(self) -> Stream[FileEvent]:
        """Every change in the workspace from now on (close the stream to stop)."""
        return self._subscribers.add()

    def _on_push(self, frame: Frame) -> None:
        if not self._subscribers:
            return
        model: FileEvent
        if frame.get("type") == "resync":
            model = _resync(str(frame.get("reason")))
        else:
            model = FilesChange.model_validate(frame, extra="ignore")
        self._feed(model)

    def _feed(self, model: FileEvent) -> None:
        self._subscribers.feed(model, overflow=lambda: _resync("client_overflow"))

    async def _restore(self, first: bool) -> None:
        if not first:
            self._feed(_resync("reconnect"))

    # -- HTTP transfers -----------------------------------------------------------------

    def _url(self) -> str:
        return self.client.target.http_url("files/content")

    @staticmethod
    async def _http_error(resp: aiohttp.ClientResponse) -> AetherdError:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        code = str(body.get("code") or ("UNAUTHORIZED" if resp.status == 401 else "HTTP_ERROR"))
        message = str(body.get("error") or f"HTTP {resp.status}")
        return AetherdError(code, message, body)

    async def upload(
        self, local: str | os.PathLike[str], remote: str, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Stream a local file to `remote` (PUT; replaced atomically, parents created).
        Returns the daemon's `{path, size, modified}`."""
        await self.client.wait_ready()
        handle = await asyncio.to_thread(open, local, "rb")
        size = os.fstat(handle.fileno()).st_size
        chunk = self.client.options.http_chunk

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while True:
                piece = await asyncio.to_thread(handle.read, chunk)
                if not piece:
                    return
                sent += len(piece)
                if progress is not None:
                    progress(sent, size)
                yield piece

        headers = {**self.client.auth_headers(), "Content-Length": str(size)}
        try:
            async with self.client.http.put(
                self._url(), params={"path": remote}, data=body(), headers=headers
            ) as resp:
                if resp.status not in (200, 201):
                    raise await self._http_error(resp)
                result: dict[str, Any] = await resp.json()
                return result
        except aiohttp.ClientError as exc:
            raise AetherdError("HTTP_ERROR", f"upload of {remote} failed: {exc}") from None
        finally:
            handle.close()

    async def download(
        self, remote: str, local: str | os.PathLike[str], progress: Progress | None = None
    ) -> int:
        """Stream `remote` into a local file (written to a temp file, then renamed).
        Returns the number of bytes."""
        await self.client.wait_ready()
        target = Path(local)
        try:
            async with self.client.http.get(
                self._url(), params={"path": remote}, headers=self.client.auth_headers()
            ) as resp:
                if resp.status != 200:
                    raise await self._http_error(resp)
                return await self._save(resp, target, progress)
        except aiohttp.ClientError as exc:
            raise AetherdError("HTTP_ERROR", f"download of {remote} failed: {exc}") from None

    async def _save(
        self, resp: aiohttp.ClientResponse, target: Path, progress: Progress | None
    ) -> int:
        total = resp.content_length
        fd, temp = await asyncio.to_thread(
            tempfile.mkstemp, prefix=f".{target.name}.", dir=str(target.parent)
        )
        received = 0
        handle = os.fdopen(fd, "wb")
        try:
            async for piece in resp.content.iter_chunked(self.client.options.http_chunk):
                await asyncio.to_thread(handle.write, piece)
                received += len(piece)
                if progress is not None:
                    progress(received, total)
            handle.close()
            await asyncio.to_thread(os.replace, temp, target)
        except BaseException:
            handle.close()
            await asyncio.to_thread(_unlink, temp)
            raise
        return received


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
