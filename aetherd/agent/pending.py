"""Tool calls waiting for a person: permission requests and `ask_user` questions.

A waiting call is a future keyed by the permission request's id (approvals) or the
tool call's id (questions). `answer()` and `decide()` resolve it from any connection;
the waiting task resumes. When the task is cancelled (abort, shutdown), its entry
goes away with it. `events()` lists what is still waiting, for the `pending` field of
a history page.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aetherd.agent.events import Recorded
from aetherd.errors import AetherError, ErrorCode

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    """A person's answer to a permission request."""

    approved: bool
    reason: str | None = None
    option_id: str | None = None  # the ACP option a person picked (approve only)


@dataclass
class Waiting(Generic[T]):
    """One call waiting for a person, and the event that asked."""

    key: str
    task_id: str
    tool_call_id: str
    future: asyncio.Future[T]
    asked: Recorded
    options: tuple[tuple[str, str], ...] = ()  # an ACP request's (optionId, kind) pairs

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class PendingBook:
    """The permission requests and questions still waiting for an answer."""

    def __init__(self) -> None:
        self.approvals: dict[str, Waiting[Decision]] = {}
        self.questions: dict[str, Waiting[str]] = {}

    def approval(
        self,
        request_id: str,
        tool_call_id: str,
        asked: Recorded,
        options: tuple[tuple[str, str], ...] = (),
    ) -> Waiting[Decision]:
        """Register a permission request (`asked` is its event); `wait()` for the decision.

        Registered at once, so a person who sees the event can answer before the task
        has awaited anything. `options` are an ACP agent's `(optionId, kind)` pairs."""
        waiting = self._add(self.approvals, request_id, tool_call_id, asked)
        waiting.options = options
        return waiting

    def question(self, tool_call_id: str, asked: Recorded) -> Waiting[str]:
        """Register an `ask_user` question (`asked` is its `tool_invocation` event)."""
        return self._add(self.questions, tool_call_id, tool_call_id, asked)

    @staticmethod
    def _add(
        table: dict[str, Waiting[T]], key: str, tool_call_id: str, asked: Recorded
    ) -> Waiting[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiting = Waiting(key, asked.task_id or "", tool_call_id, future, asked)
        table[key] = waiting
        return waiting

    async def wait(self, waiting: Waiting[T]) -> T:
        """The answer; the entry goes away when it comes or the waiting task is cancelled."""
        try:
            return await waiting.future
        finally:
            self.discard(waiting)

    def discard(self, waiting: Waiting[Any]) -> None:
        """Forget `waiting` (answered, or its task is gone); later answers get NOT_FOUND."""
        for table in (self.approvals, self.questions):
            if table.get(waiting.key) is waiting:
                del table[waiting.key]

    def answer(self, tool_call_id: str, result: str) -> Waiting[str]:
        """Answer an `ask_user` question; NOT_FOUND when none waits under that id."""
        waiting = self.questions.get(tool_call_id)
        if waiting is None or waiting.future.done():
            raise AetherError(
                ErrorCode.NOT_FOUND, f"no tool call {tool_call_id!r} is waiting for an answer"
            )
        waiting.future.set_result(result)
        return waiting

    def decide(
        self,
        request_id: str,
        approved: bool,
        reason: str | None = None,
        option_id: str | None = None,
    ) -> Waiting[Decision]:
        """Approve or reject a permission request; NOT_FOUND when none is pending.

        `option_id` (approve only) must name one of the request's `allow_*` options:
        INVALID_MESSAGE otherwise."""
        waiting = self.approvals.get(request_id)
        if waiting is None or waiting.future.done():
            raise AetherError(
                ErrorCode.NOT_FOUND, f"no permission request {request_id!r} is pending"
            )
        if option_id is not None:
            kinds = dict(waiting.options)
            if not kinds.get(option_id, "").startswith("allow"):
                allowed = [o for o, kind in waiting.options if kind.startswith("allow")]
                raise AetherError(
                    ErrorCode.INVALID_MESSAGE,
                    f"invalid field 'optionId': this request's allow options are {allowed}",
                    field="optionId",
                )
        waiting.future.set_result(Decision(approved, reason, option_id))
        return waiting

    def events(self) -> list[Recorded]:
        """The events that asked and are still waiting, oldest first."""
        waiting: list[Waiting[Any]] = [*self.approvals.values(), *self.questions.values()]
        return sorted((w.asked for w in waiting), key=lambda r: r.seq)
