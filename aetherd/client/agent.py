"""The agent: typed requests and one event stream that stays continuous across reconnects.

The daemon numbers every transcript event with `seq`. The client remembers the last
`seq` it delivered and reconnects with `?agentHistory=after:SEQ` (protocol section 15):
the `history` push then holds exactly the events it missed, oldest first; when it
`hasMore`, the client pages on with `history{afterSeq}`, holding the live events that
arrive meanwhile, and delivers them after the pages (deduplicated by `seq`). The
stream continues with no gap and no duplicate.

A daemon without section 15 ignores the parameter and replays its newest events,
with `text`/`thinking` pieces merged per `messageId`. The client then keeps the events
after its last `seq`, and cuts from a merged piece the characters of that message it
had already delivered (it counts them per message).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from aetherd.client.stream import Stream, Subscribers
from aetherd.protocol.agent import (
    AbortReply,
    AgentErrorEvent,
    AgentText,
    AgentThinking,
    DecisionReply,
    EventItem,
    HistoryReply,
    PromptReply,
    SettingsReply,
    ToolResponseReply,
    event_item,
)

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["AgentAPI", "AgentEventItem"]

log = logging.getLogger("aetherd.client")

AgentEventItem = EventItem | AgentErrorEvent
MESSAGES_REMEMBERED = 256  # messages whose delivered length is kept (for merged replays)
HELD_EVENTS = 100_000  # live events held while paging (beyond: the pages carry them)


class AgentAPI:
    """`client.agent`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.last_seq: int | None = None  # the newest seq delivered (or seen on connect)
        self.history: HistoryReply | None = None  # the replay of the latest connect
        self._subscribers: Subscribers[AgentEventItem] = Subscribers(client.options.stream_limit)
        self._delivered: OrderedDict[str, int] = OrderedDict()
        self._held: list[Frame] | None = None  # live events held while catching up
        self._held_overflow = False
        client.on_push("agent", "*", self._on_push)
        client.on_connect_query(self._query)
        client.on_end(self._subscribers.end)

    # -- requests -----------------------------------------------------------------------

    async def prompt(self, prompt: str, task_id: str | None = None) -> PromptReply:
        """Start (or queue) a task."""
        result: PromptReply = await self.client.request(
            "agent", "prompt", {"prompt": prompt, "taskId": task_id}, reply=PromptReply
        )
        return result

    async def settings(
        self,
        provider: str | None = None,
        model: str | None = None,
        permission_mode: str | None = None,
        **extra: Any,
    ) -> SettingsReply:
        """Set (and return) the agent's defaults; with no argument, just return them."""
        fields = {"provider": provider, "model": model, "permissionMode": permission_mode, **extra}
        result: SettingsReply = await self.client.request(
            "agent", "settings", fields, reply=SettingsReply
        )
        return result

    async def abort(self, task_id: str) -> AbortReply:
        """Cancel a task; answered after its `done`."""
        result: AbortReply = await self.client.request(
            "agent", "abort", {"taskId": task_id}, reply=AbortReply
        )
        return result

    async def tool_response(self, tool_call_id: str, result: str) -> ToolResponseReply:
        """Answer an `ask_user` call."""
        reply: ToolResponseReply = await self.client.request(
            "agent",
            "tool_response",
            {"toolCallId": tool_call_id, "result": result},
            reply=ToolResponseReply,
        )
        return reply

    async def approve(self, request_id: str, **extra: Any) -> DecisionReply:
        """Allow a pending permission request (its id is the frame's `requestId`)."""
        result: DecisionReply = await self.client.request(
            "agent", "approve", extra, reply=DecisionReply, request_id=request_id
        )
        return result

    async def reject(self, request_id: str, reason: str | None = None) -> DecisionReply:
        """Deny a pending permission request."""
        result: DecisionReply = await self.client.request(
            "agent", "reject", {"reason": reason}, reply=DecisionReply, request_id=request_id
        )
        return result

    async def history_page(
        self, before_seq: int | None = None, limit: int | None = None, **extra: Any
    ) -> HistoryReply:
        """A page of the transcript, older than `before_seq`."""
        fields = {"beforeSeq": before_seq, "limit": limit, **extra}
        result: HistoryReply = await self.client.request(
            "agent", "history", fields, reply=HistoryReply
        )
        return result

    # -- events -------------------------------------------------------------------------

    def events(self) -> Stream[AgentEventItem]:
        """Every agent event from now on, continuous across reconnects."""
        return self._subscribers.add()

    def _on_push(self, frame: Frame) -> None:
        type_ = frame.get("type")
        if type_ == "history":
            self._on_history(frame)
        elif type_ == "error":
            try:
                self._feed(AgentErrorEvent.model_validate(frame, extra="ignore"))
            except ValidationError:
                log.debug("unreadable agent error frame: %s", frame)
        else:
            self._on_event(frame)

    def _query(self, first: bool) -> dict[str, str]:
        if self.last_seq is None:
            return {}
        self._held = None
        return {"agentHistory": f"after:{self.last_seq}"}

    def _on_history(self, frame: Frame) -> None:
        try:
            history = HistoryReply.model_validate(
                {k: v for k, v in frame.items() if k not in ("channel", "type")}, extra="ignore"
            )
        except ValidationError:
            log.warning("unreadable agent history frame")
            return
        first = self.last_seq is None
        if first:
            self.history = history
            for event in history.events:
                self._count(event)  # shown by `history`, not streamed
            self.last_seq = history.latest_seq
            return
        assert self.last_seq is not None
        # After a reconnect: the events after `last_seq` (section 15), or, from a daemon
        # that ignored `agentHistory`, its newest events (some already delivered).
        legacy = any(event.seq <= self.last_seq for event in history.events)
        for event in history.events:
            self._deliver(event.model_dump(by_alias=True, exclude_none=True), merged=legacy)
        if history.has_more and not legacy:
            self._held = []
            self.client.spawn(self._catch_up())

    async def _catch_up(self) -> None:
        """Page forward until up to date, then deliver the live events held meanwhile."""
        try:
            for _ in range(1_000_000):
                after = self.last_seq or 0
                page: HistoryReply = await self.client.request(
                    "agent", "history", {"afterSeq": after}, reply=HistoryReply, internal=True
                )
                for event in page.events:
                    self._deliver(event.model_dump(by_alias=True, exclude_none=True), merged=False)
                done = not page.has_more or page.latest_seq <= after
                if done and self._held_overflow:
                    self._held_overflow, done = False, False
                    self._held = []
                if done:
                    break
        finally:
            held, self._held = self._held or [], None
            for frame in held:
                self._deliver(frame, merged=False)

    def _on_event(self, frame: Frame) -> None:
        if self._held is None:
            self._deliver(frame, merged=False)
        elif len(self._held) < HELD_EVENTS:
            self._held.append(frame)
        else:
            self._held_overflow = True  # dropped here; another round of pages has it

    def _count(self, event: Any) -> int:
        """Count `event`'s characters as delivered for its message; the count before."""
        message_id = getattr(event, "message_id", None)
        if not isinstance(event, (AgentText, AgentThinking)) or not isinstance(message_id, str):
            return 0
        before = self._delivered.get(message_id, 0)
        self._delivered[message_id] = before + len(event.content)
        self._delivered.move_to_end(message_id)
        while len(self._delivered) > MESSAGES_REMEMBERED:
            self._delivered.popitem(last=False)
        return before

    def _deliver(self, stored: dict[str, Any], *, merged: bool) -> None:
        seq = stored.get("seq")
        if not isinstance(seq, int) or (self.last_seq is not None and seq <= self.last_seq):
            return
        event = event_item(stored, frame=True)
        if merged and isinstance(event, (AgentText, AgentThinking)):
            # A replayed message holds every piece so far; cut what was delivered live.
            delivered = self._delivered.get(event.message_id, 0)
            if delivered >= len(event.content):
                self.last_seq = seq
                return
            event = event.model_copy(update={"content": event.content[delivered:]})
        self._count(event)
        self.last_seq = seq
        self._feed(event)

    def _feed(self, event: AgentEventItem) -> None:
        self._subscribers.feed(event)
