"""The terminal channel (PROTOCOL.md section 2): thin handlers over `TerminalManager`.

Output is not pushed: each (socket, session) pair is a pull stream registered with the
connection's writer, which asks for the next frame only when it can send one. A client
that reads slowly therefore holds no queued output; its cursor just lags in the
session's ring (see `aetherd.services.terminal`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from aetherd.protocol import Channel, Context, Empty, Message, Peer
from aetherd.services.terminal import Attachment, Exit, TerminalManager, TerminalSession

channel = Channel("terminal")

SessionId = Annotated[
    str, Field(strict=True, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
Dimension = Annotated[int, Field(strict=True, ge=1, le=1000)]

_encode = json.encoder.encode_basestring
# Output this small is interactive (an echo, a prompt) and jumps the writer's queue.
URGENT_BYTES = 4096  # C accelerated, keeps UTF-8 as is


class TerminalCreate(Message):
    """`create`: start a session, or attach to the live one with this id."""

    session_id: SessionId
    cols: Dimension | None = None
    rows: Dimension | None = None
    cwd: Annotated[str, Field(strict=True, max_length=4096)] | None = None
    env: dict[str, Annotated[str, Field(strict=True)]] | None = None
    command: Annotated[str, Field(strict=True, max_length=65536)] | None = None
    resume_from: Annotated[int, Field(strict=True, ge=0)] | None = None


class TerminalInput(Message):
    """`input`: bytes for the PTY, as a string."""

    session_id: SessionId
    data: Annotated[str, Field(strict=True)]


class TerminalResize(Message):
    """`resize`: the new size of the PTY."""

    session_id: SessionId
    cols: Dimension
    rows: Dimension


class TerminalSessionRef(Message):
    """`close` and `detach`: name a session."""

    session_id: SessionId


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def session_json(session: TerminalSession) -> dict[str, Any]:
    """A session as listed on the wire."""
    info = session.info()
    return {
        "sessionId": info["session_id"],
        "pid": info["pid"],
        "command": info["command"],
        "cwd": info["cwd"],
        "cols": info["cols"],
        "rows": info["rows"],
        "createdAt": _iso(info["created_at"]),
        "clients": info["clients"],
        "exited": info["exited"],
        "exitCode": info["exit_code"],
        "signal": info["signal"],
        "offset": info["offset"],
    }


def close_frame(session_id: str, exit_: Exit) -> dict[str, Any]:
    """`close`: how the session ended."""
    return {
        "channel": "terminal",
        "type": "close",
        "sessionId": session_id,
        "exitCode": exit_.exit_code,
        "signal": exit_.signal,
    }


class TerminalStream:
    """One session's output for one socket, pulled by the connection's writer."""

    def __init__(self, peer: Peer, session_id: str, attachments: dict[str, TerminalStream]) -> None:
        self.peer = peer
        self.session_id = session_id
        self._attachments = attachments
        self._prefix = (
            '{"channel":"terminal","type":"output","sessionId":'
            + _encode(session_id)
            + ',"offset":'
        )
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

    def pull(self) -> str | None:
        """The next frame for this socket, or None."""
        attachment = self.attachment
        if attachment is None:
            return None
        item = attachment.read()
        if item is None:
            return None
        if isinstance(item, Exit):
            # Removing a stream while the writer iterates its streams is not safe: defer.
            asyncio.get_running_loop().call_soon(self.stop)
            return json.dumps(close_frame(self.session_id, item), separators=(",", ":"))
        tail = ',"truncated":true}' if item.truncated else "}"
        return f'{self._prefix}{item.offset},"data":{_encode(item.data)}{tail}'

    def stop(self) -> None:
        """Detach and unregister from the writer. Idempotent."""
        if self.attachment is not None:
            self.attachment.detach()
        if self._remove is not None:
            self._remove()
            self._remove = None
        if self._attachments.get(self.session_id) is self:
            del self._attachments[self.session_id]


# Per socket: its streams by session id. Keyed by the connection id, which is unique
# in the process; the entry goes when the socket closes.
_peers: dict[str, dict[str, TerminalStream]] = {}


def _streams_of(peer: Peer) -> dict[str, TerminalStream]:
    streams = _peers.get(peer.id)
    if streams is None:
        streams = _peers[peer.id] = {}

        def detach_all() -> None:
            for stream in list(streams.values()):
                stream.stop()
            _peers.pop(peer.id, None)

        peer.add_cleanup(detach_all)
    return streams


def _manager(ctx: Context) -> TerminalManager:
    return ctx.services.terminals


def _attach(ctx: Context, session: TerminalSession, resume_from: int | None) -> None:
    streams = _streams_of(ctx.peer)
    old = streams.get(session.id)
    if old is not None:
        old.stop()  # a second create on the same socket restarts its replay
    stream = TerminalStream(ctx.peer, session.id, streams)
    streams[session.id] = stream
    stream.start(session.attach(ctx.peer.wake, resume_from))


@channel.handler("create", TerminalCreate)
async def create(ctx: Context, msg: TerminalCreate) -> dict[str, Any]:
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
    return {**session_json(session), "attached": attached}


@channel.handler("input", TerminalInput)
async def input_(ctx: Context, msg: TerminalInput) -> None:
    """Write to the PTY (never blocks; bounded pending input)."""
    session = _manager(ctx).get(msg.session_id)
    session.write(msg.data.encode("utf-8", "surrogatepass"))


@channel.handler("resize", TerminalResize)
async def resize(ctx: Context, msg: TerminalResize) -> None:
    """Resize the PTY (the program gets SIGWINCH)."""
    _manager(ctx).get(msg.session_id).resize(msg.cols, msg.rows)


@channel.handler("close", TerminalSessionRef, concurrent=True)
async def close(ctx: Context, msg: TerminalSessionRef) -> dict[str, Any]:
    """End the session: SIGHUP its processes, SIGKILL after the grace period."""
    exit_ = await _manager(ctx).close(msg.session_id)
    return {"sessionId": msg.session_id, "exitCode": exit_.exit_code, "signal": exit_.signal}


@channel.handler("detach", TerminalSessionRef)
async def detach(ctx: Context, msg: TerminalSessionRef) -> None:
    """Stop streaming this session to this socket; the session keeps running."""
    _manager(ctx).get(msg.session_id)
    stream = _streams_of(ctx.peer).get(msg.session_id)
    if stream is not None:
        stream.stop()


@channel.handler("list", Empty)
async def list_(ctx: Context, msg: Empty) -> dict[str, Any]:
    """Every session, live or exited-retained."""
    return {"sessions": [session_json(s) for s in _manager(ctx).sessions()]}


@channel.on_connect
async def push_sessions(ctx: Context) -> None:
    """Tell a new socket which sessions it can reattach to."""
    sessions = [session_json(s) for s in _manager(ctx).sessions()]
    ctx.peer.send({"channel": "terminal", "type": "sessions", "sessions": sessions})
