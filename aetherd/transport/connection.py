"""One WebSocket connection: a bounded send queue, one writer task, keepalive and write timeout.

The handler task is the only reader. Everything else queues frames with `send()`,
which never blocks; the writer task drains the queue, then pulls from registered
outbound streams round-robin (flow-controlled sources such as terminal output).
A supervisor task sends pings, drops a peer that stops answering them, and aborts
a write that has been blocked longer than the write timeout.

Pacing of streams: output pulled from streams is sent at most `stream_window_bytes`
ahead of what the client has read. The writer sends a ping (payload: the stream bytes
sent so far) every half window; the client's pong, which comes once it has read
everything before the ping, moves the window. Queued replies and urgent streams (a
keystroke's echo) are never held, so on one socket they wait behind at most a window of
bulk output instead of everything the kernel's buffers hold (megabytes on loopback).
While more than one bulk stream is busy on a paced socket (each gave a frame within the
last four rounds), they are asked for frames of
`stream_shared_frame_bytes` (16 KiB) instead of their full size: an echo that comes
while the writer is busy waits behind one small frame, and a window holds several
sessions' output. A lone busy stream keeps its large frames (throughput, CPU per MB).

A client that stops reading is dropped after `write_timeout`, paced or not: held by the
window, the writer counts as blocked. Once the client has answered a window ping, bulk
output held for longer than `write_timeout` without a pong moving the window drops it
exactly as a write blocked that long does. A client that has never answered one (it
does not pong, or something between us eats pongs) is unpaced after
`stream_window_timeout` instead, and the write timeout applies to its writes as to any
unpaced client's.

Backpressure: the reader calls `wait_writable()` after each frame. It yields to the
writer whenever replies are queued, and it pauses while the queue holds more than
`send_queue_pause_frames` frames or `send_queue_pause_bytes` bytes, until the writer
has drained it to half. A client that pipelines thousands of requests therefore gets
every reply: it is read more slowly, never dropped. Only pushes the client did not
ask for (broadcasts) can still overflow the queue's hard limits.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from aetherd.metrics import Metrics
from aetherd.protocol.context import OutboundStream, Slot, T
from aetherd.protocol.models import Frame, encode
from aetherd.settings import Settings

log = logging.getLogger("aetherd.connection")

# Replies `send_now` may send in a row before the reader yields to the loop.
DIRECT_RUN = 8

# Close codes beyond aiohttp's enum, from RFC 6455 section 7.4.1.
CLOSE_POLICY = 1008


class Connection:
    """A connected client. Implements `aetherd.protocol.Peer`."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        settings: Settings,
        conn_id: str,
        metrics: Metrics,
        query: Mapping[str, str] | None = None,
    ) -> None:
        self.id = conn_id
        self.query: Mapping[str, str] = dict(query or {})
        self._metrics = metrics
        self._ws = ws
        self._settings = settings
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._streams: list[OutboundStream] = []
        self._rr = 0
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._pause_frames = min(settings.send_queue_pause_frames, settings.send_queue_frames // 2)
        self._pause_bytes = min(settings.send_queue_pause_bytes, settings.send_queue_bytes // 2)
        self.read_pauses = 0
        self._cleanups: list[Callable[[], Any]] = []
        self._slots: dict[Slot[Any], Any] = {}
        self._closed = False
        self._drop_reason: str | None = None
        self._writing = False  # a frame is being written (by the writer or `send_now`)
        self._wake_after_write = False  # the writer stood aside for `send_now`
        self._direct_run = 0  # replies sent by `send_now` since the loop last ran
        self.last_pong = time.monotonic()
        self._write_started: float | None = None
        self.frames_sent = 0
        self.bytes_sent = 0
        # Pacing of bulk stream output (see the module docstring).
        self._window = settings.stream_window_bytes
        self._streamed = 0  # bytes of bulk stream frames sent
        self._acked = 0  # of which the client has read at least this many (pongs)
        self._pinged_at = 0  # `_streamed` when the last window ping went out
        self._window_pings: deque[tuple[int, float]] = deque()  # (position, monotonic)
        self.window_waits = 0  # times bulk output waited for a pong (tests, metrics)
        self._window_answered = False  # the client has answered a window ping
        # Frame size for bulk streams (read by them in `pull()`): smaller while several
        # busy streams share a paced socket, so an echo waits behind less.
        self.bulk_frame_bytes: int | None = None
        self._bulk_pulls = 0  # bulk frames pulled so far
        self._bulk_seen: dict[OutboundStream, int] = {}  # stream -> `_bulk_pulls` at its last
        self._held_since: float | None = None  # bulk output first held by a full window

    # -- Peer interface ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed."""
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the send queue."""
        return self._queued_bytes

    def send(self, frame: Frame | str) -> None:
        """Queue a frame (a model, or text already encoded); never blocks.

        A peer whose queue overflows is dropped, never allowed to grow.
        """
        if not isinstance(frame, (str, Frame)):
            raise TypeError(f"send takes a Frame model, not {type(frame).__name__}")
        if self._closed or self._drop_reason:
            return
        text = frame if isinstance(frame, str) else encode(frame)
        if (
            len(self._queue) >= self._settings.send_queue_frames
            or self._queued_bytes + len(text) > self._settings.send_queue_bytes
        ):
            self._drop_reason = "send queue overflow"
            self._wake.set()
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        if len(self._queue) > self._pause_frames or self._queued_bytes > self._pause_bytes:
            self._writable.clear()
        self._wake.set()

    async def send_now(self, text: str) -> None:
        """Send a reply at once when nothing is queued and no frame is being written;
        else queue it (`send`).

        This saves the hand-off to the writer task: two loop iterations per request
        (the writer's wake-up, then its `sleep(0)`). The frame goes out before any
        stream output not yet pulled, as a queued reply would. Only while the
        transport's buffer is empty: then the write cannot wait for the client, and a
        client that does not read still meets the queue and the reader's pause.
        """
        if (
            self._queue
            or self._writing
            or self._closed
            or self._drop_reason
            or self._transport_buffered()
        ):
            self.send(text)
            return
        try:
            written = await self._write(text)
        finally:
            if self._wake_after_write:
                self._wake_after_write = False
                self._wake.set()
        if not written:
            self._wake.set()  # the writer sees the connection closed and ends
            return
        self._direct_run += 1
        if self._direct_run == 1:  # reset once the loop runs its next iteration
            asyncio.get_running_loop().call_soon(self._end_direct_run)

    def _end_direct_run(self) -> None:
        self._direct_run = 0

    def _transport_buffered(self) -> bool:
        """True unless the transport is known to hold no unsent bytes."""
        transport = getattr(getattr(self._ws, "_writer", None), "transport", None)
        if transport is None:
            return True
        try:
            return bool(transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return True

    def add_cleanup(self, func: Callable[[], Any]) -> None:
        """Run `func` (sync or async) when the connection ends."""
        self._cleanups.append(func)

    def slot(self, key: Slot[T]) -> T:
        """This connection's state for `key`, created on first use, closed with the socket."""
        try:
            value: T = self._slots[key]
        except KeyError:
            value = self._slots[key] = key.factory()
            close = getattr(value, "close", None)
            if callable(close):
                self._cleanups.append(close)
        return value

    def add_stream(self, stream: OutboundStream) -> Callable[[], None]:
        """Let the writer pull frames from `stream`; returns its remover."""
        self._streams.append(stream)
        self._wake.set()

        def remove() -> None:
            if stream in self._streams:
                self._streams.remove(stream)
            self._bulk_seen.pop(stream, None)

        return remove

    def wake(self) -> None:
        """Tell the writer a stream has data."""
        self._wake.set()

    def pong(self, payload: bytes) -> None:
        """A pong came: if it answers a window ping, the client has read that far."""
        self.last_pong = time.monotonic()
        if not payload.startswith(b"w") or not payload[1:].isdigit():
            return  # a keepalive pong, or not ours
        position = int(payload[1:])
        while self._window_pings and self._window_pings[0][0] <= position:
            self._window_pings.popleft()
        if position > self._acked:
            self._window_answered = True
            self._acked = min(position, self._streamed)
            self._held_since = None
            self._wake.set()

    def _window_full(self) -> bool:
        return bool(self._window) and self._streamed - self._acked >= self._window

    async def wait_writable(self) -> None:
        """The reader's turn to yield: let the writer run, and pause while the queue is high.

        Replies sent at once (`send_now`) queue nothing, so a client that pipelines
        requests would keep the reader busy for every frame already received: after
        `DIRECT_RUN` of them without the loop running in between, it yields too.
        """
        if not self._queue:
            if self._direct_run >= DIRECT_RUN:
                await asyncio.sleep(0)
            return
        if not self._writable.is_set():
            self.read_pauses += 1
            await self._writable.wait()
        else:
            # Frames the client already sent are buffered, so `ws.receive()` would not
            # yield; without this the writer would not run until the buffer is empty.
            await asyncio.sleep(0)

    # -- Tasks ------------------------------------------------------------------------
    def _next_frame(self) -> str | bytes | None:
        if self._queue:
            queued = self._queue.popleft()
            self._queued_bytes -= len(queued)
            if (
                not self._writable.is_set()
                and len(self._queue) <= self._pause_frames // 2
                and self._queued_bytes <= self._pause_bytes // 2
            ):
                self._writable.set()
            return queued
        # A stream may say it is urgent (an interactive session with a few bytes to
        # send, typically a keystroke's echo): it goes before the round-robin of bulk
        # streams, so an echo never waits behind a frame from every flooding session.
        for stream in self._streams:
            urgent = getattr(stream, "urgent", None)
            if urgent is not None and urgent():
                text = stream.pull()
                if text is not None:
                    return text
        if self._window_full():
            self.window_waits += 1
            if self._held_since is None:
                self._held_since = time.monotonic()
            return None  # bulk output waits for a pong (the writer is woken by it)
        count = len(self._streams)
        if self._window:
            # Busy: gave a bulk frame within the last few rounds (a stream whose program
            # was not scheduled for a moment stays busy).
            recent = self._bulk_pulls - 4 * count
            busy = sum(1 for last in self._bulk_seen.values() if last > recent)
            self.bulk_frame_bytes = self._settings.stream_shared_frame_bytes if busy > 1 else None
        for _ in range(count):
            stream = self._streams[self._rr % count]
            self._rr += 1
            text = stream.pull()
            if text is not None:
                self._streamed += len(text)
                self._bulk_pulls += 1
                self._bulk_seen[stream] = self._bulk_pulls
                return text
        return None

    async def run_writer(self) -> None:
        """Drain the queue and the streams until the connection closes."""
        ws = self._ws
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed:
                if self._drop_reason:
                    self._metrics.connections_dropped.labels("send_queue_overflow").inc()
                    await self.close(CLOSE_POLICY, self._drop_reason)
                    return
                if self._writing:  # `send_now` is writing; it wakes us when done
                    self._wake_after_write = True
                    break
                text = self._next_frame()
                if text is None:
                    break
                if not await self._write(text):
                    return
                if self._window and self._streamed - self._pinged_at >= self._window // 2:
                    await self._window_ping(ws)
                # send_str on loopback rarely yields; without this one busy stream
                # would starve every other task on the loop.
                await asyncio.sleep(0)

    async def _write(self, text: str | bytes) -> bool:
        """Write one frame (the writer's or `send_now`'s) and count it; False once the
        connection is gone (then marked closed)."""
        self._writing = True
        self._write_started = time.monotonic()
        try:
            if isinstance(text, bytes):  # already UTF-8 (terminal output)
                await self._ws.send_frame(text, WSMsgType.TEXT)
            else:
                await self._ws.send_str(text)
        except UnicodeEncodeError:
            # A lone surrogate (e.g. an undecodable file name) must not kill the writer.
            log.warning("frame with unencodable text replaced")
            assert isinstance(text, str)  # bytes are encoded already
            await self._ws.send_str(text.encode("utf-8", "replace").decode("utf-8"))
        except (ConnectionError, RuntimeError):
            self._closed = True
            self._writable.set()
            return False
        finally:
            self._writing = False
            self._write_started = None
        self.frames_sent += 1
        self.bytes_sent += len(text)
        self._metrics.frame_out(text)
        return True

    async def _window_ping(self, ws: web.WebSocketResponse) -> None:
        """Ping with the stream position: its pong says the client has read that far."""
        self._pinged_at = self._streamed
        self._window_pings.append((self._streamed, time.monotonic()))
        try:
            await ws.ping(b"w%d" % self._streamed)
        except (ConnectionError, RuntimeError):
            self._closed = True
            self._writable.set()

    def _held_too_long(self, now: float) -> bool:
        """Bulk output held by the window for `write_timeout`, for a client that pongs:
        it stopped reading, as surely as a write blocked that long says."""
        held = self._held_since
        return (
            held is not None
            and self._window_answered
            and self._window_full()
            and now - held > self._settings.write_timeout
        )

    def _check_window(self, now: float) -> None:
        """Unpace a client that has never answered a window ping (it still gets its output;
        the write timeout then applies to its writes)."""
        if self._window and self._window_pings and not self._window_answered:
            if now - self._window_pings[0][1] > self._settings.stream_window_timeout:
                log.info(
                    "window ping not answered; output no longer paced",
                    extra={"streamWindowTimeout": self._settings.stream_window_timeout},
                )
                self._window = 0
                self._window_pings.clear()
                self._held_since = None
                self._wake.set()

    async def supervise(self) -> None:
        """Ping on schedule, drop a peer without pongs, abort writes that block too long."""
        settings = self._settings
        tick = max(
            0.01,
            min(1.0, settings.ping_interval, settings.pong_timeout / 4, settings.write_timeout / 4),
        )
        next_ping = time.monotonic() + settings.ping_interval
        tick = min(tick, settings.stream_window_timeout / 4)
        while not self._closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            self._check_window(now)
            if (
                self._write_started is not None
                and now - self._write_started > settings.write_timeout
            ) or self._held_too_long(now):
                log.warning(
                    "client stopped reading; dropping it",
                    extra={"writeTimeout": settings.write_timeout, "paced": bool(self._window)},
                )
                self._metrics.connections_dropped.labels("write_timeout").inc()
                self.abort()
                return
            if now - self.last_pong > settings.pong_timeout:
                log.info("no pong; closing", extra={"pongTimeout": settings.pong_timeout})
                self._metrics.connections_dropped.labels("pong_timeout").inc()
                await self.close(WSCloseCode.GOING_AWAY, "pong timeout")
                return
            if now >= next_ping:
                next_ping = now + settings.ping_interval
                try:
                    await self._ws.ping()
                except (ConnectionError, RuntimeError):
                    self.abort()
                    return

    # -- Closing ----------------------------------------------------------------------
    def abort(self) -> None:
        """Drop the TCP connection at once (for a peer that no longer reads)."""
        self._closed = True
        self._wake.set()
        self._writable.set()
        writer = getattr(self._ws, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self, code: int = WSCloseCode.GOING_AWAY, message: str = "") -> None:
        """Close with `code`; abort the transport if the peer does not complete the close."""
        self._closed = True
        self._wake.set()
        self._writable.set()
        if self._ws.closed:
            return
        try:
            await asyncio.wait_for(self._ws.close(code=code, message=message.encode()), timeout=2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            self.abort()

    async def run_cleanups(self) -> None:
        """Run every registered cleanup once; one failing does not stop the rest."""
        self._closed = True
        cleanups, self._cleanups = self._cleanups, []
        for func in reversed(cleanups):
            try:
                result = func()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("connection cleanup failed")
        self._slots.clear()
        self._streams.clear()
        self._queue.clear()
        self._queued_bytes = 0
        self._writable.set()
