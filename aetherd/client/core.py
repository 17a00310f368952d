"""`Client`: one WebSocket to the daemon, requests matched by `requestId`, pushes routed
to their streams, and reconnection.

The connection's life is one task (`_run`): open the socket, start the reader, run
every channel API's restorer (reattach terminals and processes with `resumeFrom`,
re-list ports, compare the config), mark the client ready, wait for the socket to
drop, then reconnect with jittered exponential backoff. A request made while the
client is reconnecting waits (within its timeout) for the client to be ready again; a
request in flight when the socket drops fails with `CONNECTION_LOST`, because the
client cannot know whether the daemon acted on it.

This module imports no daemon code: only aiohttp, pydantic and `aetherd.protocol`
models (the wire's single source of truth).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, TypeAdapter

from aetherd.client.errors import AetherdError, ConnectionLost
from aetherd.client.target import Target

__all__ = ["Client", "ClientOptions", "State"]

log = logging.getLogger("aetherd.client")

State = Literal["new", "connecting", "connected", "reconnecting", "closed"]
Frame = dict[str, Any]
PushHandler = Callable[[Frame], None]
Restorer = Callable[[bool], Awaitable[None]]
FATAL = frozenset({"UNAUTHORIZED", "WORKSPACE_NOT_FOUND", "INVALID_URL"})

_adapters: dict[Any, TypeAdapter[Any]] = {}


def parse(reply: Any, data: Any) -> Any:
    """`data` validated as `reply` (a model or any type pydantic knows), ignoring fields
    this client does not know (a newer daemon may add some)."""
    adapter = _adapters.get(reply)
    if adapter is None:
        adapter = _adapters[reply] = TypeAdapter(reply)
    try:
        return adapter.validate_python(data, extra="ignore")
    except TypeError:  # pragma: no cover - pydantic without the per-call `extra` option
        return adapter.validate_python(data)


def wire_fields(fields: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """A request's fields in wire form: camelCase, None left out."""
    if fields is None:
        return {}
    if isinstance(fields, BaseModel):
        dumped: dict[str, Any] = fields.model_dump(mode="json", by_alias=True, exclude_none=True)
        return dumped
    return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True)
class ClientOptions:
    """Every timing and bound of the client, with its default."""

    request_timeout: float = 30.0  # seconds for a reply (and to be connected again)
    connect_timeout: float = 10.0  # seconds for one connection attempt
    reconnect: bool = True
    backoff_initial: float = 0.1  # first retry after about this long
    backoff_max: float = 5.0  # retries are at most this far apart
    reconnect_timeout: float | None = 300.0  # give up after this long without a socket
    heartbeat: float | None = 15.0  # ping the daemon; no pong within half of it: reconnect
    stream_limit: int = 1024  # items queued per push stream
    pending_input_bytes: int = 1024 * 1024  # input kept for a terminal while disconnected
    max_message_size: int = 64 * 1024 * 1024  # largest frame accepted from the daemon
    auth: Literal["header", "subprotocol"] = "header"  # how the token travels
    http_chunk: int = 256 * 1024  # bytes per read in HTTP transfers


class Client:
    """An asyncio client of one aetherd workspace.

    ```python
    async with Client("ws://127.0.0.1:3001/workspaces/local/ws", token) as client:
        term = await client.terminal.create(command="echo hi")
        async for output in term:
            print(output.data, end="")
    ```

    Channel APIs: `terminal`, `process`, `files`, `agent`, `ports`, `config`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        workspace: str | None = None,
        options: ClientOptions | None = None,
        **overrides: Any,
    ) -> None:
        from aetherd.client.agent import AgentAPI
        from aetherd.client.config import ConfigAPI
        from aetherd.client.files import FilesAPI
        from aetherd.client.ports import PortsAPI
        from aetherd.client.process import ProcessAPI
        from aetherd.client.terminal import TerminalAPI

        self.target = Target.parse(url, token, workspace)
        options = options or ClientOptions()
        self.options = dataclasses.replace(options, **overrides) if overrides else options
        self.state: State = "new"
        self.on_state: Callable[[State], None] | None = None
        self.generation = 0  # sockets opened so far
        self.error_frames: list[Frame] = []  # the latest error frames (bounded)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._push: dict[tuple[str, str], PushHandler] = {}
        self._restorers: list[Restorer] = []
        self._late_restorers: list[Restorer] = []
        self._query_hooks: list[Callable[[bool], dict[str, str]]] = []
        self._enders: list[Callable[[AetherdError | None], None]] = []
        self._ready: asyncio.Event | None = None
        self._gone: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dead: AetherdError | None = None
        self.sessions_on_connect: asyncio.Future[Frame] | None = None
        self.terminal = TerminalAPI(self)
        self.process = ProcessAPI(self)
        self.files = FilesAPI(self)
        self.agent = AgentAPI(self)
        self.ports = PortsAPI(self)
        self.config = ConfigAPI(self)

    # -- wiring for the channel APIs ----------------------------------------------------

    def on_push(self, channel: str, type_: str, handler: PushHandler) -> None:
        """Route pushes of `channel`/`type_` (`*` for any type) to `handler`."""
        self._push[(channel, type_)] = handler

    def on_restore(self, restorer: Restorer, *, late: bool = False) -> None:
        """Run `restorer(first)` on every new socket, before the client is ready; `late`
        ones run after all others (flushing input kept while disconnected)."""
        (self._late_restorers if late else self._restorers).append(restorer)

    def on_connect_query(self, hook: Callable[[bool], dict[str, str]]) -> None:
        """Add `hook(first)`'s parameters to the query of every upgrade request."""
        self._query_hooks.append(hook)

    def on_end(self, ender: Callable[[AetherdError | None], None]) -> None:
        """Run `ender(error)` when the client closes (None) or gives up (the error)."""
        self._enders.append(ender)

    def spawn(self, awaitable: Awaitable[Any]) -> None:
        """Run `awaitable` in the background; `AetherdError` from it is ignored."""

        async def quiet() -> None:
            try:
                await awaitable
            except AetherdError as err:
                log.debug("background request failed: %s", err)

        task = asyncio.ensure_future(quiet())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def connected(self) -> bool:
        """True while a socket is open and restored."""
        return self._ready is not None and self._ready.is_set()

    @property
    def http(self) -> aiohttp.ClientSession:
        """The client's HTTP session (for transfers)."""
        if self._http is None:
            raise AetherdError("CLOSED", "the client is not connected")
        return self._http

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for the HTTP endpoints (empty without a token)."""
        token = self.target.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first socket; raises `AetherdError` when that fails (no retry)."""
        if self._runner is not None:
            return
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._gone = loop.create_future()
        self._http = aiohttp.ClientSession()
        first: asyncio.Future[None] = loop.create_future()
        self._set_state("connecting")
        self._runner = asyncio.create_task(self._run(first), name="aetherd-client")
        try:
            await first
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the socket and end every stream. Idempotent."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        self._end(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def drop(self) -> None:
        """Abort the socket's TCP connection at once (as a network failure would); the
        client reconnects. For tests and for `attach`'s manual reconnect."""
        ws = self._ws
        if ws is None:
            return
        connection = getattr(ws, "_conn", None)
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.abort()

    def _set_state(self, state: State) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a user callback must not break the connection
                log.exception("on_state callback failed")

    def _end(self, error: AetherdError | None) -> None:
        if self.state == "closed":
            return
        self._dead = error or AetherdError("CLOSED", "the client is closed")
        self._fail_pending(self._dead)
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self._set_state("closed")
        for ender in self._enders:
            try:
                ender(error)
            except Exception:
                log.exception("ending a stream failed")

    def _backoff(self, attempt: int) -> float:
        ceiling = min(
            self.options.backoff_max, self.options.backoff_initial * 2 ** min(attempt, 20)
        )
        return random.uniform(ceiling / 2, ceiling)

    async def _open(self, first: bool) -> aiohttp.ClientWebSocketResponse:
        params: dict[str, str] = {}
        for hook in self._query_hooks:
            params.update(hook(first))
        headers: dict[str, str] = {}
        protocols: tuple[str, ...] = ()
        token = self.target.token
        if token and self.options.auth == "subprotocol":
            protocols = ("Bearer", token)
        elif token:
            headers = self.auth_headers()
        try:
            connecting: asyncio.Future[Any] = asyncio.ensure_future(
                self.http.ws_connect(
                    self.target.ws_url,
                    params=params or None,
                    headers=headers,
                    protocols=protocols,
                    heartbeat=self.options.heartbeat,
                    max_msg_size=self.options.max_message_size,
                    autoclose=True,
                    autoping=True,
                )
            )
            ws: aiohttp.ClientWebSocketResponse = await asyncio.wait_for(
                connecting, self.options.connect_timeout
            )
            return ws
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise AetherdError("UNAUTHORIZED", "the daemon refused the token") from None
            if exc.status == 404:
                raise AetherdError(
                    "WORKSPACE_NOT_FOUND", f"no workspace at {self.target.ws_url}"
                ) from None
            raise ConnectionLost(f"the daemon answered HTTP {exc.status}") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ConnectionLost(f"cannot connect to {self.target.ws_url}: {reason}") from None

    async def _run(self, first: asyncio.Future[None]) -> None:
        down_since = time.monotonic()
        attempt = 0
        try:
            while not self._closing:
                try:
                    ws = await self._open(not first.done())
                except AetherdError as err:
                    timeout = self.options.reconnect_timeout
                    expired = timeout is not None and time.monotonic() - down_since > timeout
                    if (
                        not first.done()
                        or err.code in FATAL
                        or not self.options.reconnect
                        or expired
                    ):
                        if not first.done():
                            first.set_exception(err)
                        self._end(err)
                        return
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                attempt = 0
                await self._serve(ws, first)
                if self._closing:
                    return
                if not first.done():
                    lost = ConnectionLost("the connection dropped while starting")
                    first.set_exception(lost)
                    self._end(lost)
                    return
                if not self.options.reconnect:
                    self._end(ConnectionLost())
                    return
                down_since = time.monotonic()
                self._set_state("reconnecting")
                await asyncio.sleep(self._backoff(0))
        except asyncio.CancelledError:
            if not first.done():
                first.set_exception(AetherdError("CLOSED", "the client was closed"))
            raise

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, first: asyncio.Future[None]
    ) -> None:
        """One socket's life: read, restore, be ready, until it drops."""
        assert self._ready is not None
        self.generation += 1
        self._ws = ws
        self.sessions_on_connect = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read(ws), name="aetherd-client-reader")
        try:
            for restorer in [*self._restorers, *self._late_restorers]:
                await restorer(not first.done())
        except AetherdError as err:
            log.debug("restore interrupted: %s", err)
        except Exception:
            # A bug in a restorer must not end the client: drop this socket, try again.
            log.exception("restoring the client's state failed")
            self.drop()
        else:
            if not reader.done():
                self._ready.set()
                self._set_state("connected")
                if not first.done():
                    first.set_result(None)
        try:
            await reader
        finally:
            self._ready.clear()
            self._ws = None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    try:
                        frame = json.loads(message.data)
                    except ValueError:
                        log.warning("the daemon sent a frame that is not JSON")
                        continue
                    if isinstance(frame, dict):
                        self._dispatch(frame)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    break
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.debug("socket ended: %r", exc)
        finally:
            assert self._ready is not None
            self._ready.clear()
            self._fail_pending(ConnectionLost())
            with contextlib.suppress(Exception):
                await ws.close()

    def _fail_pending(self, error: AetherdError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _dispatch(self, frame: Frame) -> None:
        request_id = frame.get("requestId")
        if "success" in frame and isinstance(request_id, str):
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(frame)
            return
        key = (frame.get("channel"), frame.get("type"))
        if key == ("terminal", "sessions"):
            pushed = self.sessions_on_connect
            if pushed is not None and not pushed.done():
                pushed.set_result(frame)
        handler = self._push.get(key) or self._push.get((key[0], "*"))  # type: ignore[arg-type]
        if handler is not None:
            try:
                handler(frame)
            except Exception:
                log.exception("handling a %s/%s push failed", *key)
        elif key[0] == "error":
            log.debug("error frame: %s", frame)
            self.error_frames = [*self.error_frames[-63:], frame]

    # -- sending ------------------------------------------------------------------------

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until a socket is open and restored; `TIMEOUT`, or the reason the client
        gave up, otherwise."""
        if self._ready is None or self._gone is None:
            raise AetherdError("CLOSED", "the client is not connected (call connect())")
        if self._ready.is_set():
            return
        if self._dead is not None:
            raise self._dead
        timeout = self.options.request_timeout if timeout is None else timeout
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._ready.wait())
        gone: asyncio.Future[Any] = self._gone
        try:
            await asyncio.wait({waiter, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._ready.is_set():
            return
        if self._dead is not None:
            raise self._dead
        raise AetherdError("TIMEOUT", f"not connected within {timeout}s")

    async def send(
        self,
        channel: str,
        type_: str,
        fields: BaseModel | dict[str, Any] | None = None,
        *,
        internal: bool = False,
    ) -> None:
        """Send a frame that expects no reply (errors come back as error frames)."""
        if not internal:
            await self.wait_ready()
        await self._send({"channel": channel, "type": type_, **wire_fields(fields)})

    async def _send(self, frame: Frame) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionLost()
        try:
            await ws.send_str(json.dumps(frame, ensure_ascii=False))
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            raise ConnectionLost(f"sending failed: {exc}") from None

    async def request(
        self,
        channel: str,
        type_: str,
        fields: BaseModel | dict[str, Any] | None = None,
        *,
        reply: Any = None,
        timeout: float | None = None,
        request_id: str | None = None,
        internal: bool = False,
    ) -> Any:
        """Send a request and return its reply's `data`, parsed as `reply` when given.

        A failed reply raises `AetherdError` with the daemon's `code`. `request_id`
        names the frame's `requestId` (the agent's `approve` uses the permission
        request's id); by default a fresh one is made.
        """
        timeout = self.options.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not internal:
            await self.wait_ready(timeout)
        rid = request_id or uuid.uuid4().hex
        frame = {"channel": channel, "type": type_, "requestId": rid, **wire_fields(fields)}
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._send(frame)
            answer = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AetherdError(
                "TIMEOUT", f"no reply to {channel}/{type_} within {timeout}s"
            ) from None
        finally:
            if self._pending.get(rid) is future:
                del self._pending[rid]
        if answer.get("success") is not True:
            raise AetherdError(
                str(answer.get("code") or "INTERNAL_ERROR"),
                str(answer.get("error") or "the request failed"),
                answer,
            )
        data = answer.get("data")
        return data if reply is None else parse(reply, data)

    async def info(self) -> dict[str, Any]:
        """`GET /workspaces/{id}/info`: uptime, connections, terminals, idleness."""
        await self.wait_ready()
        async with self.http.get(self.target.http_url("info"), headers=self.auth_headers()) as resp:
            if resp.status != 200:
                raise AetherdError("HTTP_ERROR", f"info answered HTTP {resp.status}")
            result: dict[str, Any] = await resp.json()
            return result

    async def user_activity(self) -> None:
        """Mark the user active (`activity/user_activity`)."""
        await self.send("activity", "user_activity")
