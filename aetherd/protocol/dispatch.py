"""Frame dispatch: envelope check, registry lookup, model validation, reply or error.

Two-step validation, as in Home Assistant's websocket_api: first the envelope
(`channel`, `type`, `requestId`), then the handler's own pydantic model. The result
of a handler, or the AetherError it raises, becomes a frame in exactly one place.

Before either, the decoder refuses what no handler can use, for every channel at
once: integers outside 64 bits (SQLite, `os` calls and JavaScript clients cannot hold
them), NaN and Infinity (not JSON), and strings with a lone UTF-16 surrogate
(`"\\ud800"`: valid JSON, but not Unicode, so it cannot be encoded for a path, a
PTY, SQLite or YAML). Such a frame gets INVALID_MESSAGE and nothing else runs.

Frames are parsed by orjson, and again by the `json` decoder below whenever orjson's
answer could differ from it: every frame orjson refuses (NaN, Infinity, 1e999, a lone
surrogate escape, nesting deeper than 1024, malformed JSON), and every frame holding an
integer outside int64 or a float of magnitude 2**63 or more, because orjson reads an
integer beyond 64 bits as a float without saying so (`-9223372036854775809` becomes
`-9.223372036854776e18`). The `json` decoder then gives exactly the answer or the error
it always gave. Both keep the last of duplicate keys. With the check (a walk of the
decoded values), orjson takes 0.5-0.7x the time of `json` with its number hooks
(docs/performance.md, Files).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson
from pydantic import ValidationError

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol.context import Context, Peer
from aetherd.protocol.frames import (
    error_frame,
    error_reply,
    make_ref,
    success_reply,
    validation_error,
)
from aetherd.protocol.registry import Deferred, Handler

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

log = logging.getLogger("aetherd.dispatch")

MAX_REQUEST_ID = 128
# What a client sees of a bug: the details stay in the log.
INTERNAL = AetherError(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon log")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _OutOfRange(ValueError):
    """A number the protocol does not carry."""


def _parse_int(text: str) -> int:
    if len(text) > 20:  # also keeps int() away from thousands of digits
        raise _OutOfRange(text[:24])
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise _OutOfRange(text)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(text[:24])
    return value


def _parse_constant(name: str) -> Any:
    raise _OutOfRange(name)


_decoder = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)
# A `\uD800`-`\uDFFF` escape in the text: only then can a decoded string hold a lone
# surrogate, so the walk below runs only for frames that contain one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WIDE = float(2**63)  # a float this large may be an integer orjson could not hold


def _wide(value: Any) -> bool:
    """True when orjson's `value` holds an integer outside int64, or a float that may
    stand for one (|x| >= 2**63): then only the `json` decoder can say what it was."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return True
        elif kind is float:
            if not -_WIDE < item < _WIDE:
                return True
        elif kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
    return False


def _unencodable(value: Any, path: str = "") -> str | None:
    """The location of the first string (key or value) in `value` that is not Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "frame"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _unencodable(key) is not None:
                return path or "frame"
            found = _unencodable(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def decode_frame(text: str) -> Any:
    """Parse one text frame; raise AetherError for a number the protocol cannot carry."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass  # the json decoder below says what is wrong, as it always did
    else:
        if not _wide(value):
            return value
    try:
        return _decoder.decode(text)
    except _OutOfRange as exc:
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"number out of range: {exc} (integers are 64-bit; NaN and Infinity are not JSON)",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise AetherError(ErrorCode.INVALID_JSON, f"malformed JSON: {exc}") from None


def _lenient(text: str) -> Any:
    """The frame parsed with every number read as 0, to find its `requestId` after the
    guard refused one of its numbers; None when even that fails."""
    try:
        return json.loads(
            text, parse_int=lambda _: 0, parse_float=lambda _: 0.0, parse_constant=lambda _: 0.0
        )
    except (ValueError, RecursionError):
        return None


def _replyable(value: Any) -> TypeGuard[str]:
    """A non-empty string that can be sent back as it is."""
    return isinstance(value, str) and bool(value) and _unencodable(value) is None


def check_unicode(raw: Any, text: str) -> None:
    """Raise AetherError when a string of the decoded frame holds a lone surrogate."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return
    where = _unencodable(raw)
    if where is not None:
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid field '{where}': text holds a lone surrogate (not Unicode); "
            "send bytes as base64",
            field=where,
        )


def _close_unstarted(awaitable: Any) -> None:
    """Close a deferred coroutine that never ran (its task was cancelled before its
    first step), so it does not warn "never awaited"."""
    if inspect.iscoroutine(awaitable) and inspect.getcoroutinestate(awaitable) == "CORO_CREATED":
        awaitable.close()


class Dispatcher:
    """Turns one peer's text frames into handler calls and replies."""

    def __init__(self, daemon: Daemon, peer: Peer) -> None:
        self.daemon = daemon
        self.peer = peer
        self._slots = asyncio.Semaphore(daemon.settings.max_inflight_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = daemon.services.metrics
        self._observe = self._metrics.request_seconds.add  # keyed by (channel,)
        # A peer that can send a reply at once when nothing is queued (the connection),
        # without the hand-off to its writer task; any other peer queues it.
        send_now = getattr(peer, "send_now", None)
        self._send_now: Callable[[str], Awaitable[None]] = send_now or self._queue_reply

    async def _queue_reply(self, text: str) -> None:
        self.peer.send(text)

    def reject(self, err: AetherError, raw: dict[str, Any] | None = None) -> None:
        """Send an error frame (no requestId to reply to)."""
        self._metrics.error(err.code.value)
        self.peer.send(error_frame(err, make_ref(raw) if raw else None))

    def refuse(self, err: AetherError, raw: Any) -> None:
        """Report a frame the guard refused: a failed reply when its `requestId`,
        `channel` and `type` are clean text (so the client's request does not wait for a
        timeout), else an error frame. Never echoes the offending text."""
        if isinstance(raw, dict):
            request_id, channel, type_ = raw.get("requestId"), raw.get("channel"), raw.get("type")
            if (
                _replyable(request_id)
                and len(request_id) <= MAX_REQUEST_ID
                and _replyable(channel)
                and _replyable(type_)
            ):
                self.peer.send(self._error_reply(channel, type_, request_id, err))
                return
            self.reject(err, raw)
            return
        self.reject(err)

    async def fail_now(
        self,
        channel: str,
        type_: str,
        request_id: str | None,
        err: AetherError,
        raw: dict[str, Any],
    ) -> None:
        """Report `err`: a failed reply when there is a requestId (sent at once when
        nothing is queued, `send_now`), else an error frame."""
        if request_id is None:
            self.reject(err, raw)
            return
        await self._send_now(self._error_reply(channel, type_, request_id, err))

    def _error_reply(self, channel: str, type_: str, request_id: str, err: AetherError) -> str:
        """The failed reply for `err`, counted."""
        self._metrics.error(err.code.value)
        return error_reply(channel, type_, request_id, err)

    async def handle_text(self, text: str) -> None:
        """Parse, validate and run one text frame. Never raises."""
        try:
            raw = decode_frame(text)
        except AetherError as err:
            self._metrics.frame_in("unknown", len(text))
            if err.code is ErrorCode.INVALID_MESSAGE:  # a number out of range
                self.refuse(err, _lenient(text))
            else:
                self.reject(err)
            return
        if not isinstance(raw, dict):
            self._metrics.frame_in("unknown", len(text))
            self.reject(AetherError(ErrorCode.INVALID_MESSAGE, "a frame must be a JSON object"))
            return
        channel = raw.get("channel")
        self._metrics.frame_in(channel if isinstance(channel, str) else "unknown", len(text))
        try:
            check_unicode(raw, text)
        except AetherError as err:
            self.refuse(err, raw)
            return
        await self.handle_frame(raw)

    async def handle_frame(self, raw: dict[str, Any]) -> None:
        """Dispatch one decoded frame."""
        request_id = raw.get("requestId")
        if request_id is not None and (
            not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID
        ):
            self.reject(
                AetherError(
                    ErrorCode.INVALID_MESSAGE,
                    f"invalid field 'requestId': must be a string of 1 to {MAX_REQUEST_ID} characters",
                    field="requestId",
                ),
                raw,
            )
            return
        for key in ("channel", "type"):
            if not isinstance(raw.get(key), str):
                problem = "missing field" if key not in raw else "invalid field"
                self.reject(
                    AetherError(
                        ErrorCode.INVALID_MESSAGE, f"{problem} '{key}': must be a string", field=key
                    ),
                    raw,
                )
                return
        channel_name, type_ = raw["channel"], raw["type"]

        async def fail(err: AetherError) -> None:
            await self.fail_now(channel_name, type_, request_id, err, raw)

        channel = self.daemon.registry.channel(channel_name)
        if channel is None:
            await fail(AetherError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel '{channel_name}'"))
            return
        handler = channel.handlers.get(type_)
        if handler is None:
            await fail(
                AetherError(
                    ErrorCode.UNKNOWN_TYPE, f"unknown type '{type_}' on channel '{channel_name}'"
                )
            )
            return
        if channel.require_request_id and request_id is None:
            self.reject(
                AetherError(
                    ErrorCode.INVALID_MESSAGE,
                    f"missing field 'requestId': required on channel '{channel_name}'",
                    field="requestId",
                ),
                raw,
            )
            return
        try:
            msg = handler.model.model_validate(raw)
        except ValidationError as exc:
            await fail(validation_error(exc))
            return
        ctx = Context(self.daemon, self.peer, request_id)
        if handler.concurrent:
            await self._slots.acquire()
            task = asyncio.create_task(self._run_guarded(handler, ctx, msg, raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await self._run(handler, ctx, msg, raw)

    async def _run_guarded(
        self, handler: Handler, ctx: Context, msg: Any, raw: dict[str, Any]
    ) -> None:
        try:
            await self._run(handler, ctx, msg, raw)
        finally:
            self._slots.release()

    async def _run(self, handler: Handler, ctx: Context, msg: Any, raw: dict[str, Any]) -> None:
        request_id = ctx.request_id
        started = time.perf_counter()
        try:
            data = await handler.func(ctx, msg)
        except AetherError as err:
            await self.fail_now(handler.channel, handler.type, request_id, err, raw)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler %s/%s failed", handler.channel, handler.type)
            await self.fail_now(handler.channel, handler.type, request_id, INTERNAL, raw)
            return
        finally:
            self._observe(handler.key, time.perf_counter() - started)
        if isinstance(data, Deferred):
            if handler.concurrent:  # already in a task of its own
                await self._finish(handler, ctx, data, raw)
            else:  # the reader goes on with the next frame; the reply comes later
                try:
                    await self._slots.acquire()
                except asyncio.CancelledError:
                    _close_unstarted(data.awaitable)
                    raise
                task = asyncio.create_task(self._finish_guarded(handler, ctx, data, raw))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _: _close_unstarted(data.awaitable))
            return
        await self._reply(handler, ctx, data, raw)

    async def _finish_guarded(
        self, handler: Handler, ctx: Context, deferred: Deferred, raw: dict[str, Any]
    ) -> None:
        try:
            await self._finish(handler, ctx, deferred, raw)
        finally:
            self._slots.release()

    async def _finish(
        self, handler: Handler, ctx: Context, deferred: Deferred, raw: dict[str, Any]
    ) -> None:
        """Await a deferred result and reply with it (or with its error)."""
        try:
            data = await deferred.awaitable
        except AetherError as err:
            await self.fail_now(handler.channel, handler.type, ctx.request_id, err, raw)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler %s/%s failed", handler.channel, handler.type)
            await self.fail_now(handler.channel, handler.type, ctx.request_id, INTERNAL, raw)
            return
        await self._reply(handler, ctx, data, raw)

    async def _reply(self, handler: Handler, ctx: Context, data: Any, raw: dict[str, Any]) -> None:
        request_id = ctx.request_id
        try:
            data_json = handler.encode_data(data)
        except Exception:
            log.exception(
                "handler %s/%s returned data its reply does not declare",
                handler.channel,
                handler.type,
            )
            await self.fail_now(handler.channel, handler.type, request_id, INTERNAL, raw)
            return
        if request_id is not None:
            await self._send_now(
                success_reply(handler.channel, handler.type, request_id, data_json)
            )

    async def close(self) -> None:
        """Cancel this peer's in-flight concurrent handlers."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
