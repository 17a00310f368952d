"""The turn loop: one task's model ↔ tools conversation, from `running` to `done`.

`TurnLoop.run(job)` is what the task queue runs for each job. Each turn streams one
model response (its text and thinking pieces become events), then runs the tool calls
it asked for through the executor, until the model answers without tools or the turn
limit is reached. Whatever ends the task (success, provider error, abort, shutdown)
is recorded as its final `status` and `done`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from aetherd.agent.events import ContentPiece, EventLog, TaskStatus
from aetherd.agent.executor import ToolExecutor
from aetherd.agent.providers import Delta, ProviderConfig, ProviderError, TurnEnd, stream_turn
from aetherd.agent.queue import Job
from aetherd.agent.tools import TOOL_SPECS
from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.services.transcript import TranscriptStore, utc_now
from aetherd.settings import Settings

log = logging.getLogger("aetherd.agent")

CONTEXT_TEXT_MAX = 8192  # characters of an earlier task's prompt/answer carried as context
SYSTEM_PROMPT = (
    "You are a coding agent working inside a developer's workspace. The workspace root "
    "is `/` for the file tools and the working directory of `bash`. Read the code before "
    "changing it, make focused edits, run commands to check your work, and ask the user "
    "with `ask_user` when you need a decision. Finish with a short summary."
)


class ProviderStats:
    """Model calls per provider: requests, errors, time to first item, total time."""

    def __init__(self) -> None:
        self.by_provider: dict[str, dict[str, float]] = {}

    async def measure(
        self, provider: str, stream: AsyncIterator[Delta | TurnEnd]
    ) -> AsyncIterator[Delta | TurnEnd]:
        """`stream`, counted under `provider`."""
        stat = self.by_provider.setdefault(
            provider, {"requests": 0, "errors": 0, "first_token_seconds": 0.0, "seconds": 0.0}
        )
        stat["requests"] += 1
        started = time.perf_counter()
        first = True
        try:
            async for item in stream:
                if first:
                    stat["first_token_seconds"] += time.perf_counter() - started
                    first = False
                yield item
        except ProviderError:
            stat["errors"] += 1
            raise
        finally:
            stat["seconds"] += time.perf_counter() - started

    def samples(self) -> list[Sample]:
        """The counters as metric samples."""
        out = []
        for provider, stat in sorted(self.by_provider.items()):
            labels = {"provider": provider}
            for key, name, text in (
                ("requests", "aetherd_agent_provider_requests", "Model calls"),
                ("errors", "aetherd_agent_provider_errors", "Model calls that failed"),
                (
                    "first_token_seconds",
                    "aetherd_agent_provider_first_token_seconds",
                    "Summed time from request to the first streamed item",
                ),
                (
                    "seconds",
                    "aetherd_agent_provider_seconds",
                    "Summed time from request to end of stream",
                ),
            ):
                out.append(Sample(name, text, stat[key], labels, "counter"))
        return out


class TurnLoop:
    """Runs one job: its conversation with the model and the tools, then its end."""

    def __init__(
        self,
        settings: Settings,
        store: TranscriptStore,
        events: EventLog,
        executor: ToolExecutor,
        configure: Callable[[str, str], ProviderConfig],
        session: Callable[[], aiohttp.ClientSession | None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.executor = executor
        self.configure = configure
        self.session = session
        self.stats = ProviderStats()

    async def run(self, job: Job) -> None:
        """Run `job` to its end and record how it ended."""
        status, error, code = "completed", None, None
        try:
            await self.store.update_task(
                job.task_id,
                status="running",
                started_at=utc_now(),
                provider=job.provider,
                model=job.model,
            )
            self.events.emit(job.task_id, TaskStatus("running"))
            await self._turns(job)
        except asyncio.CancelledError:
            if job.aborted:
                status = "aborted"
            else:
                status, error = "failed", "daemon stopped"
        except AetherError as err:
            status, error, code = "failed", err.message, err.code.value
        except ProviderError as err:
            status, error, code = "failed", err.message, ErrorCode.PROVIDER_ERROR.value
        except Exception as exc:
            log.exception("agent task %s failed", job.task_id)
            status, error, code = "failed", f"internal error: {exc}", ErrorCode.INTERNAL_ERROR.value
        job.finishing = True
        usage = {"input_tokens": job.input_tokens, "output_tokens": job.output_tokens}
        await self.events.finish(job.task_id, status, error, code, usage)

    async def _turns(self, job: Job) -> None:
        session = self.session()
        assert session is not None
        config = self.configure(job.provider, job.model)
        conversation = await self.context()
        conversation.append({"role": "user", "text": job.prompt})
        for _turn in range(self.settings.agent_max_turns):
            message_ids: dict[tuple[str, int], str] = {}
            end: TurnEnd | None = None
            stream = stream_turn(session, config, SYSTEM_PROMPT, conversation, TOOL_SPECS)
            async for item in self.stats.measure(job.provider, stream):
                if isinstance(item, Delta):
                    if not item.content:
                        continue
                    key = (item.kind, item.block)
                    message_id = message_ids.get(key)
                    if message_id is None:
                        message_id = message_ids[key] = uuid.uuid4().hex
                    self.events.emit(job.task_id, ContentPiece(item.kind, message_id, item.content))
                else:
                    end = item
            assert end is not None
            job.input_tokens += end.input_tokens
            job.output_tokens += end.output_tokens
            conversation.append({"role": "assistant", "blocks": end.blocks})
            calls = [b for b in end.blocks if b["type"] == "tool_call"]
            if not calls:
                final = "".join(b["text"] for b in end.blocks if b["type"] == "text")
                await self.store.update_task(job.task_id, final_text=final[:CONTEXT_TEXT_MAX])
                return
            results = [
                await self.executor.call(job.task_id, job.permission_mode, call) for call in calls
            ]
            conversation.append({"role": "tool", "results": results})
        raise AetherError(
            ErrorCode.LIMIT_EXCEEDED,
            f"the turn limit ({self.settings.agent_max_turns} model calls) was reached",
        )

    async def context(self) -> list[dict[str, Any]]:
        """Earlier tasks as user/assistant pairs, so a follow-up prompt has its context."""
        out: list[dict[str, Any]] = []
        for task in await self.store.recent_tasks(self.settings.agent_context_tasks):
            answer = task["final_text"]
            if not answer:
                answer = f"(that task ended {task['status']}" + (
                    f": {task['error']})" if task["error"] else ")"
                )
            out.append({"role": "user", "text": task["prompt"][:CONTEXT_TEXT_MAX]})
            out.append({"role": "assistant", "blocks": [{"type": "text", "text": answer}]})
        return out
