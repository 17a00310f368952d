"""Fake model providers: real aiohttp servers on 127.0.0.1 speaking the providers' SSE.

`FakeProvider("anthropic")` serves `POST /v1/messages` in the Anthropic Messages
streaming format (`event:` + `data:` lines: message_start, ping, content_block_start,
content_block_delta with text_delta / thinking_delta / signature_delta /
input_json_delta, content_block_stop, message_delta with stop_reason and usage,
message_stop, and `error` events); with `side_calls=True`, a non-streaming request and
`count_tokens` get a fixed answer and do not consume the script (`side_requests`).
`FakeProvider("gemini")` serves
`POST /v1beta/models/{model}:streamGenerateContent?alt=sse` in the Gemini API's streaming
format (`data:` lines ending in CRLF CRLF, each a GenerateContentResponse with
`candidates[].content.parts[]` holding `text`, `thought: true` text or a whole
`functionCall {name, args, id}`, the last with `finishReason` and `usageMetadata`), and
`:generateContent` with one JSON GenerateContentResponse. `FakeProvider("openai")` serves
`POST /v1/chat/completions` in the Chat Completions streaming format (`data:` chunks
with `choices[].delta.content` / `reasoning_content` / `tool_calls[]` fragments,
`finish_reason`, a final usage chunk with `choices: []`, then `data: [DONE]`).

Each request pops the next scripted `Turn` (or `HttpError`). A stream is cut into
small chunks at arbitrary byte offsets (`chunk_size`), so lines, JSON and UTF-8
characters are split across reads exactly as a real network may do. A `Turn` can
pause after a given number of frames until a test sets `gate`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class ToolUse:
    """A tool call the model makes; `arguments` is sent raw (may be invalid JSON)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "toolu_" + uuid.uuid4().hex[:12])
    pieces: int = 3  # how many fragments the arguments are cut into


@dataclass
class Turn:
    """One scripted model response."""

    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tools: list[ToolUse] = field(default_factory=list)
    input_tokens: int = 10
    output_tokens: int = 5
    stop_reason: str | None = None
    error: dict[str, Any] | None = None  # a mid-stream error event instead of the end
    pause_after: int | None = None  # frames sent before waiting for `gate`
    gate: asyncio.Event | None = None
    chunk_size: int = 7
    frame_delay: float = 0.0  # between frames (for long streams)
    on_frame: Callable[[int, str], None] | None = None  # called just before frame i is sent


@dataclass
class HttpError:
    """A non-200 reply."""

    status: int
    message: str
    error_type: str = "api_error"
    retry_after: str | None = None


def _split(text: str, pieces: int) -> list[str]:
    if pieces <= 1 or len(text) <= 1:
        return [text]
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


def anthropic_frames(turn: Turn, model: str) -> list[str]:
    """The SSE frames of `turn` as the Messages API streams them."""

    def frame(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    out = [
        frame(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_" + uuid.uuid4().hex[:16],
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": turn.input_tokens, "output_tokens": 1},
                },
            },
        ),
        frame("ping", {"type": "ping"}),
    ]
    index = 0
    if turn.thinking:
        out.append(
            frame(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                },
            )
        )
        for piece in turn.thinking:
            out.append(
                frame(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "thinking_delta", "thinking": piece},
                    },
                )
            )
        out.append(
            frame(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "signature_delta", "signature": "sig-abc123"},
                },
            )
        )
        out.append(frame("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    if turn.text:
        out.append(
            frame(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        for piece in turn.text:
            out.append(
                frame(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            )
        out.append(frame("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    for tool in turn.tools:
        out.append(
            frame(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": tool.id,
                        "name": tool.name,
                        "input": {},
                    },
                },
            )
        )
        for piece in _split(tool.arguments, tool.pieces):
            out.append(
                frame(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                )
            )
        out.append(frame("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    if turn.error is not None:
        out.append(frame("error", {"type": "error", "error": turn.error}))
        return out
    stop = turn.stop_reason or ("tool_use" if turn.tools else "end_turn")
    out.append(
        frame(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": turn.output_tokens},
            },
        )
    )
    out.append(frame("message_stop", {"type": "message_stop"}))
    return out


def openai_frames(turn: Turn, model: str) -> list[str]:
    """The SSE frames of `turn` as Chat Completions streams them."""
    ident = "chatcmpl-" + uuid.uuid4().hex[:12]
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    for piece in turn.thinking:
        out.append(chunk({"reasoning_content": piece}))
    for piece in turn.text:
        out.append(chunk({"content": piece}))
    for i, tool in enumerate(turn.tools):
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": tool.id,
                            "type": "function",
                            "function": {"name": tool.name, "arguments": ""},
                        }
                    ]
                }
            )
        )
        for piece in _split(tool.arguments, tool.pieces):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    if turn.error is not None:
        out.append(f"data: {json.dumps({'error': turn.error})}\n\n")
        return out
    finish = turn.stop_reason or ("tool_calls" if turn.tools else "stop")
    out.append(chunk({}, finish))
    usage = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": turn.input_tokens,
            "completion_tokens": turn.output_tokens,
            "total_tokens": turn.input_tokens + turn.output_tokens,
        },
    }
    out.append(f"data: {json.dumps(usage)}\n\n")
    out.append("data: [DONE]\n\n")
    return out


def gemini_response(
    turn: Turn, model: str, parts: list[dict[str, Any]], last: bool
) -> dict[str, Any]:
    """One GenerateContentResponse as the Gemini API sends it."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    out: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
    if last:
        candidate["finishReason"] = turn.stop_reason or "STOP"
        out["usageMetadata"] = {
            "promptTokenCount": turn.input_tokens,
            "candidatesTokenCount": turn.output_tokens,
            "totalTokenCount": turn.input_tokens + turn.output_tokens,
        }
    out["responseId"] = "resp-" + uuid.uuid4().hex[:12]
    return out


def gemini_parts(turn: Turn) -> list[list[dict[str, Any]]]:
    """The parts of `turn`, one list per streamed response (a function call comes whole)."""
    chunks: list[list[dict[str, Any]]] = [
        [{"text": piece, "thought": True}] for piece in turn.thinking
    ]
    chunks += [[{"text": piece}] for piece in turn.text]
    for tool in turn.tools:
        chunks.append(
            [
                {
                    "functionCall": {
                        "id": tool.id,
                        "name": tool.name,
                        "args": json.loads(tool.arguments),
                    }
                }
            ]
        )
    return chunks or [[{"text": ""}]]


def gemini_frames(turn: Turn, model: str) -> list[str]:
    """The SSE frames of `turn` as `streamGenerateContent?alt=sse` streams them."""
    chunks = gemini_parts(turn)
    out = [
        "data: "
        + json.dumps(gemini_response(turn, model, parts, i == len(chunks) - 1))
        + "\r\n\r\n"
        for i, parts in enumerate(chunks)
    ]
    if turn.error is not None:
        out[-1] = "data: " + json.dumps({"error": turn.error}) + "\r\n\r\n"
    return out


class FakeProvider:
    """A scripted provider server. `script` holds the replies, one per request."""

    def __init__(self, kind: str, side_calls: bool = False) -> None:
        assert kind in ("anthropic", "openai", "gemini")
        self.kind = kind
        self.side_calls = side_calls  # anthropic: answer non-streaming requests aside
        self.script: deque[Turn | HttpError] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []  # gemini: the model and method are in the path
        self.side_requests: list[dict[str, Any]] = []  # anthropic: non-streaming calls
        self.disconnects = 0
        self.streams_open = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, *replies: Turn | HttpError) -> FakeProvider:
        """Queue replies."""
        self.script.extend(replies)
        return self

    @property
    def base_url(self) -> str:
        """What the daemon is configured with (OpenAI-style bases include /v1)."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind == "openai" else root

    async def start(self) -> FakeProvider:
        """Listen on 127.0.0.1 (a free port)."""
        app = web.Application()
        path = {
            "anthropic": "/v1/messages",
            "openai": "/v1/chat/completions",
            "gemini": "/v1beta/models/{call}",
        }[self.kind]
        app.router.add_post(path, self._handle)
        if self.kind == "anthropic":
            app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        """Stop the server."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        self.side_requests.append(await request.json())
        return web.json_response({"input_tokens": 10})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.side_calls and not body.get("stream"):
            # A side call (Claude Code checks its key and the small model with one
            # non-streaming request): answered without touching the script.
            self.side_requests.append(body)
            return web.json_response(
                {
                    "id": "msg_" + uuid.uuid4().hex[:16],
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model"),
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 1},
                }
            )
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if not self.script:
            return web.json_response(
                {"type": "error", "error": {"type": "api_error", "message": "script exhausted"}},
                status=400,
            )
        reply = self.script.popleft()
        if isinstance(reply, HttpError):
            headers = {"retry-after": reply.retry_after} if reply.retry_after is not None else {}
            payload: dict[str, Any] = {
                "error": {"type": reply.error_type, "message": reply.message}
            }
            if self.kind == "anthropic":
                payload["type"] = "error"
            if self.kind == "gemini":  # google.rpc.Status, as the Gemini API answers
                payload = {
                    "error": {
                        "code": reply.status,
                        "message": reply.message,
                        "status": reply.error_type,
                    }
                }
            return web.json_response(payload, status=reply.status, headers=headers)
        model = str(body.get("model"))
        if self.kind == "gemini":
            model, _, method = request.match_info["call"].partition(":")
            self.paths.append(request.path_qs)
            if method == "generateContent":
                parts = [p for chunk in gemini_parts(reply) for p in chunk]
                return web.json_response(gemini_response(reply, model, parts, True))
            frames = gemini_frames(reply, model)
        elif self.kind == "anthropic":
            frames = anthropic_frames(reply, model)
        else:
            frames = openai_frames(reply, model)
        resp = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await resp.prepare(request)
        self.streams_open += 1
        try:
            for i, text in enumerate(frames):
                if reply.pause_after is not None and i == reply.pause_after and reply.gate:
                    await reply.gate.wait()
                if reply.frame_delay:
                    await asyncio.sleep(reply.frame_delay)
                if reply.on_frame is not None:
                    reply.on_frame(i, text)
                data = text.encode("utf-8")
                size = reply.chunk_size
                if size <= 0:
                    await resp.write(data)
                else:
                    for start in range(0, len(data), size):
                        await resp.write(data[start : start + size])
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        finally:
            self.streams_open -= 1
        return resp
