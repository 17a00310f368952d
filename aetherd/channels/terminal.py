"""The terminal channel (PROTOCOL.md section 2): thin handlers over `TerminalManager`.

Output is not pushed: each (socket, session) pair is a pull stream registered with the
connection's writer, which asks for the next frame only when it can send one. A client
that reads slowly therefore holds no queued output; its cursor just lags in the
session's ring (see `aetherd.services.terminal`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from aetherd.errors import ErrorCode
from aetherd.protocol import Channel, Context, Empty, Peer, Slot, encode
from aetherd.protocol.terminal import (
    TerminalClose,
    TerminalCloseResult,
    TerminalCreate,
    TerminalCreateResult,
    TerminalInput,
    TerminalListResult,
    TerminalOutput,
    TerminalResize,
    TerminalSessionInfo,
    TerminalSessionRef,
    TerminalSessions,
)
from aetherd.services.fileio import wire_text
from aetherd.services.terminal import Attachment, Exit, TerminalManager, TerminalSession

channel = Channel("terminal", pushes=(TerminalOutput, TerminalClose, TerminalSessions))

# Output this small is interactive (an echo, a prompt) and jumps the writer's queue.
URGENT_BYTES = 4096


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def session_info(session: TerminalSession) -> TerminalSessionInfo:
    """A session as listed on the wire."""
    return TerminalSessionInfo(**_info_fields(session))


def _info_fields(session: TerminalSession) -> dict[str, Any]:
    """The fields of `TerminalSessionInfo` from the service's snake_case `info()`."""
    info = session.info()
    return {
        "session_id": info["session_id"],
        "pid": info["pid"],
        "command": wire_text(info["command"]),
        "cwd": wire_text(info["cwd"]),  # a directory name need not be UTF-8
        "cols": info["cols"],
        "rows": info["rows"],
        "created_at": _iso(info["created_at"]),
        "clients": info["clients"],
        "exited": info["exited"],
        "exit_code": info["exit_code"],
        "signal": info["signal"],
        "offset": info["offset"],
    }


class TerminalStream:
    """One session's output for one socket, pulled by the connection's writer."""

    def __init__(self, peer: Peer, session_id: str, streams: TerminalStreams) -> None:
        self.peer = peer
        self.session_id = session_id
        self._streams = streams
        self._prefix = output_prefix(session_id)
        self.attachment: Attachment | None = None
        self._remove: Callable[[], None] | None = None

    def start(self, attachment: Attachment) -> None:
        """Begin pulling from `attachment`."""
        self.attachment = attachment
        self._remove = self.peer.add_stream(self)

    def urgent(self) -> bool:
        """True when only a little output is waiting (an echo, a prompt): send it first."""
        attachment = self.attachment
        return attachment is not None and 0 < attachment.lag <= URGENT_BYTES

    def pull(self) -> str | bytes | None:
        """The next frame for this socket (output as UTF-8 bytes), or None."""
        attachment = self.attachment
        if attachment is None:
            return None
        # A paced socket shared by several busy streams asks for smaller frames.
        item = attachment.read(getattr(self.peer, "bulk_frame_bytes", None))
        if item is None:
            return None
        if isinstance(item, Exit):
            # Removing a stream while the writer iterates its streams is not safe: defer.
            asyncio.get_running_loop().call_soon(self.stop)
            return encode(
                TerminalClose(
                    session_id=self.session_id, exit_code=item.exit_code, signal=item.signal
                )
            )
        # The hot path: the bytes of encode(TerminalOutput(...)), built without pydantic
        # (tests/channels/test_terminal_frames.py holds the two equal).
        return output_json(self._prefix, item.offset, item.data, item.truncated)

    def stop(self) -> None:
        """Detach and unregister from the writer. Idempotent."""
        if self.attachment is not None:
            self.attachment.detach()
        if self._remove is not None:
            self._remove()
            self._remove = None
        self._streams.forget(self)


def output_prefix(session_id: str) -> bytes:
    """The constant head of a session's `output` frames, up to `"offset":`, in UTF-8."""
    return (
        b'{"channel":"terminal","type":"output","sessionId":'
        + orjson.dumps(session_id)
        + b',"offset":'
    )


def output_json(prefix: bytes, offset: int, data: str, truncated: bool) -> bytes:
    """The UTF-8 bytes of `encode(TerminalOutput(...))`, built by hand: the frame most
    often sent. orjson escapes the string and encodes it to UTF-8 in one pass (20x
    faster than `json`'s escaper plus `str.encode` on 64 KiB of output; its escapes are
    the same as `json`'s and pydantic's, which tests/channels/test_terminal_frames.py
    holds it to)."""
    return b"".join(
        (
            prefix,
            b"%d" % offset,
            b',"data":',
            orjson.dumps(data),
            b',"truncated":true}' if truncated else b"}",
        )
    )


class TerminalStreams:
    """One connection's terminal streams, by session id (the connection's `STREAMS` slot).

    Closed with the connection: every stream detaches, the sessions keep running.
    """

    def __init__(self) -> None:
        self._by_session: dict[str, TerminalStream] = {}

    def get(self, session_id: str) -> TerminalStream | None:
        """The stream of `session_id` on this connection, if attached."""
        return self._by_session.get(session_id)

    def replace(self, stream: TerminalStream) -> None:
        """Make `stream` this connection's stream of its session, stopping an older one."""
        old = self._by_session.get(stream.session_id)
        if old is not None:
            old.stop()  # a second create on the same socket restarts its replay
        self._by_session[stream.session_id] = stream

    def forget(self, stream: TerminalStream) -> None:
        """Drop `stream` (called by `stream.stop`)."""
        if self._by_session.get(stream.session_id) is stream:
            del self._by_session[stream.session_id]

    def __len__(self) -> int:
        return len(self._by_session)

    def close(self) -> None:
        """Detach every stream of the connection."""
        for stream in list(self._by_session.values()):
            stream.stop()


STREAMS: Slot[TerminalStreams] = Slot("terminal.streams", TerminalStreams)


def _manager(ctx: Context) -> TerminalManager:
    return ctx.services.terminals


def _attach(ctx: Context, session: TerminalSession, resume_from: int | None) -> None:
    streams = ctx.peer.slot(STREAMS)
    stream = TerminalStream(ctx.peer, session.id, streams)
    streams.replace(stream)
    stream.start(session.attach(ctx.peer.wake, resume_from))


@channel.handler(
    "create",
    TerminalCreate,
    reply=TerminalCreateResult,
    errors=(
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.INVALID_PATH,
        ErrorCode.NOT_FOUND,
        ErrorCode.NOT_DIRECTORY,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.BUSY,
    ),
)
async def create(ctx: Context, msg: TerminalCreate) -> TerminalCreateResult:
    """Start a session, or attach to the live one with this id (replaying its ring)."""
    manager = _manager(ctx)
    session = manager.find(msg.session_id)
    attached = session is not None
    if session is None:
        session = await manager.create(
            msg.session_id,
            command=msg.command,
            cwd=msg.cwd,
            env=msg.env,
            cols=msg.cols,
            rows=msg.rows,
        )
    elif session.alive and msg.cols is not None and msg.rows is not None:
        session.resize(msg.cols, msg.rows)
    elif session.alive and (msg.cols is not None or msg.rows is not None):
        session.resize(msg.cols or session.cols, msg.rows or session.rows)
    _attach(ctx, session, msg.resume_from)
    return TerminalCreateResult(**_info_fields(session), attached=attached)


@channel.handler(
    "input",
    TerminalInput,
    errors=(ErrorCode.SESSION_NOT_FOUND, ErrorCode.LIMIT_EXCEEDED),
)
async def input_(ctx: Context, msg: TerminalInput) -> None:
    """Write to the PTY (never blocks; bounded pending input)."""
    session = _manager(ctx).get(msg.session_id)
    session.write(msg.data.encode("utf-8", "surrogatepass"))


@channel.handler("resize", TerminalResize, errors=(ErrorCode.SESSION_NOT_FOUND,))
async def resize(ctx: Context, msg: TerminalResize) -> None:
    """Resize the PTY (the program gets SIGWINCH)."""
    _manager(ctx).get(msg.session_id).resize(msg.cols, msg.rows)


@channel.handler(
    "close",
    TerminalSessionRef,
    reply=TerminalCloseResult,
    errors=(ErrorCode.SESSION_NOT_FOUND,),
    concurrent=True,
)
async def close(ctx: Context, msg: TerminalSessionRef) -> TerminalCloseResult:
    """End the session: SIGHUP its processes, SIGKILL after the grace period."""
    exit_ = await _manager(ctx).close(msg.session_id)
    return TerminalCloseResult(
        session_id=msg.session_id, exit_code=exit_.exit_code, signal=exit_.signal
    )


@channel.handler("detach", TerminalSessionRef, errors=(ErrorCode.SESSION_NOT_FOUND,))
async def detach(ctx: Context, msg: TerminalSessionRef) -> None:
    """Stop streaming this session to this socket; the session keeps running."""
    _manager(ctx).get(msg.session_id)
    stream = ctx.peer.slot(STREAMS).get(msg.session_id)
    if stream is not None:
        stream.stop()


@channel.handler("list", Empty, reply=TerminalListResult)
async def list_(ctx: Context, msg: Empty) -> TerminalListResult:
    """Every session, live or exited-retained."""
    return TerminalListResult(sessions=[session_info(s) for s in _manager(ctx).sessions()])


@channel.on_connect
async def push_sessions(ctx: Context) -> None:
    """Tell a new socket which sessions it can reattach to."""
    sessions = [session_info(s) for s in _manager(ctx).sessions()]
    ctx.peer.send(TerminalSessions(sessions=sessions))
