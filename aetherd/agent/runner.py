"""The agent runner: a queue of tasks, one at a time, each a model ↔ tools loop.

`AgentRunner` is a plain asyncio service (registered as `services.agent`). It knows
nothing about WebSockets: every event goes through `emit()`, which gives it its `seq`
in the transcript and hands it, serialized once, to the subscribers (the channel
registers one per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from aetherd.agent.permissions import MODES, approval_reason, describe
from aetherd.agent.providers import (
    DEFAULT_MODELS,
    KEY_VARIABLES,
    Delta,
    ProviderConfig,
    ProviderError,
    stream_turn,
)
from aetherd.agent.tools import DEFAULT_IGNORE, TOOL_NAMES, TOOL_SPECS, ToolError, ToolLimits, Tools
from aetherd.errors import AetherError, ErrorCode
from aetherd.logs import redactor
from aetherd.metrics import Sample
from aetherd.protocol.frames import dumps
from aetherd.services.jail import Jail
from aetherd.services.transcript import ACTIVE_STATUSES, TranscriptStore, utc_now
from aetherd.settings import Settings

log = logging.getLogger("aetherd.agent")

PROVIDERS = ("anthropic", "openai", "openrouter")
MAX_TASK_ID = 128
CONTEXT_TEXT_MAX = 8192  # characters of an earlier task's prompt/answer carried as context
SYSTEM_PROMPT = (
    "You are a coding agent working inside a developer's workspace. The workspace root "
    "is `/` for the file tools and the working directory of `bash`. Read the code before "
    "changing it, make focused edits, run commands to check your work, and ask the user "
    "with `ask_user` when you need a decision. Finish with a short summary."
)

Subscriber = Callable[[dict[str, Any], str], None]


@dataclass
class Job:
    """One task in the queue or running."""

    task_id: str
    prompt: str
    provider: str
    model: str
    permission_mode: str
    runner: asyncio.Task[None] | None = None
    aborted: bool = False
    finishing: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Pending:
    """A tool call waiting for a person: an approval, or an `ask_user` answer."""

    task_id: str
    tool_call_id: str
    future: asyncio.Future[Any]
    event: dict[str, Any]


class AgentRunner:
    """Tasks, their queue, the provider calls, the tools and the pending questions."""

    def __init__(
        self,
        settings: Settings,
        jail: Jail,
        store: TranscriptStore,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.environ = os.environ if environ is None else environ
        self.finished: dict[str, int] = {}
        self.provider_stats: dict[str, dict[str, float]] = {}
        self.tools = Tools(
            jail,
            ToolLimits(
                timeout=settings.agent_tool_timeout,
                output_max=settings.agent_tool_output_max,
                max_results=settings.agent_tool_max_results,
            ),
        )
        self._subscribers: list[Subscriber] = []
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._current: Job | None = None
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._approvals: dict[str, Pending] = {}
        self._inputs: dict[str, Pending] = {}
        self._user_defaults: dict[str, Any] = {}
        self._config_defaults: dict[str, Any] = {}
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load persisted defaults, fail tasks a previous run left behind, start the worker."""
        self._user_defaults = await self.store.load_settings()
        for task_id in await self.store.tasks_with_status(ACTIVE_STATUSES):
            row = await self.store.get_task(task_id) or {}
            await self._finish_record(task_id, "failed", "daemon restarted", None, row)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=30, sock_read=self.settings.agent_stream_idle_timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._worker = asyncio.create_task(self._work(), name="agent-worker")

    async def stop(self) -> None:
        """Stop the running task (recorded as failed: daemon stopped) and the worker."""
        self._stopping = True
        job = self._current
        if job is not None and job.runner is not None:
            if not job.finishing:
                job.runner.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.finished.wait(), 5)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- subscribers and events -----------------------------------------------------------
    def subscribe(self, func: Subscriber) -> Callable[[], None]:
        """Call `func(event, frame_text)` for every event from now on; returns the remover."""
        self._subscribers.append(func)

        def remove() -> None:
            if func in self._subscribers:
                self._subscribers.remove(func)

        return remove

    def invocation(
        self, task_id: str, call_id: str, name: str, args: Any, status: str, **extra: Any
    ) -> dict[str, Any]:
        """Emit a `tool_invocation` event for one tool call in `status`."""
        return self.emit(
            task_id,
            "tool_invocation",
            toolCallId=call_id,
            name=name,
            input=args,
            status=status,
            **extra,
        )

    def emit(self, task_id: str | None, type_: str, **fields: Any) -> dict[str, Any]:
        """Store the event (it gets its seq now) and hand it to every subscriber."""
        event = self.store.append(task_id, type_, fields)
        text = dumps({"channel": "agent", **event})
        for func in list(self._subscribers):
            try:
                func(event, text)
            except Exception:
                log.exception("agent subscriber failed")
        return event

    def metrics(self) -> Iterator[Sample]:
        """Tasks by state, and the provider's latency and errors, read at scrape time."""
        yield Sample("aetherd_agent_tasks_running", "Agent tasks running", self.running_count())
        yield Sample("aetherd_agent_tasks_queued", "Agent tasks queued", self.queued_count())
        for status, count in sorted(self.finished.items()):
            yield Sample(
                "aetherd_agent_tasks_finished",
                "Agent tasks ended, by status",
                count,
                {"status": status},
                "counter",
            )
        for provider, stat in sorted(self.provider_stats.items()):
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
                yield Sample(name, text, stat[key], labels, "counter")

    async def _stream_measured(
        self, provider: str, config: ProviderConfig, conversation: list[dict[str, Any]]
    ) -> AsyncIterator[Any]:
        """`stream_turn`, counted per provider: requests, errors, first-item and total time."""
        stat = self.provider_stats.setdefault(
            provider, {"requests": 0, "errors": 0, "first_token_seconds": 0.0, "seconds": 0.0}
        )
        stat["requests"] += 1
        started = time.perf_counter()
        first = True
        try:
            async for item in stream_turn(
                self._session, config, SYSTEM_PROMPT, conversation, TOOL_SPECS
            ):
                if first:
                    stat["first_token_seconds"] += time.perf_counter() - started
                    first = False
                yield item
        except ProviderError:
            stat["errors"] += 1
            raise
        finally:
            stat["seconds"] += time.perf_counter() - started

    def running_count(self) -> int:
        """Tasks running now (0 or 1: one task runs at a time)."""
        return 1 if self._current is not None else 0

    def queued_count(self) -> int:
        """Tasks waiting behind the running one."""
        return len(self._queue)

    async def history(
        self, before_seq: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """A page of the transcript: `{events, latestSeq, hasMore, pending}` (merged)."""
        cap = self.settings.agent_history_events
        limit = cap if limit is None else max(1, min(limit, cap))
        events, latest, has_more = await self.store.history(
            before_seq=before_seq, limit=limit, max_bytes=self.settings.agent_history_bytes
        )
        return {
            "events": events,
            "latestSeq": latest,
            "hasMore": has_more,
            "pending": self.pending_events(),
        }

    def pending_events(self) -> list[dict[str, Any]]:
        """The permission requests and `ask_user` calls still waiting for an answer."""
        items = list(self._approvals.values()) + list(self._inputs.values())
        return sorted((p.event for p in items), key=lambda e: e["seq"])

    # -- settings -----------------------------------------------------------------------
    def effective_settings(self) -> dict[str, Any]:
        """Provider, model and permission mode in force: client > workspace config > daemon."""
        user, conf = self._user_defaults, self._config_defaults
        provider = user.get("provider") or conf.get("provider") or self.settings.agent_provider
        model = user.get("model") or (
            conf.get("model") if conf.get("provider", provider) == provider else None
        )
        if not model and provider == self.settings.agent_provider:
            model = self.settings.agent_model
        mode = (
            user.get("permissionMode")
            or conf.get("permission_mode")
            or self.settings.agent_permission_mode
        )
        return {
            "provider": provider,
            "model": model or DEFAULT_MODELS[provider],
            "permissionMode": mode,
        }

    async def update_settings(
        self, provider: str | None, model: str | None, permission_mode: str | None
    ) -> dict[str, Any]:
        """Persist the client's defaults; returns the settings in force."""
        if provider is not None and provider not in PROVIDERS:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"invalid field 'provider': must be one of {', '.join(PROVIDERS)}",
                field="provider",
            )
        if permission_mode is not None and permission_mode not in MODES:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"invalid field 'permissionMode': must be one of {', '.join(MODES)}",
                field="permissionMode",
            )
        if model is not None and not 0 < len(model) <= 256:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'model': 1 to 256 characters",
                field="model",
            )
        changes: dict[str, Any] = {}
        if provider is not None:
            changes["provider"] = provider
            if model is None and provider != self._user_defaults.get("provider"):
                changes["model"] = None  # a model name belongs to its provider
        if model is not None:
            changes["model"] = model
        if permission_mode is not None:
            changes["permissionMode"] = permission_mode
        if changes:
            await self.store.save_settings(changes)
            for key, value in changes.items():
                if value is None:
                    self._user_defaults.pop(key, None)
                else:
                    self._user_defaults[key] = value
        return self.effective_settings()

    def apply_config(
        self,
        defaults: Mapping[str, Any] | None,
        env: Mapping[str, Any] | None,
        ignore: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        """The config channel's seam: workspace `agent` defaults, `env` for bash, ignores.

        `defaults` may hold `provider`, `model` and `permission_mode`; invalid values are
        ignored (the config service validates them first).
        """
        clean: dict[str, Any] = {}
        for key, value in (defaults or {}).items():
            if key == "provider" and value in PROVIDERS:
                clean[key] = value
            elif key == "model" and isinstance(value, str) and value:
                clean[key] = value
            elif key == "permission_mode" and value in MODES:
                clean[key] = value
        self._config_defaults = clean
        self.tools.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.tools.ignore = DEFAULT_IGNORE + tuple(ignore or ())

    def provider_config(self, provider: str, model: str) -> ProviderConfig:
        """Key and base URL of `provider`, or PROVIDER_NOT_CONFIGURED naming the variable."""
        s, env = self.settings, self.environ
        if provider == "anthropic":
            key = s.anthropic_api_key or env.get("ANTHROPIC_API_KEY")
            base = (
                s.anthropic_base_url or env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
            )
        elif provider == "openai":
            key = s.openai_api_key or env.get("OPENAI_API_KEY")
            base = s.openai_base_url or env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        else:
            key = s.openrouter_api_key or env.get("OPENROUTER_API_KEY")
            base = s.openrouter_base_url
        if key:
            redactor.add(key)  # a provider key never reaches a log line
        else:
            variable = KEY_VARIABLES[provider]
            raise AetherError(
                ErrorCode.PROVIDER_NOT_CONFIGURED,
                f"no API key for provider {provider!r}: set {variable} "
                f"(or --{provider}-api-key / AETHERD_{provider.upper()}_API_KEY)",
                variable=variable,
            )
        return ProviderConfig(
            name=provider,
            base_url=base,
            api_key=key,
            model=model,
            max_tokens=s.agent_max_tokens,
            thinking_budget=s.agent_thinking_budget if provider == "anthropic" else 0,
            retry_attempts=s.agent_retry_attempts,
            retry_base_delay=s.agent_retry_base_delay,
            retry_max_delay=s.agent_retry_max_delay,
        )

    # -- client requests ------------------------------------------------------------------
    async def prompt(self, prompt: str, task_id: str | None = None) -> dict[str, Any]:
        """Queue a task. Without a key, the task fails at once (`done` failed) and the
        result carries `code: PROVIDER_NOT_CONFIGURED`."""
        if not prompt.strip():
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'prompt': must not be empty",
                field="prompt",
            )
        if task_id is None:
            task_id = str(uuid.uuid4())
        elif not 0 < len(task_id) <= MAX_TASK_ID:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"invalid field 'taskId': 1 to {MAX_TASK_ID} characters",
                field="taskId",
            )
        if task_id in self._jobs:
            raise AetherError(
                ErrorCode.CONFLICT, f"task {task_id!r} already exists", taskId=task_id
            )
        if len(self._queue) >= self.settings.agent_max_queued:
            raise AetherError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{len(self._queue)} tasks are queued already (the limit)",
                taskId=task_id,
            )
        current = self.effective_settings()
        provider, model = current["provider"], current["model"]
        try:
            self.provider_config(provider, model)
        except AetherError as err:
            await self.store.create_task(task_id, prompt, provider, model, "failed")
            # The prompt is recorded (queued), then the task fails at once.
            self.emit(task_id, "status", status="queued", prompt=prompt)
            await self._finish_record(task_id, "failed", err.message, err.code.value, {})
            return {
                "taskId": task_id,
                "status": "failed",
                "code": err.code.value,
                "error": err.message,
            }
        await self.store.create_task(task_id, prompt, provider, model, "queued")
        job = Job(task_id, prompt, provider, model, current["permissionMode"])
        self._jobs[task_id] = job
        self._queue.append(job)
        self.emit(task_id, "status", status="queued", prompt=prompt)
        self._wake.set()
        return {"taskId": task_id, "status": "queued"}

    async def abort(self, task_id: str) -> dict[str, Any]:
        """Cancel a queued or running task; returns once its `done` is out."""
        job = self._jobs.get(task_id)
        if job is None:
            row = await self.store.get_task(task_id)
            if row is None:
                raise AetherError(ErrorCode.TASK_NOT_FOUND, f"no task {task_id!r}", taskId=task_id)
            raise AetherError(
                ErrorCode.CONFLICT,
                f"task {task_id!r} has already ended ({row['status']})",
                taskId=task_id,
            )
        job.aborted = True
        if job in self._queue:
            self._queue.remove(job)
            self._jobs.pop(task_id, None)
            await self._finish_record(task_id, "aborted", None, None, {})
            return {"taskId": task_id, "status": "aborted"}
        if job.runner is not None and not job.finishing:
            job.runner.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.finished.wait(), 10)
        return {"taskId": task_id, "status": "aborted"}

    def answer(self, tool_call_id: str, result: str) -> dict[str, Any]:
        """Answer an `ask_user` call."""
        pending = self._inputs.get(tool_call_id)
        if pending is None or pending.future.done():
            raise AetherError(
                ErrorCode.NOT_FOUND, f"no tool call {tool_call_id!r} is waiting for an answer"
            )
        pending.future.set_result(result)
        return {"toolCallId": tool_call_id, "taskId": pending.task_id}

    def decide(self, request_id: str, approved: bool, reason: str | None = None) -> dict[str, Any]:
        """Approve or reject a pending permission request."""
        pending = self._approvals.get(request_id)
        if pending is None or pending.future.done():
            raise AetherError(
                ErrorCode.NOT_FOUND, f"no permission request {request_id!r} is pending"
            )
        pending.future.set_result((approved, reason))
        return {"requestId": request_id, "taskId": pending.task_id, "approved": approved}

    # -- the worker -----------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.popleft()
            self._current = job
            job.runner = asyncio.create_task(self._run(job), name=f"agent-task-{job.task_id}")
            try:
                await asyncio.shield(job.runner)
            except asyncio.CancelledError:
                if not job.runner.done():
                    job.runner.cancel()
                    await asyncio.gather(job.runner, return_exceptions=True)
                raise
            except Exception:
                log.exception("agent task %s crashed", job.task_id)
            finally:
                self._current = None
                self._jobs.pop(job.task_id, None)
                job.finished.set()

    async def _set_status(self, job: Job, status: str) -> None:
        self.emit(job.task_id, "status", status=status)
        await self.store.update_task(job.task_id, status=status)

    async def _run(self, job: Job) -> None:
        status, error, code = "completed", None, None
        try:
            await self.store.update_task(
                job.task_id,
                status="running",
                started_at=utc_now(),
                provider=job.provider,
                model=job.model,
            )
            self.emit(job.task_id, "status", status="running")
            await self._loop(job)
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
        await self._finish_record(job.task_id, status, error, code, usage)

    async def _finish_record(
        self, task_id: str, status: str, error: str | None, code: str | None, row: Mapping[str, Any]
    ) -> None:
        """Emit the final `status` and `done`, and record the end in the tasks table."""
        usage = {
            "inputTokens": int(row.get("input_tokens") or 0),
            "outputTokens": int(row.get("output_tokens") or 0),
        }
        self.emit(task_id, "status", status=status)
        fields: dict[str, Any] = {"status": status, "usage": usage}
        if error is not None:
            fields["error"] = error
        if code is not None:
            fields["code"] = code
        self.emit(task_id, "done", **fields)
        self.finished[status] = self.finished.get(status, 0) + 1
        await self.store.update_task(
            task_id,
            status=status,
            finished_at=utc_now(),
            input_tokens=usage["inputTokens"],
            output_tokens=usage["outputTokens"],
            error=error,
        )

    async def _loop(self, job: Job) -> None:
        assert self._session is not None
        config = self.provider_config(job.provider, job.model)
        conversation = await self._context()
        conversation.append({"role": "user", "text": job.prompt})
        for _turn in range(self.settings.agent_max_turns):
            message_ids: dict[tuple[str, int], str] = {}
            end = None
            async for item in self._stream_measured(job.provider, config, conversation):
                if isinstance(item, Delta):
                    if not item.content:
                        continue
                    key = (item.kind, item.block)
                    message_id = message_ids.get(key)
                    if message_id is None:
                        message_id = message_ids[key] = uuid.uuid4().hex
                    self.emit(job.task_id, item.kind, messageId=message_id, content=item.content)
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
            results = [await self._call_tool(job, call) for call in calls]
            conversation.append({"role": "tool", "results": results})
        raise AetherError(
            ErrorCode.LIMIT_EXCEEDED,
            f"the turn limit ({self.settings.agent_max_turns} model calls) was reached",
        )

    async def _context(self) -> list[dict[str, Any]]:
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

    async def _wait_for_person(
        self, job: Job, table: dict[str, Pending], key: str, call_id: str, event: dict[str, Any]
    ) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        table[key] = Pending(job.task_id, call_id, future, event)
        try:
            await self._set_status(job, "awaiting_input")
            result = await future
        finally:
            table.pop(key, None)
        await self._set_status(job, "running")
        return result

    async def _call_tool(self, job: Job, call: dict[str, Any]) -> dict[str, Any]:
        call_id = call.get("id") or uuid.uuid4().hex
        call["id"] = call_id
        name = call.get("name") or ""
        raw = call.get("arguments") or ""
        args: Any
        problem = None
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            args, problem = {}, f"the arguments are not valid JSON ({exc}); send a JSON object"
        if problem is None and not isinstance(args, dict):
            args, problem = {}, "the arguments must be a JSON object"
        call["input"] = args
        if problem is None and name not in TOOL_NAMES:
            problem = f"there is no tool {name!r}; the tools are {', '.join(sorted(TOOL_NAMES))}"
        if problem is not None:
            self.invocation(job.task_id, call_id, name, args, "running")
            return self._result(job, call_id, name, problem, True)

        reason = approval_reason(job.permission_mode, name, args)
        if reason is not None:
            request_id = uuid.uuid4().hex
            self.invocation(job.task_id, call_id, name, args, "awaiting_approval")
            request = self.emit(
                job.task_id,
                "permission_request",
                requestId=request_id,
                toolCallId=call_id,
                name=name,
                input=args,
                description=describe(name, args, reason),
            )
            approved, why = await self._wait_for_person(
                job, self._approvals, request_id, call_id, request
            )
            if not approved:
                text = "the user rejected this tool call" + (f": {why}" if why else "")
                return self._result(job, call_id, name, text, True)

        if name == "ask_user":
            invocation = self.invocation(job.task_id, call_id, name, args, "awaiting_input")
            answer = await self._wait_for_person(job, self._inputs, call_id, call_id, invocation)
            return self._result(job, call_id, name, answer, False)

        self.invocation(job.task_id, call_id, name, args, "running")
        try:
            if name == "bash":
                progress = _Progress(self, job.task_id, call_id, name, args)
                try:
                    text, is_error = await self.tools.bash(args, progress.add)
                finally:
                    progress.close()
            else:
                text = await asyncio.wait_for(
                    self.tools.run(name, args), self.settings.agent_tool_timeout
                )
                is_error = False
        except ToolError as err:
            text, is_error = str(err), True
        except asyncio.TimeoutError:
            text, is_error = f"the tool timed out after {self.settings.agent_tool_timeout:g}s", True
        except OSError as exc:
            text, is_error = f"the tool failed: {exc}", True
        return self._result(job, call_id, name, text, is_error)

    def _result(
        self, job: Job, call_id: str, name: str, text: str, is_error: bool
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"toolCallId": call_id, "name": name, "isError": is_error}
        fields["error" if is_error else "result"] = text
        self.emit(job.task_id, "tool_result", **fields)
        return {"id": call_id, "name": name, "content": text, "is_error": is_error}


class _Progress:
    """Coalesces a running bash's output into `tool_invocation{running, progress}` events.

    At most one event per `agent_progress_interval`, and at most `agent_tool_output_max`
    characters in all (the full, capped output is in the `tool_result`)."""

    def __init__(
        self, runner: AgentRunner, task_id: str, call_id: str, name: str, args: dict[str, Any]
    ) -> None:
        self.runner = runner
        self.task_id = task_id
        self.call_id = call_id
        self.name = name
        self.args = args
        self.parts: list[str] = []
        self.budget = runner.settings.agent_tool_output_max
        self.timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        """Buffer output; schedule a flush."""
        if not text or self.budget <= 0:
            return
        text = text[: self.budget]
        self.budget -= len(text)
        self.parts.append(text)
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.runner.settings.agent_progress_interval, self.flush)

    def flush(self) -> None:
        """Emit what is buffered."""
        self.timer = None
        if not self.parts:
            return
        text = "".join(self.parts)
        self.parts.clear()
        self.runner.invocation(
            self.task_id, self.call_id, self.name, self.args, "running", progress=text
        )

    def close(self) -> None:
        """Flush the rest and stop."""
        if self.timer is not None:
            self.timer.cancel()
        self.flush()
