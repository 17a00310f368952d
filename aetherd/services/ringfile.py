"""A terminal session's scrollback mirrored in a memory-mapped file, so it survives a crash.

Each session has, in the runtime directory's `rings/` (0700):

- `<hexid>.ring`: a header (magic, capacity, end offset) and a circular buffer of the
  last `capacity` bytes of output. Written as output arrives (a copy into shared
  memory, no system call); the end offset is updated after the bytes, so a reader never
  sees an end beyond what was written. On tmpfs (`$XDG_RUNTIME_DIR`) the pages belong to
  the file, not to the process: a SIGKILL loses nothing that was written.
- `<hexid>.json`: what the ring cannot say (id, pid, command, cwd, size, creation time,
  the daemon's pid), written at creation and on resize.

A restarted daemon that gets the session's PTY fd back from a keeper (`aetherd init`,
systemd's fd store) reads both and adopts the session at the same offsets.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

MAGIC = b"AETHRNG1"
HEADER = struct.Struct("<8sQQ")  # magic, capacity, end (absolute offset)
END_AT = 16


def ring_dir(runtime: Path) -> Path:
    """The rings directory under the runtime directory (created 0700)."""
    path = runtime / "rings"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def stem(directory: Path, session_id: str) -> Path:
    """The path of a session's files without suffix (the id in hex: any id is a safe name)."""
    return directory / session_id.encode().hex()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class RingFile:
    """The mapped mirror of one session's ring."""

    def __init__(self, base: Path, capacity: int, meta: dict[str, Any], end: int = 0) -> None:
        self.base = base
        self.capacity = capacity
        self.meta = meta
        path = base.with_suffix(".ring")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER.size + capacity)
            self._map = mmap.mmap(fd, HEADER.size + capacity)
        finally:
            os.close(fd)
        HEADER.pack_into(self._map, 0, MAGIC, capacity, end)
        _write_json(base.with_suffix(".json"), meta)

    def append(self, data: bytes | bytearray | memoryview, end: int) -> None:
        """Copy output ending at absolute offset `end` into the ring, then publish `end`."""
        cap = self.capacity
        view = memoryview(data)
        if len(view) > cap:
            view = view[len(view) - cap :]
        pos = (end - len(view)) % cap
        first = min(len(view), cap - pos)
        base = HEADER.size
        self._map[base + pos : base + pos + first] = view[:first]
        if first < len(view):
            self._map[base : base + len(view) - first] = view[first:]
        struct.pack_into("<Q", self._map, END_AT, end)

    def update(self, **fields: Any) -> None:
        """Rewrite the metadata with `fields` changed (a resize)."""
        self.meta.update(fields)
        with contextlib.suppress(OSError):
            _write_json(self.base.with_suffix(".json"), self.meta)

    def close(self, remove: bool) -> None:
        """Unmap; with `remove`, delete the files (the session is over)."""
        with contextlib.suppress(ValueError, BufferError):
            self._map.close()
        if remove:
            for suffix in (".ring", ".json"):
                with contextlib.suppress(OSError):
                    self.base.with_suffix(suffix).unlink()


def read(base: Path) -> tuple[dict[str, Any], int, bytes] | None:
    """A session's metadata, the absolute offset of its first kept byte, and the bytes.

    None when the files are missing or not a ring.
    """
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        raw = base.with_suffix(".ring").read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or len(raw) < HEADER.size:
        return None
    magic, capacity, end = HEADER.unpack_from(raw, 0)
    if magic != MAGIC or len(raw) != HEADER.size + capacity or capacity == 0:
        return None
    body = raw[HEADER.size :]
    size = min(end, capacity)
    pos = end % capacity
    data = body[pos - size : pos] if size <= pos else body[capacity - (size - pos) :] + body[:pos]
    return meta, end - size, data
