"""The agent service: the parts of the agent put together, and the requests it answers.

`AgentRunner` (registered as `services.agent`) owns one of each part and knows
nothing about WebSockets or frames:

- `defaults` (`aetherd.agent.defaults`): the provider, model and permission mode in
  force, and each provider's key and URL;
- `queue` (`aetherd.agent.queue`): the FIFO of tasks, one running at a time;
- `turns` (`aetherd.agent.turn`): one task's model ↔ tools loop, from `running` to `done`;
- `executor` (`aetherd.agent.executor`) over `tools` (`aetherd.agent.tools`): tool calls;
- `pending` (`aetherd.agent.pending`): permission requests and questions awaiting a person;
- `events` (`aetherd.agent.events`): every domain event, recorded in the transcript
  (where it gets its `seq`) and handed to subscribers. The agent channel subscribes
  and turns events into frames;
- `backends` (`aetherd.agent.backends`): the declared ACP agents (section 17), each
  with its own process and task queue; `builtin` is the loop above and the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from aetherd.agent.backends import (
    BUILTIN,
    AcpBackend,
    BackendSpec,
    spec_from_command,
    spec_from_config,
)
from aetherd.agent.defaults import Defaults, InForce, provider_config
from aetherd.agent.events import EventLog, Recorded, Subscriber, TaskStatus
from aetherd.agent.executor import ToolExecutor
from aetherd.agent.pending import PendingBook
from aetherd.agent.providers import ProviderConfig
from aetherd.agent.queue import Job, TaskQueue
from aetherd.agent.tools import DEFAULT_IGNORE, ToolLimits, Tools
from aetherd.agent.turn import TurnLoop
from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample
from aetherd.services.fs import FileSystem
from aetherd.services.jail import Jail
from aetherd.services.process import ProcessManager
from aetherd.services.transcript import ACTIVE_STATUSES, TranscriptStore, require_text
from aetherd.settings import Settings

MAX_TASK_ID = 128
ABORT_WAIT = 10.0  # seconds `abort` waits for the running task's end
STOP_WAIT = 5.0  # seconds `stop` waits for the running task's end


@dataclass(frozen=True)
class Queued:
    """What `prompt` did: the task is `queued`, or `failed` at once (`code`, `error`)."""

    task_id: str
    status: str
    code: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class HistoryPage:
    """A page of the transcript (stored events, merged) and what waits for a person."""

    events: list[dict[str, Any]]
    latest_seq: int
    has_more: bool
    pending: list[dict[str, Any]]


class AgentRunner:
    """Tasks, their queue, the provider calls, the tools and the pending questions."""

    def __init__(
        self,
        settings: Settings,
        jail: Jail,
        store: TranscriptStore,
        environ: Mapping[str, str] | None = None,
        *,
        fs: FileSystem | None = None,
        processes: ProcessManager | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.environ = os.environ if environ is None else environ
        self.tools = Tools(
            jail,
            ToolLimits(
                timeout=settings.agent_tool_timeout,
                output_max=settings.agent_tool_output_max,
                max_results=settings.agent_tool_max_results,
            ),
        )
        self.events = EventLog(store)
        self.pending = PendingBook()
        self.defaults = Defaults(settings, store)
        self.executor = ToolExecutor(
            self.events,
            self.pending,
            self.tools,
            timeout=settings.agent_tool_timeout,
            progress_interval=settings.agent_progress_interval,
            progress_max=settings.agent_tool_output_max,
        )
        self._session: aiohttp.ClientSession | None = None
        self.turns = TurnLoop(
            settings, store, self.events, self.executor, self.provider_config, self._get_session
        )
        self.queue = TaskQueue(self.turns.run, settings.agent_max_queued)
        # ACP backends (section 17): the file system and the process service serve
        # their agents' fs/* and terminal/* requests.
        self.fs = fs or FileSystem(jail)
        self.processes = processes or ProcessManager(settings, jail)
        self.backends: dict[str, AcpBackend] = {}
        self._config_backends: dict[str, BackendSpec] = {}
        self._started = False

    def _get_session(self) -> aiohttp.ClientSession | None:
        return self._session

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load persisted defaults, fail tasks a previous run left behind, start the worker."""
        await self.defaults.load()
        for task_id in await self.store.tasks_with_status(ACTIVE_STATUSES):
            row = await self.store.get_task(task_id) or {}
            await self.events.finish(task_id, "failed", "daemon restarted", None, row)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=30, sock_read=self.settings.agent_stream_idle_timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        self.queue.start()
        self._started = True
        self._sync_backends()

    async def stop(self) -> None:
        """Stop the running tasks (recorded as failed: daemon stopped), the workers and
        the backends' agent processes."""
        self._started = False
        backends = list(self.backends.values())
        await asyncio.gather(*(b.stop() for b in backends), self.queue.stop(STOP_WAIT))
        if self._session is not None:
            await self._session.close()

    # -- events, state and metrics --------------------------------------------------------
    def subscribe(self, func: Subscriber) -> Callable[[], None]:
        """Call `func(recorded)` for every event from now on; returns the remover."""
        return self.events.subscribe(func)

    @property
    def finished(self) -> dict[str, int]:
        """Tasks ended since start, by final status."""
        return self.events.finished

    def _queues(self) -> list[TaskQueue]:
        return [self.queue, *(b.queue for b in self.backends.values())]

    def running_count(self) -> int:
        """Tasks running now (one at a time per backend)."""
        return sum(q.running_count() for q in self._queues())

    def queued_count(self) -> int:
        """Tasks waiting behind the running ones."""
        return sum(q.queued_count() for q in self._queues())

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
        yield from self.turns.stats.samples()
        for name, backend in sorted(self.backends.items()):
            labels = {"backend": name}
            yield Sample(
                "aetherd_agent_backend_starts",
                "ACP agent processes started",
                backend.starts,
                labels,
                "counter",
            )
            yield Sample(
                "aetherd_agent_backend_crashes",
                "ACP agent processes found dead and started again",
                backend.crashes,
                labels,
                "counter",
            )

    async def history(
        self,
        before_seq: int | None = None,
        limit: int | None = None,
        after_seq: int | None = None,
    ) -> HistoryPage:
        """A page of the transcript, merged, and the calls still waiting for a person.

        Backwards from `before_seq` (the newest events first chosen), or forwards from
        `after_seq` (the oldest events after it); INVALID_MESSAGE for both at once.
        """
        if before_seq is not None and after_seq is not None:
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                "invalid field 'afterSeq': give beforeSeq or afterSeq, not both",
                field="afterSeq",
            )
        cap = self.settings.agent_history_events
        limit = cap if limit is None else max(1, min(limit, cap))
        events, latest, has_more = await self.store.history(
            before_seq=before_seq,
            after_seq=after_seq,
            limit=limit,
            max_bytes=self.settings.agent_history_bytes,
        )
        return HistoryPage(events, latest, has_more, self.pending_events())

    def pending_events(self) -> list[dict[str, Any]]:
        """The permission requests and `ask_user` calls still waiting, as stored events."""
        return [recorded.record() for recorded in self.pending.events()]

    # -- settings -----------------------------------------------------------------------
    def effective_settings(self) -> InForce:
        """Provider, model, permission mode and backend in force: client > workspace
        config > daemon. A backend that is no longer declared gives way to `builtin`."""
        now = self.defaults.in_force()
        if now.backend != BUILTIN and now.backend not in self.declared():
            now = InForce(now.provider, now.model, now.permission_mode, BUILTIN)
        return now

    async def update_settings(
        self,
        provider: str | None,
        model: str | None,
        permission_mode: str | None,
        backend: str | None = None,
    ) -> InForce:
        """Persist the client's defaults; returns the settings in force."""
        if backend is not None:
            self._check_backend(backend)
        await self.defaults.update(provider, model, permission_mode, backend)
        return self.effective_settings()

    # -- backends -----------------------------------------------------------------------
    def declared(self) -> dict[str, BackendSpec]:
        """The declared ACP backends: the daemon settings', then the workspace config's
        (which win on a name both declare)."""
        specs = {
            name: spec_from_command(name, command)
            for name, command in self.settings.agent_backends.items()
        }
        specs.update(self._config_backends)
        return specs

    def _check_backend(self, name: str) -> None:
        if name != BUILTIN and name not in self.declared():
            names = ", ".join([BUILTIN, *sorted(self.declared())])
            raise AetherError(
                ErrorCode.INVALID_MESSAGE,
                f"invalid field 'backend': unknown backend {name[:80]!r} (declared: {names})",
                field="backend",
            )

    def _sync_backends(self) -> None:
        """Create, update or retire backends to match the declarations."""
        if not self._started:
            return
        specs = self.declared()
        for name, backend in self.backends.items():
            backend.spec = specs.get(name)  # None: retired; its process restarts no more
        for name, spec in specs.items():
            if name not in self.backends:
                backend = AcpBackend(
                    spec,
                    settings=self.settings,
                    store=self.store,
                    events=self.events,
                    pending=self.pending,
                    fs=self.fs,
                    processes=self.processes,
                    saved=lambda key: self.defaults.user.get(key),
                )
                self.backends[name] = backend
                backend.start()

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
        defaults = dict(defaults or {})
        raw = defaults.pop("backends", None) or {}
        self.defaults.apply_config(defaults)
        specs = {}
        if isinstance(raw, Mapping):
            for name, value in raw.items():
                spec = spec_from_config(str(name), value) if isinstance(value, Mapping) else None
                if spec is not None and name != BUILTIN:
                    specs[str(name)] = spec
        self._config_backends = specs
        self._sync_backends()
        self.tools.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.tools.ignore = DEFAULT_IGNORE + tuple(ignore or ())

    def provider_config(self, provider: str, model: str) -> ProviderConfig:
        """Key and base URL of `provider`, or PROVIDER_NOT_CONFIGURED naming the variable."""
        return provider_config(self.settings, self.environ, provider, model)

    # -- client requests ------------------------------------------------------------------
    async def prompt(
        self, prompt: str, task_id: str | None = None, backend: str | None = None
    ) -> Queued:
        """Queue a task on `backend` (default: the one in force). On `builtin` without a
        key, the task fails at once (`done` failed) with `code: PROVIDER_NOT_CONFIGURED`."""
        require_text("prompt", prompt)
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
        require_text("taskId", task_id)
        if backend is not None:
            self._check_backend(backend)
        current = self.effective_settings()
        name = backend or current.backend
        for queue in self._queues():
            if task_id in queue:
                raise AetherError(
                    ErrorCode.CONFLICT, f"task {task_id!r} already exists", taskId=task_id
                )
        if name != BUILTIN:
            acp = self.backends[name]
            acp.queue.check_room(task_id)
            await self.store.create_task(task_id, prompt, "acp", name, "queued")
            acp.queue.put(Job(task_id, prompt, "acp", name, current.permission_mode, name))
            self.events.emit(task_id, TaskStatus("queued", prompt))
            return Queued(task_id, "queued")
        self.queue.check_room(task_id)
        provider, model = current.provider, current.model
        try:
            self.provider_config(provider, model)
        except AetherError as err:
            await self.store.create_task(task_id, prompt, provider, model, "failed")
            # The prompt is recorded (queued), then the task fails at once.
            self.events.emit(task_id, TaskStatus("queued", prompt))
            await self.events.finish(task_id, "failed", err.message, err.code.value, {})
            return Queued(task_id, "failed", err.code.value, err.message)
        await self.store.create_task(task_id, prompt, provider, model, "queued")
        self.queue.put(Job(task_id, prompt, provider, model, current.permission_mode))
        self.events.emit(task_id, TaskStatus("queued", prompt))
        return Queued(task_id, "queued")

    async def abort(self, task_id: str) -> str:
        """Cancel a queued or running task; returns (its id) once its `done` is out."""
        queue = next((q for q in self._queues() if task_id in q), self.queue)
        job = queue.get(task_id)
        if job is not None and job.finishing:
            # Its end is being recorded: it has ended, whatever the client saw so far.
            # Answer as for any ended task, once the end is stored.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.finished.wait(), ABORT_WAIT)
            job = None
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
        if queue.remove_queued(job):
            await self.events.finish(task_id, "aborted", None, None, {})
        else:
            await queue.cancel_running(job, ABORT_WAIT)
        return task_id

    def answer(self, tool_call_id: str, result: str) -> str:
        """Answer an `ask_user` call; returns the id of the task that asked."""
        return self.pending.answer(tool_call_id, result).task_id

    def decide(
        self,
        request_id: str,
        approved: bool,
        reason: str | None = None,
        option_id: str | None = None,
    ) -> str:
        """Approve or reject a pending permission request; returns the task's id.
        `option_id` picks one of an ACP agent's allow options (approve only)."""
        return self.pending.decide(request_id, approved, reason, option_id).task_id


__all__ = ["AgentRunner", "HistoryPage", "Queued", "Recorded"]
