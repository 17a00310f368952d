"""Processes (protocol section 10): `client.process.start()` gives a `Process` whose
stdout and stderr arrive as one async iterator of `ProcessOutput`, continuous across
reconnects, and whose exit is `ProcessExit`.

The client always asks the daemon for base64 output: each frame then covers exactly
its decoded bytes, so the offset after it is exact, and a reattach with
`resumeFrom: {stdout, stderr}` continues each stream with no gap and no duplicate.
With the default `encoding="utf-8"` the client decodes each stream incrementally (a
character split across frames is never mangled); with `encoding="base64"` the items
carry base64 of the raw bytes, as the daemon sends them (`Process.chunks()` yields
the bytes themselves).

A process attached by id (`attach`) that was started by someone else with text
output is followed by the UTF-8 length of its text; output with undecodable bytes
(U+FFFD) then resumes approximately (docs/protocol.md, section 2's gap).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from aetherd.client.errors import AetherdError, ConnectionLost
from aetherd.client.follow import Follower
from aetherd.client.stream import Stream
from aetherd.protocol.process import (
    ProcessExec,
    ProcessExit,
    ProcessInfo,
    ProcessListResult,
    ProcessOutput,
    ProcessStarted,
)

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["Process", "ProcessAPI"]

log = logging.getLogger("aetherd.client")
StreamName = Literal["stdout", "stderr"]
STREAMS: tuple[StreamName, ...] = ("stdout", "stderr")


class Process(Follower[ProcessOutput]):
    """One followed process. Iterate it for `ProcessOutput` (both streams, each in
    order); the iteration ends after the exit (`exit` then holds it)."""

    channel = "process"
    id_field = "processId"

    def __init__(
        self,
        api: ProcessAPI,
        process_id: str,
        *,
        raw: bool,
        encoding: Literal["utf-8", "base64"],
        resume_from: dict[str, int] | None = None,
    ) -> None:
        super().__init__(api)
        self.process_id = process_id
        self.pid: int | None = None
        self.exit: ProcessExit | None = None
        self.encoding = encoding
        self._raw = raw  # the daemon sends base64 (exact offsets)
        self._offsets: dict[str, int] = {s: (resume_from or {}).get(s, 0) for s in STREAMS}
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS}
        self._input: list[tuple[str, bool]] = []
        self._input_bytes = 0

    def __aiter__(self) -> Stream[ProcessOutput]:
        return self.output

    @property
    def offsets(self) -> dict[str, int]:
        """The end of each stream queued so far (what a reattach resumes from)."""
        return dict(self._offsets)

    async def chunks(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """`(stream, bytes)` pairs (for a process started with `encoding="base64"`)."""
        async for item in self.output:
            data = (
                base64.b64decode(item.data)
                if self.encoding == "base64"
                else item.data.encode("utf-8")
            )
            yield item.stream, data

    # -- output -------------------------------------------------------------------------

    def _on_output(self, frame: Frame) -> None:
        if self._paused or self.output.ended:
            return
        stream = frame.get("stream")
        offset = frame.get("offset")
        data = frame.get("data")
        if stream not in STREAMS or not isinstance(offset, int) or not isinstance(data, str):
            return
        truncated = frame.get("truncated") is True
        if self._raw:
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return
        else:
            raw = data.encode("utf-8", "surrogatepass")
        expected = self._offsets[stream]
        if offset > expected and not truncated:
            return  # from an attachment that was replaced; the new one starts at `expected`
        if offset < expected:
            cut = expected - offset
            if cut >= len(raw):
                return
            raw, offset = raw[cut:], expected
        if self.encoding == "base64":
            text = base64.b64encode(raw).decode("ascii")
        else:
            if truncated:
                self._decoders[stream].reset()
            text = self._decoders[stream].decode(raw)
        item = ProcessOutput(
            process_id=self.process_id,
            stream=stream,
            offset=offset,
            data=text,
            truncated=truncated or None,
        )
        if text and not self.output.feed(item):
            self._pause()
            return
        self._offsets[stream] = offset + len(raw)

    def _on_exit(self, frame: Frame) -> None:
        if self._paused:
            return  # seen again after the reattach, with the output before it
        for stream in STREAMS:
            tail = self._decoders[stream].decode(b"", final=True)
            if tail and self.encoding != "base64":
                self.output.feed(
                    ProcessOutput(
                        process_id=self.process_id,
                        stream=stream,
                        offset=self._offsets[stream],
                        data=tail,
                    )
                )
        try:
            self.exit = ProcessExit.model_validate(frame, extra="ignore")
        except ValueError:
            self.exit = ProcessExit(
                process_id=self.process_id,
                exit_code=None,
                signal=None,
                timed_out=False,
                duration_ms=0,
            )
        self._finish()

    @property
    def follow_id(self) -> str:
        return self.process_id

    async def attach(self, *, internal: bool = False) -> None:
        """Send `attach` from this process's offsets (used on every reattach)."""
        self._paused = False
        await self._client.request(
            "process",
            "attach",
            {"processId": self.process_id, "resumeFrom": dict(self._offsets)},
            internal=internal,
        )

    # -- control ------------------------------------------------------------------------

    async def write(self, data: str, eof: bool = False) -> None:
        """Write to stdin (started with `stdin=True`); `eof` closes it after `data`.
        While reconnecting, input is kept and sent after the reattach."""
        if not self._client.connected or self._input:
            size = len(data.encode("utf-8", "surrogatepass"))
            if self._input_bytes + size > self._client.options.pending_input_bytes:
                raise AetherdError("LIMIT_EXCEEDED", "too much input while disconnected")
            self._input.append((data, eof))
            self._input_bytes += size
            return
        try:
            await self._send_input(data, eof)
        except ConnectionLost:
            self._input.append((data, eof))
            self._input_bytes += len(data.encode("utf-8", "surrogatepass"))

    async def _send_input(self, data: str, eof: bool) -> None:
        fields: dict[str, Any] = {"processId": self.process_id, "data": data}
        if eof:
            fields["eof"] = True
        await self._client.request("process", "input", fields, internal=True)

    async def _flush_input(self) -> None:
        while self._input and not self.output.ended:
            data, eof = self._input[0]
            await self._send_input(data, eof)
            self._input.pop(0)
            self._input_bytes -= len(data.encode("utf-8", "surrogatepass"))

    async def close_stdin(self) -> None:
        """Close stdin (the program reads end of file)."""
        await self.write("", eof=True)

    async def signal(self, signal: str | int) -> None:
        """Signal the process group (`"SIGINT"`, `"SIGTERM"`, 9, ...)."""
        await self._client.request(
            "process", "signal", {"processId": self.process_id, "signal": signal}
        )

    async def detach(self) -> None:
        """Stop following it; it keeps running. The output stream ends."""
        self._api.forget(self)
        self.output.finish()
        if self._client.connected:
            try:
                await self._client.request("process", "detach", {"processId": self.process_id})
            except AetherdError:
                pass

    async def wait(self, timeout: float | None = None) -> ProcessExit | None:
        """Wait for the stream to end; the exit, or None when it ended otherwise."""
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            raise AetherdError("TIMEOUT", f"process {self.process_id} still running") from None
        return self.exit


class ProcessAPI:
    """`client.process`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._processes: dict[str, Process] = {}
        client.on_push("process", "output", self._route("_on_output"))
        client.on_push("process", "exit", self._route("_on_exit"))
        client.on_restore(self._restore)
        client.on_restore(self._flush, late=True)
        client.on_end(self._end)

    def _route(self, method: str) -> Any:
        def route(frame: Frame) -> None:
            process = self._processes.get(str(frame.get("processId")))
            if process is not None:
                getattr(process, method)(frame)

        return route

    def forget(self, process: Process) -> None:
        if self._processes.get(process.process_id) is process:
            del self._processes[process.process_id]

    def _adopt(self, process: Process) -> None:
        old = self._processes.get(process.process_id)
        if old is not None:
            old.output.finish()
        self._processes[process.process_id] = process

    async def start(
        self,
        command: str | None = None,
        *,
        argv: list[str] | None = None,
        process_id: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        encoding: Literal["utf-8", "base64"] = "utf-8",
    ) -> Process:
        """Start `command` (through `/bin/sh -c`) or `argv` (no shell) and follow it."""
        process_id = process_id or f"client-{uuid.uuid4().hex[:12]}"
        process = Process(self, process_id, raw=True, encoding=encoding)
        self._adopt(process)
        fields = {
            "command": command,
            "argv": argv,
            "processId": process_id,
            "cwd": cwd,
            "env": env,
            "stdin": stdin or None,
            "timeout": timeout,
            "encoding": "base64",
        }
        try:
            started: ProcessStarted = await self.client.request(
                "process", "start", fields, reply=ProcessStarted
            )
        except BaseException:
            self.forget(process)
            raise
        process.pid = started.pid
        return process

    async def run(
        self,
        command: str | None = None,
        *,
        argv: list[str] | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> ProcessExec:
        """Run to completion (`wait: true`): exit status and the end of each stream."""
        fields = {
            "command": command,
            "argv": argv,
            "cwd": cwd,
            "env": env,
            "timeout": timeout,
            "wait": True,
        }
        if request_timeout is None and timeout is not None:
            request_timeout = timeout + self.client.options.request_timeout
        result: ProcessExec = await self.client.request(
            "process", "start", fields, reply=ProcessExec, timeout=request_timeout
        )
        return result

    async def attach(
        self, process_id: str, *, resume_from: dict[str, int] | None = None
    ) -> Process:
        """Follow an existing process: its buffered output (from `resume_from`), then
        live. Its text output is followed as text (`encoding` as it was started)."""
        process = Process(self, process_id, raw=False, encoding="utf-8", resume_from=resume_from)
        self._adopt(process)
        try:
            await process.attach()
        except BaseException:
            self.forget(process)
            raise
        return process

    async def list(self) -> list[ProcessInfo]:
        """Every process, live or exited-retained, oldest first."""
        result: ProcessListResult = await self.client.request(
            "process", "list", reply=ProcessListResult
        )
        return result.processes

    async def _restore(self, first: bool) -> None:
        if first or not self._processes:
            return
        listed: ProcessListResult = await self.client.request(
            "process", "list", reply=ProcessListResult, internal=True
        )
        known = {p.process_id for p in listed.processes}
        for process in list(self._processes.values()):
            if process.process_id not in known:
                process._finish(AetherdError("NOT_FOUND", f"process {process.process_id} is gone"))
                continue
            await process.attach(internal=True)

    async def _flush(self, first: bool) -> None:
        for process in list(self._processes.values()):
            await process._flush_input()

    def _end(self, error: AetherdError | None) -> None:
        for process in list(self._processes.values()):
            process._finish(error)
