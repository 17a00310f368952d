"""A byte ring addressed by absolute offsets: the output buffer of terminals and processes.

`OutputRing` keeps the last `capacity` bytes of one output stream. Offsets count every
byte the stream ever produced, so a client can say "from byte N" and get exactly the
bytes it missed, as long as they are still in the ring. Shared by the terminal service
(one ring per PTY) and the process service (one ring per stdout and stderr).
"""

from __future__ import annotations


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


def _utf8_cut(data: bytes | bytearray, end: int) -> int:
    """The largest cut <= `end` that does not split a UTF-8 sequence that started before it.

    Looks back at most 3 bytes for a lead byte whose sequence would cross `end`.
    Invalid bytes are left where they are (they decode to U+FFFD either way).
    """
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
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


class OutputRing:
    """The last `capacity` bytes of a session's output, addressed by absolute offset.

    Starts empty and grows with the output (an idle session holds only its prompt).
    Deleting from the front of a bytearray is O(1) in CPython, so trimming is cheap.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = bytearray()
        self.start = 0  # absolute offset of _buf[0]

    @property
    def end(self) -> int:
        """Absolute offset one past the last byte written so far."""
        return self.start + len(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def append(self, data: bytes) -> None:
        """Add output, dropping the oldest bytes beyond the capacity."""
        self._buf += data
        excess = len(self._buf) - self.capacity
        if excess > 0:
            del self._buf[:excess]
            self.start += excess

    def chunk(self, offset: int, limit: int, final: bool) -> tuple[int, bytes]:
        """Up to `limit` bytes from `offset` (clamped into the ring), cut on a character boundary.

        Returns `(start, data)`. A trailing incomplete character is held back unless
        `final` (no more output will come), so a character never straddles two chunks.
        """
        start = max(offset, self.start)
        rel = start - self.start
        if start == self.start and offset < self.start:
            # Resynchronised from the ring's start: skip a partial character there.
            skip = 0
            while (
                skip < 3 and rel + skip < len(self._buf) and _is_continuation(self._buf[rel + skip])
            ):
                skip += 1
            rel += skip
            start += skip
        stop = min(len(self._buf), rel + limit)
        if stop > rel and not (final and stop == len(self._buf)):
            cut = _utf8_cut(self._buf, stop)
            if cut > rel:
                stop = cut
            elif stop == len(self._buf):
                stop = rel  # only an incomplete character so far: wait for the rest
        with memoryview(self._buf) as view:  # one copy, not two
            return start, bytes(view[rel:stop])

    def raw(self, offset: int, limit: int) -> tuple[int, bytes]:
        """Up to `limit` bytes from `offset` (clamped into the ring), uncut: for binary clients."""
        start = max(offset, self.start)
        rel = start - self.start
        stop = min(len(self._buf), rel + limit)
        with memoryview(self._buf) as view:
            return start, bytes(view[rel:stop])

    def text_start(self) -> int:
        """The ring's start, moved past a partial character that lost its head to trimming."""
        skip = 0
        while skip < 3 and skip < len(self._buf) and _is_continuation(self._buf[skip]):
            skip += 1
        return self.start + skip

    def contents(self) -> bytes:
        """Everything the ring holds."""
        return bytes(self._buf)
