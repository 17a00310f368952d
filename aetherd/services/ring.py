"""A byte ring addressed by absolute offsets: the output buffer of terminals and processes.

`OutputRing` keeps the last `capacity` bytes of one output stream. Offsets count every
byte the stream ever produced, so a client can say "from byte N" and get exactly the
bytes it missed, as long as they are still in the ring. Shared by the terminal service
(one ring per PTY) and the process service (one ring per stdout and stderr).
"""

from __future__ import annotations

from collections.abc import Callable


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


def _cut(byte_at: Callable[[int], int], end: int, floor: int = 0) -> int:
    """`_utf8_cut` over any indexable: looks back from `end` to no lower than `floor`."""
    for back in range(1, min(4, end - floor) + 1):
        byte = byte_at(end - back)
        if _is_continuation(byte):
            continue
        if byte >= 0xF8:
            return end  # never a valid lead byte
        if byte >= 0xF0:
            need = 4
        elif byte >= 0xE0:
            need = 3
        elif byte >= 0xC0:
            need = 2
        else:
            return end
        return end - back if back < need else end
    return end


def _utf8_cut(data: bytes | bytearray, end: int) -> int:
    """The largest cut <= `end` that does not split a UTF-8 sequence that started before it.

    Looks back at most 3 bytes for a lead byte whose sequence would cross `end`.
    Invalid bytes are left where they are (they decode to U+FFFD either way).
    """
    return _cut(data.__getitem__, end)


class OutputRing:
    """The last `capacity` bytes of a session's output, addressed by absolute offset.

    Starts empty and grows with the output (an idle session holds only its prompt).
    Once `capacity` bytes are held, the storage is a fixed circular buffer: an append
    is one copy of the new bytes, whatever the ring holds. (A bytearray trimmed from
    the front instead reallocates and copies the whole ring every eighth of its
    capacity, on fresh pages: docs/performance.md, issue 18 second pass.)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._store = bytearray()  # grows to `capacity`, then fixed
        self._head = 0  # index in _store of the byte at offset `start` (0 while growing)
        self._len = 0  # bytes held
        self.start = 0  # absolute offset of the oldest byte held

    @property
    def end(self) -> int:
        """Absolute offset one past the last byte written so far."""
        return self.start + self._len

    def __len__(self) -> int:
        return self._len

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add output, dropping the oldest bytes beyond the capacity."""
        size = len(data)
        if not size:
            return
        store, cap = self._store, self.capacity
        if len(store) < cap and self._len + size <= cap:
            store += data  # still growing: _head is 0 and the bytes are in order
            self._len += size
            return
        view = memoryview(data).cast("B")
        if size >= cap:
            # Only the last `capacity` bytes survive: they are the whole ring.
            self.start += self._len + size - cap
            if len(store) < cap:
                store += bytes(cap - len(store))
            store[:] = view[size - cap :]
            self._head, self._len = 0, cap
            return
        if len(store) < cap:
            store += bytes(cap - len(store))  # full size once; from now on circular
        pos = (self._head + self._len) % cap
        first = min(size, cap - pos)
        store[pos : pos + first] = view[:first]
        if first < size:
            store[: size - first] = view[first:]
        held = self._len + size
        if held > cap:
            excess = held - cap
            self._head = (self._head + excess) % cap
            self.start += excess
            held = cap
        self._len = held

    def _byte(self, rel: int) -> int:
        """The byte `rel` bytes after `start`."""
        return self._store[(self._head + rel) % self.capacity]

    def _bytes(self, rel: int, stop: int) -> bytes:
        """The bytes from `start + rel` to `start + stop`, in order (one copy)."""
        cap = self.capacity
        first = self._head + rel
        if first >= cap:
            first -= cap
        last = first + (stop - rel)
        with memoryview(self._store) as view:
            if last <= cap:
                return bytes(view[first:last])
            return b"".join((view[first:], view[: last - cap]))

    def chunk(self, offset: int, limit: int, final: bool) -> tuple[int, bytes]:
        """Up to `limit` bytes from `offset` (clamped into the ring), cut on a character boundary.

        Returns `(start, data)`. A trailing incomplete character is held back unless
        `final` (no more output will come), so a character never straddles two chunks.
        """
        start = max(offset, self.start)
        rel = start - self.start
        held = self._len
        if start == self.start and offset < self.start:
            # Resynchronised from the ring's start: skip a partial character there.
            skip = 0
            while skip < 3 and rel + skip < held and _is_continuation(self._byte(rel + skip)):
                skip += 1
            rel += skip
            start += skip
        stop = min(held, rel + limit)
        if stop > rel and not (final and stop == held):
            cut = _cut(self._byte, stop)
            if cut > rel:
                stop = cut
            elif stop == held:
                stop = rel  # only an incomplete character so far: wait for the rest
        if stop <= rel:
            return start, b""
        return start, self._bytes(rel, stop)

    def raw(self, offset: int, limit: int) -> tuple[int, bytes]:
        """Up to `limit` bytes from `offset` (clamped into the ring), uncut: for binary clients."""
        start = max(offset, self.start)
        rel = start - self.start
        stop = min(self._len, rel + limit)
        if stop <= rel:
            return start, b""
        return start, self._bytes(rel, stop)

    def text_start(self) -> int:
        """The ring's start, moved past a partial character that lost its head to trimming."""
        skip = 0
        while skip < 3 and skip < self._len and _is_continuation(self._byte(skip)):
            skip += 1
        return self.start + skip

    def contents(self) -> bytes:
        """Everything the ring holds, oldest first."""
        return self._bytes(0, self._len) if self._len else b""
