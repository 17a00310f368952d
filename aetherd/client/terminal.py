"""Terminals: `client.terminal.create()` / `attach()` give a `Terminal`, whose output is
an async iterator that stays continuous across reconnects.

Each `Terminal` remembers where its output stands: the byte offset after the last
frame it queued. When the socket drops, the client reconnects and sends `create` with
`resumeFrom` at that offset, so the daemon sends exactly the bytes that were missed.
A frame that overlaps what was already queued is trimmed; a frame from an older
attachment (it arrives after a re-attach was asked for, starting elsewhere) is dropped.
The one gap that cannot be avoided, output that left the daemon's ring meanwhile,
arrives marked `truncated`.

The output queue is bounded: when the reader falls behind, the terminal detaches and
re-attaches from its offset once the queue has drained to half, so a slow consumer
loses nothing and holds no more than the bound.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from aetherd.client.errors import AetherdError, ConnectionLost
from aetherd.client.follow import Follower
from aetherd.client.stream import Stream
from aetherd.protocol.terminal import (
    TerminalClose,
    TerminalCloseResult,
    TerminalCreateResult,
    TerminalListResult,
    TerminalOutput,
    TerminalSessionInfo,
)

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["Terminal", "TerminalAPI", "exit_status"]

log = logging.getLogger("aetherd.client")


def exit_status(exit_code: int | None, signal: int | None) -> int:
    """A shell's view of an exit: the code, or 128 + the signal that killed it."""
    if exit_code is not None:
        return exit_code
    if signal is not None:
        return 128 + signal
    return 1


class Terminal(Follower[TerminalOutput]):
    """One attached session. Iterate it for `TerminalOutput` frames; the iteration ends
    after the session's exit (`exit` then holds its `TerminalClose`)."""

    channel = "terminal"
    id_field = "sessionId"

    def __init__(self, api: TerminalAPI, session_id: str, resume_from: int | None) -> None:
        super().__init__(api)
        self.session_id = session_id
        self.info: TerminalSessionInfo | None = None
        self.exit: TerminalClose | None = None
        self._resume_from = resume_from  # where the first attach started
        self._expected: int | None = None  # byte offset after the last queued frame
        self._last_offset: int | None = None
        self._last_chars = 0
        self._await: int | None = None  # after a (re)attach: the offset the first frame has
        self._skip = 0  # characters to drop at `_await` (when the byte end was unknown)
        self._input: list[str] = []
        self._input_bytes = 0

    def __aiter__(self) -> Stream[TerminalOutput]:
        return self.output

    @property
    def offset(self) -> int | None:
        """The byte offset after the output queued so far (None before any output)."""
        return self._expected

    # -- output -------------------------------------------------------------------------

    def _resume_point(self) -> tuple[int | None, int]:
        if self._expected is not None:
            return self._expected, 0
        if self._last_offset is not None:
            return self._last_offset, self._last_chars
        return self._resume_from, 0

    def _on_output(self, frame: Frame) -> None:
        if self._paused or self.output.ended:
            return
        offset = frame.get("offset")
        data = frame.get("data")
        if not isinstance(offset, int) or not isinstance(data, str):
            return
        truncated = frame.get("truncated") is True
        if self._await is not None:
            if offset == self._await or (truncated and offset > self._await):
                self._await = None
                if truncated:
                    self._skip = 0
            else:
                return  # from an attachment that was replaced
        if self._skip:
            dropped = data[: self._skip]
            data = data[self._skip :]
            self._skip -= len(dropped)
            offset += len(dropped.encode("utf-8", "surrogatepass"))
            if not data:
                return
        elif self._expected is not None and offset < self._expected and not truncated:
            raw = data.encode("utf-8", "surrogatepass")
            cut = self._expected - offset
            if cut >= len(raw):
                return
            data = raw[cut:].decode("utf-8", "replace")
            offset = self._expected
        item = TerminalOutput(
            session_id=self.session_id, offset=offset, data=data, truncated=truncated or None
        )
        if not self.output.feed(item):
            self._pause()
            return
        self._last_offset, self._last_chars = offset, len(data)
        # With U+FFFD in the text the daemon may have replaced undecodable bytes, so the
        # byte length of the text is not the byte length of the output: resume from
        # this frame's start and skip its characters instead.
        self._expected = (
            None if "\ufffd" in data else offset + len(data.encode("utf-8", "surrogatepass"))
        )

    def _on_close(self, frame: Frame) -> None:
        if self._paused:
            # The exit reached an attachment this client no longer reads: the output
            # still queued for it may be lost. It is reported, not hidden.
            log.debug("session %s exited while its stream was paused", self.session_id)
        try:
            self.exit = TerminalClose.model_validate(frame)
        except ValueError:
            self.exit = TerminalClose(session_id=self.session_id, exit_code=None, signal=None)
        self._finish()

    @staticmethod
    async def _quiet(awaitable: Any) -> None:
        try:
            await awaitable
        except AetherdError:
            pass

    @property
    def follow_id(self) -> str:
        return self.session_id

    async def attach(
        self,
        *,
        internal: bool = False,
        cols: int | None = None,
        rows: int | None = None,
        create: dict[str, Any] | None = None,
    ) -> TerminalCreateResult:
        """Send `create` for this session from its resume point (used on every reattach)."""
        resume, skip = self._resume_point()
        self._await, self._skip = resume, skip
        self._expected = resume if not skip else None
        self._paused = False
        fields: dict[str, Any] = {
            **(create or {}),
            "sessionId": self.session_id,
            "resumeFrom": resume,
            "cols": cols,
            "rows": rows,
        }
        result: TerminalCreateResult = await self._client.request(
            "terminal", "create", fields, reply=TerminalCreateResult, internal=internal
        )
        self.info = result
        if create is None and not result.attached:
            # The session had gone, so `create` started a new one under its id: that is
            # not the stream this object follows. End the stray session and report it.
            await self._quiet(
                self._client.request(
                    "terminal", "close", {"sessionId": self.session_id}, internal=internal
                )
            )
            self._finish(AetherdError("SESSION_NOT_FOUND", f"session {self.session_id} is gone"))
        return result

    async def _flush_input(self) -> None:
        # Input typed while this runs is appended and sent by the same loop, in order.
        while self._input and not self.output.ended:
            data = self._input[0]
            await self._client.send(
                "terminal", "input", {"sessionId": self.session_id, "data": data}, internal=True
            )
            self._input.pop(0)
            self._input_bytes -= len(data.encode("utf-8", "surrogatepass"))

    # -- control ------------------------------------------------------------------------

    async def write(self, data: str) -> None:
        """Type `data` into the session. While reconnecting, input is kept (up to
        `pending_input_bytes`) and sent once the session is reattached."""
        if self.output.ended and self.exit is not None:
            raise AetherdError("SESSION_NOT_FOUND", f"session {self.session_id} has exited")
        if not self._client.connected or self._input:
            size = len(data.encode("utf-8", "surrogatepass"))
            if self._input_bytes + size > self._client.options.pending_input_bytes:
                raise AetherdError("LIMIT_EXCEEDED", "too much input while disconnected")
            self._input.append(data)
            self._input_bytes += size
            return
        try:
            await self._client.send(
                "terminal", "input", {"sessionId": self.session_id, "data": data}, internal=True
            )
        except ConnectionLost:
            self._input.append(data)  # sent after the reattach
            self._input_bytes += len(data.encode("utf-8", "surrogatepass"))

    async def resize(self, cols: int, rows: int) -> None:
        """Resize the PTY (the program gets SIGWINCH)."""
        await self._client.send(
            "terminal", "resize", {"sessionId": self.session_id, "cols": cols, "rows": rows}
        )

    async def close(self) -> TerminalCloseResult:
        """End the session (SIGHUP, then SIGKILL after the daemon's grace period)."""
        result: TerminalCloseResult = await self._client.request(
            "terminal", "close", {"sessionId": self.session_id}, reply=TerminalCloseResult
        )
        return result

    async def detach(self) -> None:
        """Stop following the session; it keeps running. The output stream ends."""
        self._api.forget(self)
        self.output.finish()
        if self._client.connected:
            await self._quiet(
                self._client.request("terminal", "detach", {"sessionId": self.session_id})
            )

    async def wait(self, timeout: float | None = None) -> TerminalClose | None:
        """Wait for the stream to end; the exit, or None when it ended otherwise."""
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            raise AetherdError("TIMEOUT", f"session {self.session_id} still running") from None
        return self.exit

    async def read_until(self, text: str, timeout: float = 10.0, limit: int = 1 << 20) -> str:
        """Read output until it contains `text` (bounded by `timeout` and `limit` chars);
        returns everything read."""
        seen = ""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in seen:
            if len(seen) > limit:
                raise AetherdError("LIMIT_EXCEEDED", f"{text!r} not within {limit} characters")
            try:
                item = await self.output.get(max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                raise AetherdError("NOT_FOUND", f"the session ended before {text!r}") from None
            seen += item.data
        return seen


class TerminalAPI:
    """`client.terminal`: create, attach, list; every attached `Terminal` survives
    reconnects."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._terminals: dict[str, Terminal] = {}
        client.on_push("terminal", "output", self._route("_on_output"))
        client.on_push("terminal", "close", self._route("_on_close"))
        client.on_restore(self._restore)
        client.on_restore(self._flush, late=True)
        client.on_end(self._end)

    def _route(self, method: str) -> Any:
        def route(frame: Frame) -> None:
            terminal = self._terminals.get(str(frame.get("sessionId")))
            if terminal is not None:
                getattr(terminal, method)(frame)

        return route

    def forget(self, terminal: Terminal) -> None:
        """Stop routing frames to `terminal`."""
        if self._terminals.get(terminal.session_id) is terminal:
            del self._terminals[terminal.session_id]

    def _adopt(self, terminal: Terminal) -> None:
        old = self._terminals.get(terminal.session_id)
        if old is not None:
            old._api.forget(old)
            old.output.finish()
        self._terminals[terminal.session_id] = terminal

    async def create(
        self,
        session_id: str | None = None,
        *,
        command: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        cols: int | None = None,
        rows: int | None = None,
        resume_from: int | None = None,
    ) -> Terminal:
        """Start a session (or attach to the live one with this id) and follow it."""
        session_id = session_id or f"client-{uuid.uuid4().hex[:12]}"
        terminal = Terminal(self, session_id, resume_from)
        self._adopt(terminal)
        create = {"command": command, "cwd": cwd, "env": env}
        try:
            await terminal.attach(cols=cols, rows=rows, create=create)
        except BaseException:
            self.forget(terminal)
            raise
        return terminal

    async def attach(
        self,
        session_id: str,
        *,
        resume_from: int | None = None,
        cols: int | None = None,
        rows: int | None = None,
    ) -> Terminal:
        """Follow an existing session: its scrollback (or from `resume_from`), then live.
        `SESSION_NOT_FOUND` when there is no such session."""
        if not any(s.session_id == session_id for s in await self.list()):
            raise AetherdError("SESSION_NOT_FOUND", f"no session {session_id!r}")
        terminal = Terminal(self, session_id, resume_from)
        self._adopt(terminal)
        try:
            await terminal.attach(cols=cols, rows=rows)
        except BaseException:
            self.forget(terminal)
            raise
        return terminal

    async def list(self) -> list[TerminalSessionInfo]:
        """Every session, live or exited-retained."""
        result: TerminalListResult = await self.client.request(
            "terminal", "list", reply=TerminalListResult
        )
        return result.sessions

    async def close(self, session_id: str) -> TerminalCloseResult:
        """End a session by id."""
        result: TerminalCloseResult = await self.client.request(
            "terminal", "close", {"sessionId": session_id}, reply=TerminalCloseResult
        )
        return result

    async def _restore(self, first: bool) -> None:
        if first or not self._terminals:
            return
        assert self.client.sessions_on_connect is not None
        try:
            pushed = await asyncio.wait_for(
                asyncio.shield(self.client.sessions_on_connect), self.client.options.request_timeout
            )
        except asyncio.TimeoutError:
            raise ConnectionLost("no session list from the daemon") from None
        live = {str(s.get("sessionId")) for s in pushed.get("sessions", []) if isinstance(s, dict)}
        for terminal in list(self._terminals.values()):
            if terminal.session_id not in live:
                terminal._finish(
                    AetherdError("SESSION_NOT_FOUND", f"session {terminal.session_id} is gone")
                )
                continue
            await terminal.attach(internal=True)

    async def _flush(self, first: bool) -> None:
        for terminal in list(self._terminals.values()):
            await terminal._flush_input()

    def _end(self, error: AetherdError | None) -> None:
        for terminal in list(self._terminals.values()):
            terminal._finish(error)
