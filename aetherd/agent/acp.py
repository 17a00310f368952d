"""The ACP client connection: JSON-RPC 2.0 over an agent process's stdio, bounded.

The Agent Client Protocol frames each JSON-RPC message as one line of JSON on the
agent's stdin (client to agent) and stdout (agent to client). `AcpConnection` starts
the agent (its own session and process group, in the workspace root, with the
workspace env), and speaks to it:

- `request(method, params)` sends a request and awaits its result (`AcpError` for a
  JSON-RPC error reply, `AcpClosed` when the agent goes away first);
- `notify(method, params)` sends a notification;
- the agent's requests go to `on_request(method, params)` (an awaitable; at most
  `max_requests` run at once, more are answered with an error at once) and its
  notifications to `on_notification(method, params)`, called in arrival order on the
  reader (so `session/update`s are never reordered, and all of a turn's updates are
  handled before the `session/prompt` reply that ends it).

Everything is bounded: stdout is read in chunks into one buffer of at most
`max_line` bytes; a longer line is dropped whole (logged) and reading goes on at the
next newline. A line that is not a JSON object is logged (at most a few times per
process) and skipped. stderr is drained into a ring of `stderr_bytes` (its tail is
reported when the agent dies). Nothing here grows with what the agent writes.

Why not the `agent-client-protocol` package (0.12.1, evaluated): its stdio transport
catches the stream limit's `LimitOverrunError` and keeps reading the rest of the line
into memory (an over-long line is unbounded), logs a traceback for every line that is
not JSON, starts one task per incoming message with no limit (and so may reorder
`session/update`s), and spawns agents outside a process group with a trimmed
environment; importing it also costs about 0.5 s here. The wire types we need are a
dozen, kept as lenient pydantic models in `aetherd.agent.acp_types`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("aetherd.agent.acp")

READ_CHUNK = 64 * 1024
GARBAGE_LOGGED = 5  # garbage lines logged per process; later ones are only counted

# JSON-RPC error codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RESOURCE_NOT_FOUND = -32002
SERVER_BUSY = -32000


class AcpError(Exception):
    """A JSON-RPC error: the agent's reply to our request, or ours to its request."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_obj(self) -> dict[str, Any]:
        """The JSON-RPC `error` object."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


class AcpClosed(Exception):
    """The agent process went away (or could not start); the reason is the message."""


RequestHandler = Callable[[str, Any], Awaitable[Any]]
NotificationHandler = Callable[[str, Any], None]


class StderrRing:
    """The last `limit` bytes an agent wrote on stderr."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        """Keep `chunk`, dropping the oldest bytes beyond the limit."""
        self.total += len(chunk)
        self.data += chunk[-self.limit :]
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def tail(self, chars: int = 2000) -> str:
        """The end of what was kept, as text."""
        return bytes(self.data[-chars:]).decode("utf-8", "replace").strip()


class AcpConnection:
    """One agent process and the JSON-RPC conversation with it."""

    def __init__(
        self,
        name: str,
        on_request: RequestHandler,
        on_notification: NotificationHandler,
        *,
        max_line: int,
        stderr_bytes: int,
        max_requests: int,
        write_timeout: float,
    ) -> None:
        self.name = name
        self.on_request = on_request
        self.on_notification = on_notification
        self.max_line = max_line
        self.max_requests = max_requests
        self.write_timeout = write_timeout
        self.stderr = StderrRing(stderr_bytes)
        self.process: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.garbage_lines = 0
        self.long_lines = 0
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.abandoned = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        """Start the agent in its own session and process group; AcpClosed if it cannot."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except FileNotFoundError:
            raise AcpClosed(
                f"cannot start agent {self.name!r}: no such program {argv[0]!r}"
            ) from None
        except PermissionError:
            raise AcpClosed(
                f"cannot start agent {self.name!r}: {argv[0]!r} is not executable"
            ) from None
        except OSError as exc:
            raise AcpClosed(f"cannot start agent {self.name!r}: {exc.strerror or exc}") from None
        self.pid = self.process.pid
        assert self.process.stdout is not None and self.process.stderr is not None
        self._reader = asyncio.create_task(
            self._read_stdout(self.process.stdout), name=f"acp-{self.name}-stdout"
        )
        self._stderr_reader = asyncio.create_task(
            self._read_stderr(self.process.stderr), name=f"acp-{self.name}-stderr"
        )
        log.info("agent backend started", extra={"backend": self.name, "pid": self.pid})

    @property
    def alive(self) -> bool:
        """True until the agent's stdout closed or the connection was stopped."""
        return self.process is not None and not self.closed.is_set()

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the agent's whole process group (it leads its own session)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def abandon(self, reason: str) -> None:
        """Kill the agent's group now and fail everything pending (it ignored a cancel)."""
        self.abandoned = True
        self.kill_group(signal.SIGKILL)
        self._close(reason)

    async def stop(self, grace: float) -> None:
        """End the agent: close its stdin, SIGTERM its group, SIGKILL after `grace`."""
        process = self.process
        if process is None:
            return
        self._close("the agent was stopped")
        if process.stdin is not None:
            with contextlib.suppress(Exception):
                process.stdin.close()
        if process.returncode is None:
            self.kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                self.kill_group(signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), 5)
        # Whatever is left of the group (children that outlived the leader).
        self.kill_group(signal.SIGKILL)
        await self._end_tasks()

    async def _end_tasks(self) -> None:
        tasks = [t for t in (self._reader, self._stderr_reader, *self._handlers) if t is not None]
        for task in tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(
            *(t for t in tasks if t is not asyncio.current_task()), return_exceptions=True
        )

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        error = AcpClosed(reason)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    async def wait_exit(self) -> int | None:
        """Reap the agent process; its exit status (negative: killed by a signal)."""
        if self.process is None:
            return None
        return await self.process.wait()

    def describe_exit(self) -> str:
        """Why the agent is gone: exit status and the tail of its stderr."""
        process = self.process
        code = process.returncode if process is not None else None
        if code is None:
            what = "closed its output"
        elif code < 0:
            what = f"was killed by signal {signal.Signals(-code).name if -code in signal.valid_signals() else -code}"
        else:
            what = f"exited with code {code}"
        tail = self.stderr.tail(600)
        return f"agent {self.name!r} {what}" + (f"; stderr: {tail}" if tail else "")

    # -- sending ---------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any]) -> None:
        if not self.alive:
            raise AcpClosed(self.close_reason or f"agent {self.name!r} is not running")
        assert self.process is not None and self.process.stdin is not None
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "replace"
        )
        async with self._write_lock:
            try:
                self.process.stdin.write(data + b"\n")
                await asyncio.wait_for(self.process.stdin.drain(), self.write_timeout)
            except asyncio.TimeoutError:
                raise AcpClosed(
                    f"agent {self.name!r} stopped reading its input for {self.write_timeout:g}s"
                ) from None
            except (ConnectionError, RuntimeError, OSError) as exc:
                raise AcpClosed(f"agent {self.name!r} closed its input: {exc}") from None

    async def request(self, method: str, params: Any, timeout: float | None = None) -> Any:
        """Send a request; its result, AcpError (the agent's error) or AcpClosed."""
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            )
            if timeout is None:
                return await future
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except asyncio.TimeoutError:
                raise AcpClosed(
                    f"agent {self.name!r} did not answer {method} within {timeout:g}s"
                ) from None
        finally:
            self._pending.pop(request_id, None)
            if not future.done():
                future.cancel()

    async def notify(self, method: str, params: Any) -> None:
        """Send a notification."""
        await self._send({"jsonrpc": "2.0", "method": method, "params": params})

    # -- receiving -------------------------------------------------------------------------
    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        buffer = bytearray()
        skipping = False  # inside a line that was too long: drop until its newline
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    break
                start = 0
                while True:
                    end = chunk.find(b"\n", start)
                    if end < 0:
                        if not skipping:
                            buffer += chunk[start:]
                            if len(buffer) > self.max_line:
                                self._too_long()
                                buffer.clear()
                                skipping = True
                        break
                    if skipping:
                        skipping = False
                    else:
                        buffer += chunk[start:end]
                        if len(buffer) > self.max_line:
                            self._too_long()
                        else:
                            self._line(bytes(buffer))
                    buffer.clear()
                    start = end + 1
                # Let handlers and other connections run between chunks of a flood.
                await asyncio.sleep(0)
        except Exception:
            log.exception("reading agent %r failed", self.name)
        finally:
            reason = self.describe_exit() if self.process else "closed"
            if self.process is not None and self.process.returncode is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.process.wait()), 2)
                reason = self.describe_exit()
            if not self.closed.is_set():
                log.warning("agent backend ended: %s", reason, extra={"backend": self.name})
            self._close(reason)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    return
                self.stderr.add(chunk)

    def _too_long(self) -> None:
        self.long_lines += 1
        log.warning(
            "agent %r wrote a line longer than %d bytes on stdout; it was dropped",
            self.name,
            self.max_line,
        )

    def _garbage(self, line: bytes, why: str) -> None:
        self.garbage_lines += 1
        if self.garbage_lines <= GARBAGE_LOGGED:
            shown = line[:120].decode("utf-8", "replace")
            log.warning(
                "agent %r wrote a line that is not a JSON-RPC message (%s), skipped: %r",
                self.name,
                why,
                shown,
            )

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except ValueError:
            self._garbage(line, "not JSON")
            return
        if not isinstance(message, dict):
            self._garbage(line, "not an object")
            return
        method = message.get("method")
        if isinstance(method, str):
            if "id" in message:
                self._incoming_request(message["id"], method, message.get("params"))
            else:
                try:
                    self.on_notification(method, message.get("params"))
                except Exception:
                    log.exception("handling %s from agent %r failed", method, self.name)
            return
        if "id" in message and ("result" in message or "error" in message):
            self._response(message)
            return
        self._garbage(line, "neither a request, a notification nor a response")

    def _response(self, message: dict[str, Any]) -> None:
        future = self._pending.get(message["id"]) if isinstance(message["id"], int) else None
        if future is None or future.done():
            return  # an answer to a request we gave up on
        error = message.get("error")
        if error is not None:
            if not isinstance(error, dict):
                error = {}
            code = error.get("code")
            text = error.get("message")
            future.set_exception(
                AcpError(
                    code if isinstance(code, int) else INTERNAL_ERROR,
                    str(text)[:2000] if text is not None else "error",
                    error.get("data"),
                )
            )
        else:
            future.set_result(message.get("result"))

    def _incoming_request(self, request_id: Any, method: str, params: Any) -> None:
        if len(self._handlers) >= self.max_requests:
            error = AcpError(SERVER_BUSY, f"more than {self.max_requests} requests at once")
            self._spawn(self._reply(request_id, None, error))
            return
        self._spawn(self._serve(request_id, method, params))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, request_id: Any, method: str, params: Any) -> None:
        try:
            result = await self.on_request(method, params)
        except AcpError as err:
            await self._reply(request_id, None, err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("serving %s for agent %r failed", method, self.name)
            await self._reply(request_id, None, AcpError(INTERNAL_ERROR, f"internal error: {exc}"))
        else:
            await self._reply(request_id, result, None)

    async def _reply(self, request_id: Any, result: Any, error: AcpError | None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if error is not None:
            message["error"] = error.to_obj()
        else:
            message["result"] = result
        with contextlib.suppress(AcpClosed):
            await self._send(message)
