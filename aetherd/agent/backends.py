"""Agent backends over the Agent Client Protocol (PROTOCOL.md section 17).

A backend is a coding agent that speaks ACP on its stdio (Gemini CLI, Claude Code
through its adapter, ...), declared by name in the daemon settings
(`--agent-backend NAME=COMMAND`) or the workspace config (`agent.backends`). The
daemon is its ACP client:

- `BackendSpec`: a declaration (argv, extra env, where it came from);
- `AcpBackend`: one declared backend's agent process and its task queue. The process
  starts on the first task (`initialize`, advertising `fs.readTextFile`,
  `fs.writeTextFile` and `terminal`), runs in the workspace root in its own process
  group with the workspace env, is started again for the next task after a crash,
  and is stopped with the daemon. `run(job)` is one task: a session (`session/new`,
  or the conversation's session again, `session/load` after a restart, when the
  agent supports loading), `session/prompt`, and the agent's `session/update`s
  turned into section 4's events (`aetherd.agent.events`), stored with their `seq`.
  Abort sends `session/cancel`; an agent that has not ended the turn after
  `acp_cancel_grace` seconds has its process group killed.
- The agent's requests are served by the daemon's services: `fs/*` by the jailed
  `FileSystem` (its one atomic writer; the watcher reports the writes),
  `terminal/*` by the `ProcessManager` (section 10: clients see the commands on the
  process channel), `session/request_permission` through the permission modes and
  `PendingBook` (a `permission_request` event with the agent's `options`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from aetherd import __version__
from aetherd.agent.acp import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    RESOURCE_NOT_FOUND,
    AcpClosed,
    AcpConnection,
    AcpError,
)
from aetherd.agent.acp_types import (
    PROTOCOL_VERSION,
    ContentChunk,
    CreateTerminal,
    InitializeResult,
    NewSessionResult,
    PlanUpdate,
    PromptResult,
    ReadTextFile,
    RequestPermission,
    SessionNotification,
    TerminalRef,
    ToolCallInfo,
    WriteTextFile,
)
from aetherd.agent.events import (
    ContentPiece,
    EventLog,
    PermissionRequest,
    Plan,
    TaskStatus,
    ToolInvocation,
    ToolResult,
)
from aetherd.agent.pending import Decision, PendingBook, Waiting
from aetherd.agent.permissions import destructive_command
from aetherd.agent.queue import Job, TaskQueue
from aetherd.errors import AetherError, ErrorCode
from aetherd.services.fs import FileSystem
from aetherd.services.process import ManagedProcess, ProcessManager
from aetherd.services.transcript import TranscriptStore, utc_now
from aetherd.settings import Settings

log = logging.getLogger("aetherd.agent.acp")

BUILTIN = "builtin"
SESSION_KEY = "acpSession:"  # + backend name: the conversation's ACP session id (persisted)
FINAL_TEXT_MAX = 8192
SESSIONS_KEPT = 16  # sessions whose requests are still served, per agent process
RELEASED_KEPT = 16  # released terminals whose output a tool result may still show
STOP_REASONS = {
    "end_turn": "completed",
    "cancelled": "aborted",
    "max_tokens": "failed",
    "max_turn_requests": "failed",
    "refusal": "failed",
}


@dataclass(frozen=True)
class BackendSpec:
    """A declared backend: the argv to run, extra env, and where it was declared."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    origin: str = "settings"
    auth_method: str | None = None  # `authenticate` with this methodId after initialize


def spec_from_command(name: str, command: str, origin: str = "settings") -> BackendSpec:
    """`NAME=COMMAND` from the settings: the command line is split like a shell would."""
    return BackendSpec(name, tuple(shlex.split(command)), (), origin)


def spec_from_config(name: str, value: Mapping[str, Any]) -> BackendSpec | None:
    """`agent.backends.NAME: {command, args, env}`; `command` alone is split like a shell
    would. None when it names no program."""
    command = str(value.get("command") or "")
    args = [str(a) for a in value.get("args") or ()]
    argv = [command, *args] if args else shlex.split(command)
    if not argv or not argv[0]:
        return None
    env = tuple(sorted((str(k), str(v)) for k, v in (value.get("env") or {}).items()))
    auth = value.get("auth_method")
    return BackendSpec(name, tuple(argv), env, "config", str(auth) if auth else None)


def _invalid(field_name: str, rule: str) -> AetherError:
    return AetherError(
        ErrorCode.INVALID_MESSAGE, f"invalid field '{field_name}': {rule}", field=field_name
    )


def _signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


@dataclass
class Turn:
    """One task's prompt turn: its session, the tool calls seen, text for the context."""

    job: Job
    session_id: str = ""
    block: tuple[str, str] | None = None  # (kind, messageId) of the content block going on
    tools: dict[str, ToolCallInfo] = field(default_factory=dict)
    resulted: set[str] = field(default_factory=set)
    waiting: set[Waiting[Decision]] = field(default_factory=set)
    text: list[str] = field(default_factory=list)
    text_chars: int = 0
    cancelled: bool = False


class AcpBackend:
    """One declared backend: its agent process, its sessions, its task queue."""

    def __init__(
        self,
        spec: BackendSpec,
        *,
        settings: Settings,
        store: TranscriptStore,
        events: EventLog,
        pending: PendingBook,
        fs: FileSystem,
        processes: ProcessManager,
        saved: Callable[[str], Any],
    ) -> None:
        self.spec: BackendSpec | None = spec
        self.name = spec.name
        self.settings = settings
        self.store = store
        self.events = events
        self.pending = pending
        self.fs = fs
        self.processes = processes
        self.saved = saved  # the persisted agent settings (for the stored session id)
        self.queue = TaskQueue(self.run, settings.agent_max_queued)
        self.conn: AcpConnection | None = None
        self.started_spec: BackendSpec | None = None
        self.load_session = False
        self.session_id: str | None = None  # the conversation's session in this process
        # Sessions made or loaded in this process (the newest few; an agent without
        # session/load gets one per task).
        self.sessions: OrderedDict[str, None] = OrderedDict()
        self.turn: Turn | None = None
        self.terminals: dict[str, tuple[ManagedProcess, int]] = {}
        # Released terminals, still shown in a tool call's result (the newest few).
        self.released: OrderedDict[str, ManagedProcess] = OrderedDict()
        self.starts = 0
        self.crashes = 0
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the task queue's worker (the agent process starts with the first task)."""
        self.queue.start()

    async def stop(self) -> None:
        """Fail the running task (daemon stopped), stop the queue and the agent."""
        await self.queue.stop(self.settings.acp_cancel_grace + 2)
        await self._stop_process()

    async def _stop_process(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.stop(self.settings.process_kill_grace)
        for process, _ in list(self.terminals.values()):
            if process.alive:
                process.terminate()
        self.terminals.clear()
        self.released.clear()
        self.sessions.clear()  # `session_id` stays: the conversation to load again

    async def ensure_started(self) -> AcpConnection:
        """The live connection, starting (or restarting) the agent; AcpClosed if it cannot."""
        async with self._start_lock:
            conn = self.conn
            if conn is not None and conn.alive and self.started_spec == self.spec:
                return conn
            if conn is not None:
                if not conn.alive and not conn.abandoned:
                    self.crashes += 1
                await self._stop_process()
            spec = self.spec
            if spec is None:
                raise AcpClosed(f"backend {self.name!r} is no longer declared")
            conn = AcpConnection(
                self.name,
                self._on_request,
                self._on_notification,
                max_line=self.settings.acp_max_line_bytes,
                stderr_bytes=self.settings.acp_stderr_bytes,
                max_requests=self.settings.acp_max_requests,
                write_timeout=self.settings.acp_start_timeout,
            )
            env = self.processes.process_env(dict(spec.env))
            await conn.start(spec.argv, env, str(self.fs.jail.root))
            self.starts += 1
            try:
                raw = await conn.request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "clientCapabilities": {
                            "fs": {"readTextFile": True, "writeTextFile": True},
                            "terminal": True,
                        },
                        "clientInfo": {"name": "aetherd", "version": __version__},
                    },
                    timeout=self.settings.acp_start_timeout,
                )
                init = InitializeResult.model_validate(raw)
            except (AcpError, AcpClosed, ValidationError) as exc:
                reason = _reason(exc)
                if not conn.alive:
                    await conn.wait_exit()
                    reason = conn.describe_exit()
                await conn.stop(self.settings.process_kill_grace)
                raise AcpClosed(f"agent {self.name!r} did not initialize: {reason}") from None
            if spec.auth_method:
                try:
                    await conn.request(
                        "authenticate",
                        {"methodId": spec.auth_method},
                        timeout=self.settings.acp_start_timeout,
                    )
                except (AcpError, AcpClosed) as exc:
                    await conn.stop(self.settings.process_kill_grace)
                    raise AcpClosed(
                        f"agent {self.name!r} refused authenticate "
                        f"({spec.auth_method}): {_reason(exc)}"
                    ) from None
            self.conn = conn
            self.started_spec = spec
            self.load_session = init.agent_capabilities.load_session
            return conn

    # -- one task ----------------------------------------------------------------------
    async def run(self, job: Job) -> None:
        """Run `job` to its end and record how it ended (the task queue's `run`)."""
        status, error, code = "completed", None, None
        turn = Turn(job)
        try:
            await self.store.update_task(job.task_id, status="running", started_at=utc_now())
            self.events.emit(job.task_id, TaskStatus("running"))
            status, error = await self._prompt(turn)
            if status == "failed":
                code = ErrorCode.PROVIDER_ERROR.value
        except asyncio.CancelledError:
            status, error = ("aborted", None) if job.aborted else ("failed", "daemon stopped")
        except AcpClosed as exc:
            status, error, code = "failed", str(exc), ErrorCode.PROVIDER_ERROR.value
        except AcpError as exc:
            status, error = "failed", f"agent {self.name!r}: {exc.message}"
            code = ErrorCode.PROVIDER_ERROR.value
        except AetherError as err:
            status, error, code = "failed", err.message, err.code.value
        except Exception as exc:
            log.exception("agent task %s on backend %s failed", job.task_id, self.name)
            status, error, code = "failed", f"internal error: {exc}", ErrorCode.INTERNAL_ERROR.value
        finally:
            self._end_turn(turn)
        if job.aborted and status != "completed":
            status, error, code = "aborted", None, None
        job.finishing = True
        final = "".join(turn.text)
        if final:
            with contextlib.suppress(Exception):
                await self.store.update_task(job.task_id, final_text=final[:FINAL_TEXT_MAX])
        usage = {"input_tokens": job.input_tokens, "output_tokens": job.output_tokens}
        await self.events.finish(job.task_id, status, error, code, usage)

    async def _prompt(self, turn: Turn) -> tuple[str, str | None]:
        """The turn: (final status, error when it failed)."""
        conn = await self.ensure_started()
        turn.session_id = await self._session(conn)
        self.turn = turn
        prompt = asyncio.ensure_future(
            conn.request(
                "session/prompt",
                {
                    "sessionId": turn.session_id,
                    "prompt": [{"type": "text", "text": turn.job.prompt}],
                },
            )
        )
        try:
            raw = await asyncio.shield(prompt)
        except asyncio.CancelledError:
            await self._cancel(conn, turn, prompt)
            raise
        result = PromptResult.model_validate(raw)
        self._usage(turn.job, result.usage)
        status = STOP_REASONS.get(result.stop_reason, "failed")
        if status == "failed":
            return status, f"agent {self.name!r} stopped: {result.stop_reason}"
        return status, None

    async def _cancel(self, conn: AcpConnection, turn: Turn, prompt: asyncio.Future[Any]) -> None:
        """`session/cancel`; the process group is killed if the turn has not ended in time."""
        turn.cancelled = True
        for waiting in list(turn.waiting):
            if not waiting.future.done():
                waiting.future.set_result(Decision(False, "cancelled"))
        try:
            with contextlib.suppress(AcpClosed):
                await asyncio.wait_for(
                    conn.notify("session/cancel", {"sessionId": turn.session_id}),
                    self.settings.acp_cancel_grace,
                )
            await asyncio.wait({prompt}, timeout=self.settings.acp_cancel_grace)
        finally:
            if not prompt.done():
                log.warning(
                    "agent %r did not end the turn %.1fs after session/cancel; killing it",
                    self.name,
                    self.settings.acp_cancel_grace,
                )
                conn.abandon(f"agent {self.name!r} was killed: it ignored session/cancel")
                prompt.cancel()
            with contextlib.suppress(BaseException):
                await prompt

    def _end_turn(self, turn: Turn) -> None:
        if self.turn is turn:
            self.turn = None
        for waiting in list(turn.waiting):
            if not waiting.future.done():
                waiting.future.set_result(Decision(False, "the task ended"))
            self.pending.discard(waiting)

    async def _session(self, conn: AcpConnection) -> str:
        """The task's ACP session: the conversation's, loaded again after a restart
        when the agent can load sessions; otherwise a new one."""
        cwd = str(self.fs.jail.root)
        timeout = self.settings.acp_start_timeout
        if self.load_session:
            if self.session_id is not None and self.session_id in self.sessions:
                return self.session_id
            stored = self.session_id or self.saved(SESSION_KEY + self.name)
            if isinstance(stored, str) and stored:
                try:
                    # The agent replays the conversation as session/updates: no turn is
                    # current, so they are not recorded again.
                    await conn.request(
                        "session/load",
                        {"sessionId": stored, "cwd": cwd, "mcpServers": []},
                        timeout=timeout,
                    )
                except AcpError as err:
                    log.info("agent %r could not load session %s: %s", self.name, stored, err)
                else:
                    self.session_id = stored
                    self._add_session(stored)
                    return stored
        raw = await conn.request("session/new", {"cwd": cwd, "mcpServers": []}, timeout=timeout)
        session_id = NewSessionResult.model_validate(raw).session_id
        self._add_session(session_id)
        if self.load_session:
            self.session_id = session_id
            await self.store.save_settings({SESSION_KEY + self.name: session_id})
        return session_id

    def _add_session(self, session_id: str) -> None:
        self.sessions[session_id] = None
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > SESSIONS_KEPT:
            self.sessions.popitem(last=False)

    @staticmethod
    def _usage(job: Job, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        for key, attr in (("inputTokens", "input_tokens"), ("outputTokens", "output_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and value >= 0:
                setattr(job, attr, getattr(job, attr) + value)

    # -- session/update → events ---------------------------------------------------------
    def _on_notification(self, method: str, params: Any) -> None:
        if method != "session/update":
            return
        try:
            note = SessionNotification.model_validate(params)
        except ValidationError as exc:
            log.warning("agent %r sent an invalid session/update: %s", self.name, _first(exc))
            return
        turn = self.turn
        if turn is None or note.session_id != turn.session_id or turn.cancelled:
            return  # a replay during session/load, or a late update after the end
        kind = note.update.get("sessionUpdate")
        try:
            if kind in ("agent_message_chunk", "agent_thought_chunk"):
                self._content(turn, ContentChunk.model_validate(note.update))
            elif kind == "tool_call":
                self._tool_call(turn, ToolCallInfo.model_validate(note.update), True)
            elif kind == "tool_call_update":
                self._tool_call(turn, ToolCallInfo.model_validate(note.update), False)
            elif kind == "plan":
                plan = PlanUpdate.model_validate(note.update)
                turn.block = None
                entries = [
                    e.model_dump(include={"content", "priority", "status"}) for e in plan.entries
                ]
                self.events.emit(turn.job.task_id, Plan(entries))
        except ValidationError as exc:
            log.warning("agent %r sent an invalid %s update: %s", self.name, kind, _first(exc))

    def _content(self, turn: Turn, chunk: ContentChunk) -> None:
        text = chunk.content.text if chunk.content.type == "text" else None
        if not text:
            return
        kind = "text" if chunk.session_update == "agent_message_chunk" else "thinking"
        if turn.block is None or turn.block[0] != kind:
            turn.block = (kind, uuid.uuid4().hex)
        self.events.emit(turn.job.task_id, ContentPiece(kind, turn.block[1], text))
        if kind == "text" and turn.text_chars < FINAL_TEXT_MAX:
            turn.text.append(text)
            turn.text_chars += len(text)

    def _merge(self, turn: Turn, info: ToolCallInfo) -> ToolCallInfo:
        known = turn.tools.get(info.tool_call_id)
        if known is None:
            merged = info
        else:
            update = {k: getattr(info, k) for k in info.model_fields_set if k != "session_update"}
            merged = known.model_copy(update=update)
        if len(turn.tools) < 10_000 or info.tool_call_id in turn.tools:
            turn.tools[info.tool_call_id] = merged
        return merged

    def _tool_call(self, turn: Turn, info: ToolCallInfo, new: bool) -> None:
        turn.block = None
        merged = self._merge(turn, info)
        task_id = turn.job.task_id
        call_id = merged.tool_call_id
        if merged.status in ("completed", "failed"):
            if call_id not in turn.resulted:
                turn.resulted.add(call_id)
                if new:
                    self.events.emit(task_id, self._invocation(merged, "running"))
                is_error = merged.status == "failed"
                self.events.emit(
                    task_id,
                    ToolResult(call_id, _tool_name(merged), self._result_text(merged), is_error),
                )
            return
        if new or {"raw_input", "title"} & info.model_fields_set:
            self.events.emit(task_id, self._invocation(merged, "running"))

    @staticmethod
    def _invocation(info: ToolCallInfo, status: str) -> ToolInvocation:
        return ToolInvocation(info.tool_call_id, _tool_name(info), _tool_input(info), status)

    def _result_text(self, info: ToolCallInfo) -> str:
        parts: list[str] = []
        for item in info.content or ():
            kind = item.get("type")
            if kind == "content":
                block = item.get("content")
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    parts.append(block["text"])
            elif kind == "diff":
                parts.append(f"edited {item.get('path')}")
            elif kind == "terminal":
                terminal_id = str(item.get("terminalId"))
                live = self.terminals.get(terminal_id)
                process = live[0] if live is not None else self.released.get(terminal_id)
                if process is not None:
                    limit = self.settings.agent_tool_output_max
                    out, _ = process.stream_text("stdout", limit)
                    err, _ = process.stream_text("stderr", limit)
                    parts.append(out + err)
        text = "\n".join(parts)
        if not text and info.raw_output is not None:
            raw = info.raw_output
            text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        return text[: self.settings.agent_tool_output_max]

    # -- the agent's requests ------------------------------------------------------------
    async def _on_request(self, method: str, params: Any) -> Any:
        handler = {
            "session/request_permission": self._permission,
            "fs/read_text_file": self._read_text_file,
            "fs/write_text_file": self._write_text_file,
            "terminal/create": self._terminal_create,
            "terminal/output": self._terminal_output,
            "terminal/wait_for_exit": self._terminal_wait,
            "terminal/kill": self._terminal_kill,
            "terminal/release": self._terminal_release,
        }.get(method)
        if handler is None:
            raise AcpError(METHOD_NOT_FOUND, f"method not found: {method}")
        try:
            return await handler(params)
        except ValidationError as exc:
            raise AcpError(INVALID_PARAMS, f"invalid params: {_first(exc)}") from None
        except AetherError as err:
            code = RESOURCE_NOT_FOUND if err.code is ErrorCode.NOT_FOUND else INVALID_PARAMS
            raise AcpError(code, err.message, {"code": err.code.value}) from None

    def _check_session(self, session_id: str) -> None:
        if session_id not in self.sessions:
            raise AcpError(INVALID_PARAMS, f"unknown session {session_id[:200]!r}")

    async def _permission(self, params: Any) -> dict[str, Any]:
        req = RequestPermission.model_validate(params)
        self._check_session(req.session_id)
        cancelled = {"outcome": {"outcome": "cancelled"}}
        turn = self.turn
        if turn is None or turn.session_id != req.session_id or turn.cancelled:
            return cancelled
        info = self._merge(turn, req.tool_call)
        allow = next((o for o in req.options if o.kind.startswith("allow")), None)
        mode = turn.job.permission_mode
        reason = _approval_reason(mode, info)
        if reason is None and allow is not None:
            return {"outcome": {"outcome": "selected", "optionId": allow.option_id}}
        task_id = turn.job.task_id
        request_id = uuid.uuid4().hex
        options = [{"optionId": o.option_id, "name": o.name, "kind": o.kind} for o in req.options]
        turn.block = None
        self.events.emit(task_id, self._invocation(info, "awaiting_approval"))
        description = (info.title or _tool_name(info)) + f" ({reason or 'the agent asks'})"
        asked = self.events.emit(
            task_id,
            PermissionRequest(
                request_id,
                info.tool_call_id,
                _tool_name(info),
                _tool_input(info),
                description,
                options,
            ),
        )
        waiting = self.pending.approval(
            request_id,
            info.tool_call_id,
            asked,
            options=tuple((o.option_id, o.kind) for o in req.options),
        )
        turn.waiting.add(waiting)
        try:
            await self.events.set_status(task_id, "awaiting_input")
            decision = await self.pending.wait(waiting)
        finally:
            turn.waiting.discard(waiting)
            self.pending.discard(waiting)
        if turn.cancelled or self.turn is not turn:
            return cancelled
        await self.events.set_status(task_id, "running")
        if decision.approved:
            chosen = decision.option_id or (allow.option_id if allow else req.options[0].option_id)
            return {"outcome": {"outcome": "selected", "optionId": chosen}}
        refuse = next((o for o in req.options if o.kind.startswith("reject")), None)
        if refuse is None:
            return cancelled
        return {"outcome": {"outcome": "selected", "optionId": refuse.option_id}}

    def _wire_path(self, path: str) -> str:
        """The workspace path of the agent's absolute path; refused outside the root."""
        if not os.path.isabs(path) or "\x00" in path:
            raise AcpError(INVALID_PARAMS, f"not an absolute path: {path[:200]!r}")
        real = os.path.normpath(path)
        for root in {str(self.fs.jail.root), os.path.normpath(os.path.abspath(self.settings.root))}:
            if real == root:
                return "/"
            if real.startswith(root.rstrip("/") + "/"):
                return real[len(root.rstrip("/")) :]
        raise AcpError(INVALID_PARAMS, f"{path[:200]!r} is outside the workspace root")

    async def _read_text_file(self, params: Any) -> dict[str, Any]:
        req = ReadTextFile.model_validate(params)
        self._check_session(req.session_id)
        data = await self.fs.read_bytes(self._wire_path(req.path))
        text = data.decode("utf-8", "replace")
        if req.line is not None or req.limit is not None:
            lines = text.splitlines(keepends=True)
            start = (req.line or 1) - 1
            end = None if req.limit is None else start + req.limit
            text = "".join(lines[start:end])
        return {"content": text}

    async def _write_text_file(self, params: Any) -> dict[str, Any]:
        req = WriteTextFile.model_validate(params)
        self._check_session(req.session_id)
        await self.fs.write(self._wire_path(req.path), req.content.encode("utf-8", "replace"))
        return {}

    async def _terminal_create(self, params: Any) -> dict[str, Any]:
        req = CreateTerminal.model_validate(params)
        self._check_session(req.session_id)
        if len(self.terminals) >= self.settings.process_max:
            raise AcpError(INVALID_PARAMS, f"more than {self.settings.process_max} terminals")
        cwd = self._wire_path(req.cwd) if req.cwd else "/"
        process_id = f"acp-{self.name}-{secrets.token_hex(4)}"
        process = self.processes.spawn(
            command=None if req.args else req.command,
            argv=[req.command, *req.args] if req.args else None,
            process_id=process_id,
            cwd=cwd,
            env={e.name: e.value for e in req.env},
        )
        limit = self.settings.process_ring_bytes
        if req.output_byte_limit is not None:
            limit = min(limit, req.output_byte_limit)
        self.terminals[process_id] = (process, limit)
        return {"terminalId": process_id}

    def _terminal(self, params: Any) -> tuple[ManagedProcess, int]:
        req = TerminalRef.model_validate(params)
        self._check_session(req.session_id)
        terminal = self.terminals.get(req.terminal_id)
        if terminal is None:
            raise AcpError(RESOURCE_NOT_FOUND, f"no terminal {req.terminal_id[:200]!r}")
        return terminal

    async def _terminal_output(self, params: Any) -> dict[str, Any]:
        process, limit = self._terminal(params)
        out, cut_out = process.stream_text("stdout", limit)
        err, cut_err = process.stream_text("stderr", limit)
        output = out + err
        data = output.encode("utf-8")
        truncated = cut_out or cut_err
        if len(data) > limit:
            output = data[len(data) - limit :].decode("utf-8", "ignore")
            truncated = True
        result: dict[str, Any] = {"output": output, "truncated": truncated}
        exit_ = process.state.exit
        if exit_ is not None:
            result["exitStatus"] = {
                "exitCode": exit_.exit_code,
                "signal": _signal_name(exit_.signal),
            }
        return result

    async def _terminal_wait(self, params: Any) -> dict[str, Any]:
        process, _ = self._terminal(params)
        exit_ = await process.wait()
        return {"exitCode": exit_.exit_code, "signal": _signal_name(exit_.signal)}

    async def _terminal_kill(self, params: Any) -> dict[str, Any]:
        process, _ = self._terminal(params)
        if process.alive:
            process._signal_group(signal.SIGKILL)
        return {}

    async def _terminal_release(self, params: Any) -> dict[str, Any]:
        process, _ = self._terminal(params)
        if process.alive:
            process._signal_group(signal.SIGKILL)
        self.terminals.pop(process.id, None)
        self.released[process.id] = process
        while len(self.released) > RELEASED_KEPT:
            self.released.popitem(last=False)
        return {}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AcpError):
        return exc.message
    if isinstance(exc, ValidationError):
        return f"invalid initialize reply: {_first(exc)}"
    return str(exc)


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


def _tool_name(info: ToolCallInfo) -> str:
    return (info.title or info.kind or "tool")[:200]


def _tool_input(info: ToolCallInfo) -> dict[str, Any]:
    raw = info.raw_input
    if raw is None:
        return {}
    return raw if isinstance(raw, dict) else {"value": raw}


def _command_of(info: ToolCallInfo) -> str | None:
    raw = info.raw_input
    if isinstance(raw, dict):
        for key in ("command", "cmd", "script"):
            value = raw.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return shlex.join(value)
        path = raw.get("path") or raw.get("file_path")
        if info.kind == "delete" and isinstance(path, str) and raw.get("recursive"):
            return shlex.join(["rm", "-r", path])
    if info.kind == "execute" and info.title:
        return info.title.strip("`")
    return None


def _approval_reason(mode: str, info: ToolCallInfo) -> str | None:
    """Why this permission request goes to a person in `mode`; None: allow it at once."""
    if mode == "full":
        return None
    if mode == "ask":
        return "ask mode"
    if info.kind not in ("delete", "execute"):
        return None
    command = _command_of(info)
    return destructive_command(command) if command else None
