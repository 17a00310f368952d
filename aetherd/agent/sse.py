"""A server-sent events parser (the WHATWG `text/event-stream` rules both providers follow).

Bytes arrive in arbitrary chunks: a line, a UTF-8 character or an event may be split
anywhere. Lines end in LF, CRLF or CR; `data:` lines of one event are joined with LF;
a blank line dispatches the event; lines starting with `:` are comments.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

_EOL = re.compile(r"[\r\n]")


@dataclass
class SSEEvent:
    """One dispatched event."""

    event: str
    data: str


class SSEParser:
    """Incremental parser: `feed(bytes)` returns the events completed by those bytes."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []
        self._data_size = 0
        self._max = max_event_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse `chunk`; return the events it completes."""
        text = self._decoder.decode(chunk)
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        self._buffer += text
        out: list[SSEEvent] = []
        while True:
            match = _EOL.search(self._buffer)
            if match is None:
                break
            cut = match.start()
            line = self._buffer[:cut]
            end = cut + 1
            if self._buffer[cut] == "\r":
                if end < len(self._buffer):
                    if self._buffer[end] == "\n":
                        end += 1
                else:
                    self._pending_cr = True
            self._buffer = self._buffer[end:]
            event = self._line(line)
            if event is not None:
                out.append(event)
        if len(self._buffer) > self._max:
            raise ValueError("server-sent event line too long")
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data, self._data_size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data_size += len(value)
            if self._data_size > self._max:
                raise ValueError("server-sent event too large")
            self._data.append(value)
        return None

    def finish(self) -> list[SSEEvent]:
        """Flush at end of stream (an event without its final blank line still counts)."""
        out = self.feed(b"\n\n") if (self._buffer or self._data) else []
        return out


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SSEEvent]:
    """Events from an async iterator of byte chunks."""
    parser = SSEParser()
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    for event in parser.finish():
        yield event
