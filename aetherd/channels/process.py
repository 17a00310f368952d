"""The process channel (PROTOCOL.md section 10): thin handlers over `ProcessManager`.

Output is not pushed: each (socket, process) pair is a pull stream registered with the
connection's writer, as on the terminal channel, so a client that reads slowly holds
no queued output; its cursors just lag in the process's rings.

Order on the wire: the reply to `start` and `attach` is queued before the stream is
registered with the writer (`call_soon`, after the handler's reply), and the writer
sends queued frames before it pulls streams, so a client always sees the reply first,
then the output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aetherd.errors import ErrorCode
from aetherd.protocol import Channel, Context, Empty, Peer, Slot, encode
from aetherd.protocol.process import (
    ProcessAttach,
    ProcessExec,
    ProcessExit,
    ProcessInfo,
    ProcessInput,
    ProcessListResult,
    ProcessOutput,
    ProcessRef,
    ProcessSignal,
    ProcessStart,
    ProcessStarted,
    ResumeOffsets,
)
from aetherd.protocol.registry import Deferred
from aetherd.services.fileio import wire_text
from aetherd.services.process import (
    Attachment,
    ExecResult,
    ManagedProcess,
    ProcessExitInfo,
    ProcessManager,
    parse_signal,
)

channel = Channel("process", pushes=(ProcessOutput, ProcessExit))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def process_info(process: ManagedProcess) -> ProcessInfo:
    """A process as listed on the wire."""
    info = process.info()
    return ProcessInfo(
        process_id=info["process_id"],
        pid=info["pid"],
        command=wire_text(info["command"]) if info["command"] is not None else None,
        argv=[wire_text(a) for a in info["argv"]] if info["argv"] is not None else None,
        cwd=wire_text(info["cwd"]),
        started_at=_iso(info["started_at"]),
        exited=info["exited"],
        exit_code=info["exit_code"],
        signal=info["signal"],
        stdin=info["stdin"],
        clients=info["clients"],
        offsets=ResumeOffsets(**info["offsets"]),
    )


def exit_frame(process_id: str, exit_: ProcessExitInfo) -> ProcessExit:
    """The `exit` push of a process."""
    return ProcessExit(
        process_id=process_id,
        exit_code=exit_.exit_code,
        signal=exit_.signal,
        timed_out=exit_.timed_out,
        duration_ms=exit_.duration_ms,
    )


class ProcessStream:
    """One process's output for one socket, pulled by the connection's writer."""

    def __init__(self, peer: Peer, process_id: str, streams: ProcessStreams) -> None:
        self.peer = peer
        self.process_id = process_id
        self._streams = streams
        self.attachment: Attachment | None = None
        self._remove: Callable[[], None] | None = None
        self._stopped = False

    def start(self, attachment: Attachment) -> None:
        """Begin pulling from `attachment` once the current reply is queued."""
        self.attachment = attachment
        asyncio.get_running_loop().call_soon(self._register)

    def _register(self) -> None:
        if not self._stopped and not self.peer.closed:
            self._remove = self.peer.add_stream(self)

    def pull(self) -> str | None:
        """The next frame for this socket, or None."""
        attachment = self.attachment
        if attachment is None:
            return None
        item = attachment.read()
        if item is None:
            return None
        if isinstance(item, ProcessExitInfo):
            # Removing a stream while the writer iterates its streams is not safe: defer.
            asyncio.get_running_loop().call_soon(self.stop)
            return encode(exit_frame(self.process_id, item))
        return encode(
            ProcessOutput(
                process_id=self.process_id,
                stream=item.stream,
                offset=item.offset,
                data=item.data,
                truncated=True if item.truncated else None,
            )
        )

    def stop(self) -> None:
        """Detach and unregister from the writer. Idempotent."""
        self._stopped = True
        if self.attachment is not None:
            self.attachment.detach()
        if self._remove is not None:
            self._remove()
            self._remove = None
        self._streams.forget(self)


class ProcessStreams:
    """One connection's process streams, by process id (the connection's `STREAMS` slot).

    Closed with the connection: every stream detaches, the processes keep running.
    """

    def __init__(self) -> None:
        self._by_process: dict[str, ProcessStream] = {}

    def get(self, process_id: str) -> ProcessStream | None:
        """The stream of `process_id` on this connection, if attached."""
        return self._by_process.get(process_id)

    def replace(self, stream: ProcessStream) -> None:
        """Make `stream` this connection's stream of its process, stopping an older one."""
        old = self._by_process.get(stream.process_id)
        if old is not None:
            old.stop()  # attaching again restarts the replay; it never doubles the stream
        self._by_process[stream.process_id] = stream

    def forget(self, stream: ProcessStream) -> None:
        """Drop `stream` (called by `stream.stop`)."""
        if self._by_process.get(stream.process_id) is stream:
            del self._by_process[stream.process_id]

    def __len__(self) -> int:
        return len(self._by_process)

    def close(self) -> None:
        """Detach every stream of the connection."""
        for stream in list(self._by_process.values()):
            stream.stop()


STREAMS: Slot[ProcessStreams] = Slot("process.streams", ProcessStreams)


def _manager(ctx: Context) -> ProcessManager:
    return ctx.services.processes


def _attach(ctx: Context, process: ManagedProcess, resume_from: dict[str, int] | None) -> None:
    streams = ctx.peer.slot(STREAMS)
    stream = ProcessStream(ctx.peer, process.id, streams)
    streams.replace(stream)
    stream.start(process.attach(ctx.peer.wake, resume_from))


def exec_reply(result: ExecResult) -> ProcessExec:
    """The reply of `start` with `wait: true`."""
    return ProcessExec(
        process_id=result.process_id,
        pid=result.pid,
        exit_code=result.exit.exit_code,
        signal=result.exit.signal,
        timed_out=result.exit.timed_out,
        duration_ms=result.exit.duration_ms,
        stdout=result.stdout,
        stderr=result.stderr,
        truncated=result.truncated,
    )


async def _wait_for(process: ManagedProcess) -> ProcessExec:
    await process.wait()
    return exec_reply(process.result())


@channel.handler(
    "start",
    ProcessStart,
    reply=ProcessStarted | ProcessExec,
    errors=(
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.INVALID_PATH,
        ErrorCode.NOT_FOUND,
        ErrorCode.NOT_DIRECTORY,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.CONFLICT,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.BUSY,
    ),
)
async def start(ctx: Context, msg: ProcessStart) -> ProcessStarted | Deferred:
    """Start a process; attach this socket, or with `wait` reply once it has exited."""
    process = _manager(ctx).spawn(
        command=msg.command,
        argv=msg.argv,
        process_id=msg.process_id,
        cwd=msg.cwd,
        env=msg.env,
        stdin=msg.stdin,
        timeout=msg.timeout,
        encoding=msg.encoding,
        wait=msg.wait,
    )
    if msg.wait:
        # Spawned now, in frame order (an `input` right behind this frame finds it);
        # the reply comes when it has exited, while this socket's other frames go on.
        return Deferred(_wait_for(process))
    _attach(ctx, process, None)
    return ProcessStarted(process_id=process.id, pid=process.pid)


@channel.handler(
    "input",
    ProcessInput,
    errors=(
        ErrorCode.NOT_FOUND,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.CONFLICT,
        ErrorCode.LIMIT_EXCEEDED,
    ),
)
async def input_(ctx: Context, msg: ProcessInput) -> None:
    """Write to stdin (never blocks; bounded pending input), then close it on `eof`."""
    process = _manager(ctx).get(msg.process_id)
    process.write(msg.data.encode("utf-8"), msg.eof)


@channel.handler(
    "signal",
    ProcessSignal,
    errors=(ErrorCode.NOT_FOUND, ErrorCode.INVALID_MESSAGE, ErrorCode.CONFLICT),
)
async def signal(ctx: Context, msg: ProcessSignal) -> None:
    """Send a signal to the process group."""
    process = _manager(ctx).get(msg.process_id)
    process.send_signal(parse_signal(msg.signal))


@channel.handler("attach", ProcessAttach, errors=(ErrorCode.NOT_FOUND,))
async def attach(ctx: Context, msg: ProcessAttach) -> None:
    """Replay each stream (from `resumeFrom`), then stream live; `exit` once it ended."""
    process = _manager(ctx).get(msg.process_id)
    resume = msg.resume_from.model_dump() if msg.resume_from is not None else None
    _attach(ctx, process, resume)


@channel.handler("detach", ProcessRef, errors=(ErrorCode.NOT_FOUND,))
async def detach(ctx: Context, msg: ProcessRef) -> None:
    """Stop streaming this process to this socket; the process keeps running."""
    _manager(ctx).get(msg.process_id)
    stream = ctx.peer.slot(STREAMS).get(msg.process_id)
    if stream is not None:
        stream.stop()


@channel.handler("list", Empty, reply=ProcessListResult)
async def list_(ctx: Context, msg: Empty) -> ProcessListResult:
    """Every process, live or exited-retained, oldest first."""
    return ProcessListResult(processes=[process_info(p) for p in _manager(ctx).processes()])
