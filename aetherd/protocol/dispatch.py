"""Frame dispatch: envelope check, registry lookup, model validation, reply or error.

Two-step validation, as in Home Assistant's websocket_api: first the envelope
(`channel`, `type`, `requestId`), then the handler's own pydantic model. The result
of a handler, or the AetherError it raises, becomes a frame in exactly one place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

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
from aetherd.protocol.registry import Handler

if TYPE_CHECKING:
    from aetherd.daemon import Daemon

log = logging.getLogger("aetherd.dispatch")

MAX_REQUEST_ID = 128


class Dispatcher:
    """Turns one peer's text frames into handler calls and replies."""

    def __init__(self, daemon: Daemon, peer: Peer) -> None:
        self.daemon = daemon
        self.peer = peer
        self._slots = asyncio.Semaphore(daemon.settings.max_inflight_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = daemon.services.metrics

    def reject(self, err: AetherError, raw: dict[str, Any] | None = None) -> None:
        """Send an error frame (no requestId to reply to)."""
        self._metrics.error(err.code.value)
        self.peer.send(error_frame(err, make_ref(raw) if raw else None))

    def fail(
        self,
        channel: str,
        type_: str,
        request_id: str | None,
        err: AetherError,
        raw: dict[str, Any],
    ) -> None:
        """Report `err`: a failed reply when there is a requestId, else an error frame."""
        if request_id is None:
            self.reject(err, raw)
            return
        self._metrics.error(err.code.value)
        self.peer.send(error_reply(channel, type_, request_id, err))

    async def handle_text(self, text: str) -> None:
        """Parse, validate and run one text frame. Never raises."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self._metrics.frame_in("unknown", len(text))
            self.reject(AetherError(ErrorCode.INVALID_JSON, f"malformed JSON: {exc}"))
            return
        if not isinstance(raw, dict):
            self._metrics.frame_in("unknown", len(text))
            self.reject(AetherError(ErrorCode.INVALID_MESSAGE, "a frame must be a JSON object"))
            return
        channel = raw.get("channel")
        self._metrics.frame_in(channel if isinstance(channel, str) else "unknown", len(text))
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

        def fail(err: AetherError) -> None:
            self.fail(channel_name, type_, request_id, err, raw)

        channel = self.daemon.registry.channel(channel_name)
        if channel is None:
            fail(AetherError(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel '{channel_name}'"))
            return
        handler = channel.handlers.get(type_)
        if handler is None:
            fail(
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
            fail(validation_error(exc))
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
            self.fail(handler.channel, handler.type, request_id, err, raw)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler %s/%s failed", handler.channel, handler.type)
            err = AetherError(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon log")
            self.fail(handler.channel, handler.type, request_id, err, raw)
            return
        finally:
            self._metrics.request_seconds.labels(handler.channel).observe(
                time.perf_counter() - started
            )
        if request_id is not None:
            self.peer.send(success_reply(handler.channel, handler.type, request_id, data))

    async def close(self) -> None:
        """Cancel this peer's in-flight concurrent handlers."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
