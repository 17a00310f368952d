"""Model providers over plain aiohttp: Anthropic Messages and OpenAI Chat Completions.

Why aiohttp rather than the official SDKs: aiohttp is already the daemon's HTTP
stack, so there is one event loop, one connection pool and one timeout model;
cancelling the task closes the socket at once (abort within 2 s, no SDK worker
threads or hidden retries); the retry policy (429/5xx, Retry-After, backoff) is
ours and a setting; and both wire formats are small, stable and documented. The
SDKs would add two heavy dependencies and their own retry loops on top.

Both providers translate one neutral conversation format:

- `{"role": "user", "text": str}`
- `{"role": "assistant", "blocks": [block, ...]}` where a block is
  `{"type": "text", "text"}`, `{"type": "thinking", "thinking", "signature"}`,
  `{"type": "redacted_thinking", "data"}` or
  `{"type": "tool_call", "id", "name", "arguments": str}`
- `{"role": "tool", "results": [{"id", "name", "content": str, "is_error": bool}]}`

and yield neutral stream events: `Delta` (text/thinking pieces, with the content
block they belong to) and finally one `TurnEnd` with the assistant's blocks, the stop
reason and the usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from aetherd.agent.sse import SSEEvent, SSEParser
from aetherd.errors import AetherError, ErrorCode

log = logging.getLogger("aetherd.agent.providers")

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-4-5",
    "openai": "gpt-4.1",
    "openrouter": "anthropic/claude-sonnet-4.5",
}
KEY_VARIABLES = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
}


class ProviderError(Exception):
    """The provider refused or broke the request; `message` is the provider's own words."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def to_aether(self) -> AetherError:
        """As a PROVIDER_ERROR."""
        return AetherError(ErrorCode.PROVIDER_ERROR, self.message)


@dataclass
class Delta:
    """An incremental piece of text or thinking in content block `block`."""

    kind: str  # "text" | "thinking"
    block: int
    content: str


@dataclass
class TurnEnd:
    """The end of one model response."""

    blocks: list[dict[str, Any]]
    stop_reason: str | None
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class ProviderConfig:
    """Where and how to call a provider."""

    name: str  # "anthropic" | "openai" | "openrouter"
    base_url: str
    api_key: str
    model: str
    max_tokens: int = 8192
    thinking_budget: int = 0
    retry_attempts: int = 4
    retry_base_delay: float = 1.0
    retry_max_delay: float = 30.0
    extra_headers: dict[str, str] = field(default_factory=dict)


def _error_message(status: int, body: bytes) -> str:
    """The provider's own error message from an error body (both APIs nest it the same way)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text[:500].strip() or 'no body'}"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"HTTP {status}: {err['message']}"
    if isinstance(err, str):
        return f"HTTP {status}: {err}"
    return f"HTTP {status}: {text[:500]}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _post_with_retry(
    session: aiohttp.ClientSession,
    config: ProviderConfig,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
) -> aiohttp.ClientResponse:
    """POST, retrying 429/5xx and connection failures with backoff; return a 200 response."""
    attempt = 0
    while True:
        delay: float | None = None
        try:
            resp = await session.post(url, headers=headers, json=body)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            if attempt >= config.retry_attempts:
                raise ProviderError(f"cannot reach {config.name} at {url}: {exc}") from None
            message = str(exc)
        else:
            if resp.status == 200:
                return resp
            payload = await resp.read()
            resp.release()
            message = _error_message(resp.status, payload)
            retryable = resp.status == 429 or resp.status >= 500
            if not retryable or attempt >= config.retry_attempts:
                raise ProviderError(message, resp.status)
            delay = _retry_after(resp.headers)
        backoff = config.retry_base_delay * (2**attempt)
        backoff = backoff * (0.75 + random.random() / 2)  # jitter
        wait = min(config.retry_max_delay, delay if delay is not None else backoff)
        log.info("%s: %s; retry %d in %.2fs", config.name, message, attempt + 1, wait)
        attempt += 1
        await asyncio.sleep(wait)


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    parser = SSEParser()
    try:
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                yield event
        for event in parser.finish():
            yield event
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise ProviderError(f"the stream broke: {exc}") from None
    except asyncio.TimeoutError:
        raise ProviderError("the provider stopped sending (idle timeout)") from None


def _loads(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ProviderError(f"malformed stream data: {data[:200]!r}") from None


@dataclass(frozen=True)
class Request:
    """What a provider sends: where, with which headers, which JSON body."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]


class Dialect(Protocol):
    """What differs between providers: the request, and how the stream's events fold
    into pieces (`feed`) and the response's blocks (`end`). One per model call."""

    @property
    def stopped(self) -> bool:
        """The stream said it is complete; no further event is read."""

    def request(
        self,
        config: ProviderConfig,
        system: str,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]],
    ) -> Request:
        """The HTTP request of this call."""

    def feed(self, event: SSEEvent) -> Iterator[Delta]:
        """Fold one SSE event in; yield its pieces; raise ProviderError on a stream error."""

    def end(self) -> TurnEnd:
        """The whole response, or ProviderError when the stream ended early."""


async def _stream(
    session: aiohttp.ClientSession,
    config: ProviderConfig,
    dialect: Dialect,
    system: str,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> AsyncIterator[Delta | TurnEnd]:
    """The skeleton of every model call: POST with retries, read SSE, let the dialect
    fold each event, release the connection, end with the dialect's `TurnEnd`."""
    request = dialect.request(config, system, conversation, tools)
    resp = await _post_with_retry(session, config, request.url, request.headers, request.body)
    try:
        async for event in _events(resp):
            for delta in dialect.feed(event):
                yield delta
            if dialect.stopped:
                break
    finally:
        resp.release()
    yield dialect.end()


# -- Anthropic --------------------------------------------------------------------------


def anthropic_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The neutral conversation as Messages API `messages`."""
    out: list[dict[str, Any]] = []
    for msg in conversation:
        role = msg["role"]
        if role == "user":
            out.append({"role": "user", "content": msg["text"]})
        elif role == "assistant":
            content: list[dict[str, Any]] = []
            for block in msg["blocks"]:
                kind = block["type"]
                if kind == "text":
                    if block["text"]:
                        content.append({"type": "text", "text": block["text"]})
                elif kind == "thinking":
                    content.append(
                        {
                            "type": "thinking",
                            "thinking": block["thinking"],
                            "signature": block.get("signature", ""),
                        }
                    )
                elif kind == "redacted_thinking":
                    content.append({"type": "redacted_thinking", "data": block["data"]})
                elif kind == "tool_call":
                    parsed = block.get("input")
                    content.append(
                        {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": parsed if isinstance(parsed, dict) else {},
                        }
                    )
            out.append({"role": "assistant", "content": content or [{"type": "text", "text": ""}]})
        elif role == "tool":
            out.append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": r["id"],
                            "content": r["content"],
                            "is_error": bool(r["is_error"]),
                        }
                        for r in msg["results"]
                    ],
                }
            )
    return out


class AnthropicDialect:
    """The Messages API: request, and the stream's events folded into blocks."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json_parts: dict[int, list[str]] = {}
        self.stop_reason: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.stopped = False

    @staticmethod
    def request(
        config: ProviderConfig,
        system: str,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]],
    ) -> Request:
        """`POST {base}/v1/messages` with the key in `x-api-key`."""
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": config.max_tokens,
            "system": system,
            "messages": anthropic_messages(conversation),
            "tools": [
                {"name": t["name"], "description": t["description"], "input_schema": t["schema"]}
                for t in tools
            ],
            "stream": True,
        }
        if config.thinking_budget > 0:
            body["thinking"] = {"type": "enabled", "budget_tokens": config.thinking_budget}
            body["max_tokens"] = max(config.max_tokens, config.thinking_budget + 1024)
        headers = {
            "x-api-key": config.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream",
            **config.extra_headers,
        }
        return Request(config.base_url.rstrip("/") + "/v1/messages", headers, body)

    def feed(self, event: SSEEvent) -> Iterator[Delta]:
        """Fold one SSE event in; yield the text and thinking pieces it carries."""
        if event.event == "ping" or not event.data:
            return
        data = _loads(event.data)
        kind = data.get("type", event.event) if isinstance(data, dict) else event.event
        blocks, json_parts = self.blocks, self.json_parts
        if kind == "error":
            err = data.get("error") or {}
            raise ProviderError(f"{err.get('type', 'error')}: {err.get('message', 'stream error')}")
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens") or 0) + int(
                usage.get("cache_read_input_tokens") or 0
            )
            self.output_tokens = int(usage.get("output_tokens") or 0)
        elif kind == "content_block_start":
            index = int(data["index"])
            start = data.get("content_block") or {}
            btype = start.get("type")
            if btype == "text":
                blocks[index] = {"type": "text", "text": start.get("text", "")}
                if start.get("text"):
                    yield Delta("text", index, start["text"])
            elif btype == "thinking":
                blocks[index] = {
                    "type": "thinking",
                    "thinking": start.get("thinking", ""),
                    "signature": start.get("signature", ""),
                }
            elif btype == "redacted_thinking":
                blocks[index] = {"type": "redacted_thinking", "data": start.get("data", "")}
            elif btype in ("tool_use", "server_tool_use"):
                blocks[index] = {
                    "type": "tool_call",
                    "id": start.get("id", ""),
                    "name": start.get("name", ""),
                    "arguments": "",
                }
                json_parts[index] = []
                if start.get("input"):
                    json_parts[index].append(json.dumps(start["input"]))
        elif kind == "content_block_delta":
            index = int(data["index"])
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            block = blocks.get(index)
            if block is None:
                return
            if dtype == "text_delta":
                block["text"] += delta.get("text", "")
                yield Delta("text", index, delta.get("text", ""))
            elif dtype == "thinking_delta":
                block["thinking"] += delta.get("thinking", "")
                yield Delta("thinking", index, delta.get("thinking", ""))
            elif dtype == "signature_delta":
                block["signature"] = block.get("signature", "") + delta.get("signature", "")
            elif dtype == "input_json_delta":
                json_parts.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "content_block_stop":
            index = int(data["index"])
            if index in json_parts and index in blocks:
                blocks[index]["arguments"] = "".join(json_parts.pop(index))
        elif kind == "message_delta":
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.output_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens"):
                self.input_tokens = int(usage["input_tokens"])
        elif kind == "message_stop":
            self.stopped = True

    def end(self) -> TurnEnd:
        """The response's blocks; PROVIDER_ERROR when the stream ended before message_stop."""
        if not self.stopped:
            raise ProviderError("the stream ended before message_stop")
        blocks = self.blocks
        for index, parts in self.json_parts.items():  # blocks never stopped: keep what came
            if index in blocks:
                blocks[index]["arguments"] = "".join(parts)
        return TurnEnd(
            [blocks[i] for i in sorted(blocks)],
            self.stop_reason,
            self.input_tokens,
            self.output_tokens,
        )


def anthropic_stream(
    session: aiohttp.ClientSession,
    config: ProviderConfig,
    system: str,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> AsyncIterator[Delta | TurnEnd]:
    """One streamed Messages API call."""
    return _stream(session, config, AnthropicDialect(), system, conversation, tools)


# -- OpenAI Chat Completions (OpenAI, OpenRouter, Ollama, vLLM, llama.cpp) ---------------


def openai_messages(system: str, conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The neutral conversation as Chat Completions `messages`."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for msg in conversation:
        role = msg["role"]
        if role == "user":
            out.append({"role": "user", "content": msg["text"]})
        elif role == "assistant":
            text = "".join(b["text"] for b in msg["blocks"] if b["type"] == "text")
            calls = [
                {
                    "id": b["id"],
                    "type": "function",
                    "function": {"name": b["name"], "arguments": b["arguments"] or "{}"},
                }
                for b in msg["blocks"]
                if b["type"] == "tool_call"
            ]
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif role == "tool":
            for r in msg["results"]:
                content = r["content"] if not r["is_error"] else f"ERROR: {r['content']}"
                out.append({"role": "tool", "tool_call_id": r["id"], "content": content})
    return out


class OpenAIDialect:
    """Chat Completions: request, and the stream's chunks folded into blocks."""

    TEXT, THINKING = 0, 1  # block slots: thinking and text each get one; tools after

    def __init__(self) -> None:
        self.text_parts: list[str] = []
        self.thinking_parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.stop_reason: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.stopped = False  # `data: [DONE]` arrived

    @staticmethod
    def request(
        config: ProviderConfig,
        system: str,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]],
    ) -> Request:
        """`POST {base}/chat/completions` with a bearer key."""
        body: dict[str, Any] = {
            "model": config.model,
            "messages": openai_messages(system, conversation),
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": t["name"],
                        "description": t["description"],
                        "parameters": t["schema"],
                    },
                }
                for t in tools
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # api.openai.com's newer models refuse `max_tokens`; compatible servers know only it.
        if "api.openai.com" in config.base_url:
            body["max_completion_tokens"] = config.max_tokens
        else:
            body["max_tokens"] = config.max_tokens
        headers = {
            "authorization": f"Bearer {config.api_key}",
            "content-type": "application/json",
            "accept": "text/event-stream",
            **config.extra_headers,
        }
        return Request(config.base_url.rstrip("/") + "/chat/completions", headers, body)

    def feed(self, event: SSEEvent) -> Iterator[Delta]:
        """Fold one chunk in; yield the text and reasoning pieces it carries."""
        data_text = event.data.strip()
        if not data_text:
            return
        if data_text == "[DONE]":
            self.stopped = True
            return
        data = _loads(data_text)
        if not isinstance(data, dict):
            return
        if data.get("error"):
            err = data["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise ProviderError(str(message or "stream error"))
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = int(usage.get("prompt_tokens") or self.input_tokens)
            self.output_tokens = int(usage.get("completion_tokens") or self.output_tokens)
        calls = self.calls
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self.thinking_parts.append(reasoning)
                yield Delta("thinking", self.THINKING, reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.text_parts.append(content)
                yield Delta("text", self.TEXT, content)
            for call in delta.get("tool_calls") or []:
                index = int(call.get("index", len(calls)))
                slot = calls.setdefault(index, {"id": "", "name": "", "arguments": []})
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name") and not slot["name"]:
                    slot["name"] = function["name"]
                if function.get("arguments"):
                    slot["arguments"].append(function["arguments"])
            if choice.get("finish_reason"):
                self.stop_reason = choice["finish_reason"]

    def end(self) -> TurnEnd:
        """The response's blocks; PROVIDER_ERROR when it ended before [DONE] or a finish."""
        if not self.stopped and self.stop_reason is None:
            raise ProviderError("the stream ended before [DONE]")
        blocks: list[dict[str, Any]] = []
        if self.thinking_parts:
            blocks.append(
                {"type": "thinking", "thinking": "".join(self.thinking_parts), "signature": ""}
            )
        if self.text_parts:
            blocks.append({"type": "text", "text": "".join(self.text_parts)})
        for index in sorted(self.calls):
            slot = self.calls[index]
            blocks.append(
                {
                    "type": "tool_call",
                    "id": slot["id"] or f"call_{index}",
                    "name": slot["name"],
                    "arguments": "".join(slot["arguments"]),
                }
            )
        return TurnEnd(blocks, self.stop_reason, self.input_tokens, self.output_tokens)


def openai_stream(
    session: aiohttp.ClientSession,
    config: ProviderConfig,
    system: str,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> AsyncIterator[Delta | TurnEnd]:
    """One streamed Chat Completions call."""
    return _stream(session, config, OpenAIDialect(), system, conversation, tools)


def stream_turn(
    session: aiohttp.ClientSession,
    config: ProviderConfig,
    system: str,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> AsyncIterator[Delta | TurnEnd]:
    """One model call with the provider `config` names."""
    if config.name == "anthropic":
        return anthropic_stream(session, config, system, conversation, tools)
    return openai_stream(session, config, system, conversation, tools)
