"""The agent's domain events and the log that records them.

Each event is a plain dataclass naming what happened to a task. `payload()` is its
stored form: the JSON object kept in the transcript's `events.payload` column (the
field names are the transcript's, camelCase, and must not change: stored transcripts
are replayed as they are). The agent channel turns a recorded event into a frame; the
services never build frames.

`EventLog.emit()` records an event (the transcript gives it its `seq` and time at
once, on the loop) and hands the `Recorded` event to every subscriber.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from aetherd.services.transcript import TranscriptStore, utc_now

log = logging.getLogger("aetherd.agent")


class Event(Protocol):
    """What every domain event offers."""

    @property
    def type(self) -> str:
        """The event's type, as stored (`status`, `text`, `tool_result`, ...)."""

    def payload(self) -> dict[str, Any]:
        """The stored form: the event's fields, as kept in the transcript."""


@dataclass(frozen=True)
class TaskStatus:
    """A task changed status; `prompt` travels with `queued`."""

    status: str
    prompt: str | None = None
    type: ClassVar[str] = "status"

    def payload(self) -> dict[str, Any]:
        """`{status[, prompt]}`."""
        out: dict[str, Any] = {"status": self.status}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


@dataclass(frozen=True)
class ContentPiece:
    """A piece of the model's text or thinking, in one content block (`message_id`)."""

    kind: str  # "text" | "thinking"
    message_id: str
    content: str

    @property
    def type(self) -> str:
        """`text` or `thinking`."""
        return self.kind

    def payload(self) -> dict[str, Any]:
        """`{messageId, content}`."""
        return {"messageId": self.message_id, "content": self.content}


@dataclass(frozen=True)
class ToolInvocation:
    """A tool call in `status` (running, awaiting_approval, awaiting_input); `progress`
    carries a piece of a running bash's output."""

    tool_call_id: str
    name: str
    input: dict[str, Any]
    status: str
    progress: str | None = None
    type: ClassVar[str] = "tool_invocation"

    def payload(self) -> dict[str, Any]:
        """`{toolCallId, name, input, status[, progress]}`."""
        out: dict[str, Any] = {
            "toolCallId": self.tool_call_id,
            "name": self.name,
            "input": self.input,
            "status": self.status,
        }
        if self.progress is not None:
            out["progress"] = self.progress
        return out


@dataclass(frozen=True)
class PermissionRequest:
    """A tool call that waits for a person's approval; `options` are an ACP agent's
    answers (`[{optionId, name, kind}]`), None for the built-in agent."""

    request_id: str
    tool_call_id: str
    name: str
    input: dict[str, Any]
    description: str
    options: list[dict[str, str]] | None = None
    type: ClassVar[str] = "permission_request"

    def payload(self) -> dict[str, Any]:
        """`{requestId, toolCallId, name, input, description[, options]}`."""
        out: dict[str, Any] = {
            "requestId": self.request_id,
            "toolCallId": self.tool_call_id,
            "name": self.name,
            "input": self.input,
            "description": self.description,
        }
        if self.options is not None:
            out["options"] = self.options
        return out


@dataclass(frozen=True)
class Plan:
    """An ACP agent's plan, whole, as it is now: `[{content, priority, status}]`."""

    entries: list[dict[str, Any]]
    type: ClassVar[str] = "plan"

    def payload(self) -> dict[str, Any]:
        """`{entries}`."""
        return {"entries": self.entries}


@dataclass(frozen=True)
class ToolResult:
    """What a tool call gave back: `text` is the result, or the error when `is_error`."""

    tool_call_id: str
    name: str
    text: str
    is_error: bool
    type: ClassVar[str] = "tool_result"

    def payload(self) -> dict[str, Any]:
        """`{toolCallId, name, isError, result | error}`."""
        out: dict[str, Any] = {
            "toolCallId": self.tool_call_id,
            "name": self.name,
            "isError": self.is_error,
        }
        out["error" if self.is_error else "result"] = self.text
        return out


@dataclass(frozen=True)
class TaskDone:
    """A task ended: final `status`, summed usage, and the failure when there is one."""

    status: str
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    code: str | None = None
    type: ClassVar[str] = "done"

    def payload(self) -> dict[str, Any]:
        """`{status, usage: {inputTokens, outputTokens}[, error][, code]}`."""
        out: dict[str, Any] = {
            "status": self.status,
            "usage": {"inputTokens": self.input_tokens, "outputTokens": self.output_tokens},
        }
        if self.error is not None:
            out["error"] = self.error
        if self.code is not None:
            out["code"] = self.code
        return out


@dataclass(eq=False)
class Recorded:
    """An event as recorded: its task, `seq` and time, and the event itself.

    `cache` is for consumers: what they derive from the event (the channel keeps the
    encoded frame there), so N subscribers derive it once.
    """

    task_id: str | None
    seq: int
    created_at: str
    event: Event
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def type(self) -> str:
        """The event's type."""
        return self.event.type

    def record(self) -> dict[str, Any]:
        """The stored event as the transcript returns it: `{type, taskId, seq, createdAt, ...}`."""
        out: dict[str, Any] = {
            "type": self.event.type,
            "taskId": self.task_id,
            "seq": self.seq,
            "createdAt": self.created_at,
        }
        out.update(self.event.payload())
        return out


Subscriber = Callable[[Recorded], None]


class EventLog:
    """Records task events in the transcript and fans them out to subscribers.

    Also ends tasks (`finish`): the final `status` and `done` events, the task row, and
    the count of tasks ended by status.
    """

    def __init__(self, store: TranscriptStore) -> None:
        self.store = store
        self.finished: dict[str, int] = {}
        self._subscribers: list[Subscriber] = []

    def subscribe(self, func: Subscriber) -> Callable[[], None]:
        """Call `func(recorded)` for every event from now on; returns the remover."""
        self._subscribers.append(func)

        def remove() -> None:
            if func in self._subscribers:
                self._subscribers.remove(func)

        return remove

    def emit(self, task_id: str | None, event: Event) -> Recorded:
        """Store the event (it gets its seq now) and hand it to every subscriber."""
        stored = self.store.append(task_id, event.type, event.payload())
        recorded = Recorded(task_id, stored["seq"], stored["createdAt"], event)
        for func in list(self._subscribers):
            try:
                func(recorded)
            except Exception:
                log.exception("agent subscriber failed")
        return recorded

    async def set_status(self, task_id: str, status: str) -> None:
        """Emit `status` and record it on the task."""
        self.emit(task_id, TaskStatus(status))
        await self.store.update_task(task_id, status=status)

    async def finish(
        self,
        task_id: str,
        status: str,
        error: str | None,
        code: str | None,
        row: Mapping[str, Any],
    ) -> None:
        """Emit the final `status` and `done`, and record the end in the tasks table.

        `row` holds the task's usage (`input_tokens`, `output_tokens`)."""
        done = TaskDone(
            status,
            int(row.get("input_tokens") or 0),
            int(row.get("output_tokens") or 0),
            error,
            code,
        )
        self.emit(task_id, TaskStatus(status))
        self.emit(task_id, done)
        self.finished[status] = self.finished.get(status, 0) + 1
        await self.store.update_task(
            task_id,
            status=status,
            finished_at=utc_now(),
            input_tokens=done.input_tokens,
            output_tokens=done.output_tokens,
            error=error,
        )
