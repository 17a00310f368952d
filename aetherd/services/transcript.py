"""The agent transcript: tasks and their events in SQLite (stdlib `sqlite3`, WAL).

Every database call runs on ONE dedicated thread (a single-worker executor) that owns
the only connection, so the event loop never blocks on SQLite and no locking is
needed around the connection.

Events get their `seq` on the event loop, synchronously, from a counter loaded at
start (`MAX(seq)`), so a live event can be delivered before it is on disk. The row is
queued at once and the writer thread commits whatever is queued, at most
`commit_batch` rows per transaction, as soon as it is free. Every read is submitted
to the same thread *after* the writes queued before it, and drains the queue first,
so a reader always sees every event whose seq was handed out before the read was
asked for. That is what makes replay-on-connect gap-free (see `AgentRunner`).

Durability: a `kill -9` loses only rows still in the queue (not yet handed to
SQLite): at most the events of the last few milliseconds. WAL with
`synchronous=NORMAL` never corrupts the file on a process crash; only a power loss
could drop the last committed transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from aetherd.errors import AetherError, ErrorCode
from aetherd.metrics import Sample

T = TypeVar("T")
log = logging.getLogger("aetherd.transcript")

SCHEMA_VERSION = 2

# Migrations: MIGRATIONS[n] brings the schema from version n to n + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        prompt TEXT NOT NULL,
        provider TEXT,
        model TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        task_id TEXT,
        type TEXT NOT NULL,
        created_at TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX events_task ON events(task_id, seq);
    CREATE TABLE agent_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: what a finished task answered last, carried into later tasks as context.
    """
    ALTER TABLE tasks ADD COLUMN final_text TEXT;
    """,
]

MERGED_TYPES = ("text", "thinking")
MAX_SEQ = (1 << 63) - 1  # SQLite's INTEGER range: a larger bound would not bind
EVENT_OVERHEAD = 100  # bytes an event adds to a frame beyond its payload (type, seq, ids)
ACTIVE_STATUSES = ("queued", "running", "awaiting_input")


def has_active_tasks(path: Path) -> bool:
    """Whether the database at `path` holds tasks with an active status (blocking).

    The daemon's boot check (a crash left them running: the agent's start fails them).
    One read-only query; a database this cannot read answers True, so that the agent's
    own start opens, migrates or reports it.
    """
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return True
    try:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        row = conn.execute(
            f"SELECT 1 FROM tasks WHERE status IN ({marks}) LIMIT 1", ACTIVE_STATUSES
        ).fetchone()
        return row is not None
    except sqlite3.Error:
        return True
    finally:
        conn.close()


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("committing transcript events failed: %s", exc)


def require_text(name: str, value: str | None) -> None:
    """INVALID_MESSAGE naming `name` when `value` cannot be stored (a lone surrogate)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AetherError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid field '{name}': text that cannot be encoded as UTF-8",
            field=name,
        ) from None


def _storable(value: Any) -> Any:
    """A text column's value with lone surrogates replaced by `?` (as `encode` does on the wire)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds and a `Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def merge_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive-in-message `text`/`thinking` pieces per `messageId`.

    The merged event sits where the message's first piece was, carries the whole
    content and the `seq` of its LAST piece (so `seq` still orders and dedupes).
    """
    out: list[dict[str, Any]] = []
    open_pieces: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        kind = event.get("type")
        if kind in MERGED_TYPES and isinstance(event.get("messageId"), str):
            key = (kind, event["messageId"])
            merged = open_pieces.get(key)
            if merged is None:
                merged = dict(event)
                merged["_parts"] = [event.get("content", "")]
                open_pieces[key] = merged
                out.append(merged)
            else:
                merged["_parts"].append(event.get("content", ""))
                merged["seq"] = event["seq"]
            continue
        out.append(event)
    for merged in open_pieces.values():
        merged["content"] = "".join(merged.pop("_parts"))
    return out


class TranscriptStore:
    """Append-only event log and task table of the agent, in `<data_dir>/agent.sqlite3`."""

    def __init__(self, path: Path, *, commit_batch: int = 512) -> None:
        self.path = Path(path)
        self.commit_batch = commit_batch
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._pending: deque[tuple[int, str | None, str, str, str]] = deque()
        self._flush_scheduled = False
        self._flush_lock = threading.Lock()
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def metrics(self) -> Iterator[Sample]:
        """Transcript size on disk (database plus WAL) and the latest seq."""
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.stat(f"{self.path}{suffix}").st_size
        yield Sample("aetherd_transcript_bytes", "Transcript database size, WAL included", size)
        yield Sample("aetherd_transcript_latest_seq", "Latest transcript event seq", self._seq)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Open (creating and migrating) the database on the writer thread."""
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transcript")
        try:
            self._seq = await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def stop(self) -> None:
        """Commit what is queued and close the connection."""
        if self._executor is None:
            return
        try:
            await self._call(self._close)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise AetherError(
                ErrorCode.INTERNAL_ERROR, f"transcript database {self.path} unusable: {exc}"
            ) from None
        self._conn = conn
        row = conn.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this daemon ({len(MIGRATIONS)})"
            )
        for target in range(version, len(MIGRATIONS)):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (?)", (target + 1,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _close(self) -> None:
        self._drain()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise AetherError(ErrorCode.INTERNAL_ERROR, "the transcript store is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    # -- writes -----------------------------------------------------------------------
    @property
    def latest_seq(self) -> int:
        """The highest seq handed out so far."""
        return self._seq

    def append(self, task_id: str | None, type_: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Give the event the next seq and a timestamp, queue it for commit, return it.

        Synchronous and cheap: call it on the event loop. The event dict returned is
        `{taskId, seq, createdAt, type, **fields}`.

        A payload holding a lone surrogate (a file name that is not UTF-8, a provider's
        `\\ud800` escape) is stored with JSON escapes, which SQLite accepts and
        `json.loads` reads back as the same text; a task id that cannot be encoded is
        refused (INVALID_MESSAGE) before a seq is handed out.
        """
        require_text("taskId", task_id)
        require_text("type", type_)
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError:
            payload = json.dumps(fields, ensure_ascii=True, separators=(",", ":"), default=str)
        self._seq += 1
        created = utc_now()
        event = {"type": type_, "taskId": task_id, "seq": self._seq, "createdAt": created}
        event.update(fields)
        self._pending.append((self._seq, task_id, type_, created, payload))
        self._schedule_flush()
        return event

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._executor is None:
            return
        self._flush_scheduled = True
        future = self._executor.submit(self._flush_job)
        future.add_done_callback(_log_failure)

    def _flush_job(self) -> None:
        # Clear the flag first: rows appended after this point schedule a new job.
        self._flush_scheduled = False
        self._drain()

    def _drain(self) -> None:
        """Commit every queued row (writer thread only)."""
        conn = self._conn
        if conn is None:
            return
        with self._flush_lock:
            while self._pending:
                batch: list[tuple[int, str | None, str, str, str]] = []
                while self._pending and len(batch) < self.commit_batch:
                    batch.append(self._pending.popleft())
                conn.execute("BEGIN")
                try:
                    conn.executemany(
                        "INSERT INTO events(seq, task_id, type, created_at, payload) "
                        "VALUES (?, ?, ?, ?, ?)",
                        batch,
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise

    async def flush(self) -> None:
        """Wait until every event appended so far is committed."""
        await self._call(self._drain)

    # -- tasks --------------------------------------------------------------------------
    async def create_task(
        self, task_id: str, prompt: str, provider: str | None, model: str | None, status: str
    ) -> None:
        """Insert a task; CONFLICT if its id is taken, INVALID_MESSAGE for text that
        cannot be encoded (`taskId`, `prompt`, `provider`, `model`)."""
        for name, value in (
            ("taskId", task_id),
            ("prompt", prompt),
            ("provider", provider),
            ("model", model),
            ("status", status),
        ):
            require_text(name, value)

        def run() -> None:
            assert self._conn is not None
            self._drain()
            try:
                self._conn.execute(
                    "INSERT INTO tasks(task_id, status, prompt, provider, model, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (task_id, status, prompt, provider, model, utc_now()),
                )
            except sqlite3.IntegrityError:
                raise AetherError(
                    ErrorCode.CONFLICT, f"task {task_id!r} already exists", taskId=task_id
                ) from None

        await self._call(run)

    async def update_task(self, task_id: str, **fields: Any) -> None:
        """Set columns of a task (status, started_at, finished_at, tokens, error, ...)."""
        allowed = {
            "status",
            "provider",
            "model",
            "started_at",
            "finished_at",
            "input_tokens",
            "output_tokens",
            "error",
            "final_text",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown task columns {sorted(unknown)}")
        require_text("taskId", task_id)
        # Text from a model or a tool (final answer, error) is stored, surrogates replaced.
        fields = {name: _storable(value) for name, value in fields.items()}

        def run() -> None:
            assert self._conn is not None
            self._drain()
            cols = ", ".join(f"{name} = ?" for name in fields)
            self._conn.execute(
                f"UPDATE tasks SET {cols} WHERE task_id = ?", (*fields.values(), task_id)
            )

        await self._call(run)

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """One task's row as a dict, or None; INVALID_MESSAGE for an unencodable id."""
        require_text("taskId", task_id)

        def run() -> dict[str, Any] | None:
            assert self._conn is not None
            cur = self._conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([d[0] for d in cur.description], row, strict=True))

        return await self._call(run)

    async def recent_tasks(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` finished tasks, oldest first: task_id, prompt, status, final_text, error."""

        def run() -> list[dict[str, Any]]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT task_id, prompt, status, final_text, error FROM tasks "
                "WHERE finished_at IS NOT NULL ORDER BY finished_at DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
            keys = ("task_id", "prompt", "status", "final_text", "error")
            return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

        return await self._call(run) if limit > 0 else []

    async def tasks_with_status(self, statuses: tuple[str, ...]) -> list[str]:
        """Ids of tasks whose status is one of `statuses`, oldest first."""

        def run() -> list[str]:
            assert self._conn is not None
            marks = ",".join("?" * len(statuses))
            rows = self._conn.execute(
                f"SELECT task_id FROM tasks WHERE status IN ({marks}) ORDER BY created_at",
                statuses,
            ).fetchall()
            return [r[0] for r in rows]

        return await self._call(run)

    # -- reads ----------------------------------------------------------------------------
    async def history(
        self,
        *,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int,
        max_bytes: int,
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """A page of events (bounded by `limit` and `max_bytes` of payload), oldest first,
        merged; plus the latest seq covered and whether more events lie beyond the page.

        Backwards (the default): the newest events before `before_seq`; `hasMore` means
        older events exist. Forwards (`after_seq` given): the oldest events after
        `after_seq`; `hasMore` means newer ones exist, and an empty page covers up to
        `after_seq` itself. Both at once is the caller's error (ValueError).
        """
        if before_seq is not None and after_seq is not None:
            raise ValueError("before_seq and after_seq exclude each other")
        forward = after_seq is not None

        def run() -> tuple[list[dict[str, Any]], int, bool]:
            assert self._conn is not None
            self._drain()
            if after_seq is not None:
                bound = max(0, min(after_seq, MAX_SEQ))
                query = "WHERE seq > ? ORDER BY seq ASC LIMIT ?"
            else:
                bound = MAX_SEQ if before_seq is None else max(0, min(before_seq, MAX_SEQ))
                query = "WHERE seq < ? ORDER BY seq DESC LIMIT ?"
            rows = self._conn.execute(
                "SELECT seq, task_id, type, created_at, payload FROM events " + query,
                (bound, limit + 1),
            ).fetchall()
            has_more = len(rows) > limit
            rows = rows[:limit]
            size = 0
            kept = 0
            for _seq, _task, _type, _created, payload in rows:
                cost = len(payload) + EVENT_OVERHEAD
                if kept and size + cost > max_bytes:
                    has_more = True
                    break
                size += cost
                kept += 1
            rows = rows[:kept]
            if forward:
                latest = int(rows[-1][0]) if rows else bound
            else:
                latest = int(rows[0][0]) if rows else 0
                rows.reverse()
            events = []
            loads = json.loads
            for seq, task_id, type_, created, payload in rows:
                event = {"type": type_, "taskId": task_id, "seq": seq, "createdAt": created}
                event.update(loads(payload))
                events.append(event)
            return merge_events(events), latest, has_more

        return await self._call(run)

    # -- settings -------------------------------------------------------------------------
    async def load_settings(self) -> dict[str, Any]:
        """The persisted agent defaults."""

        def run() -> dict[str, Any]:
            assert self._conn is not None
            rows = self._conn.execute("SELECT key, value FROM agent_settings").fetchall()
            return {key: json.loads(value) for key, value in rows}

        return await self._call(run)

    async def save_settings(self, values: dict[str, Any]) -> None:
        """Persist agent defaults (a None value deletes the key)."""
        for key, value in values.items():
            require_text(key, key)
            require_text(key, value if isinstance(value, str) else None)

        def run() -> None:
            assert self._conn is not None
            conn = self._conn
            conn.execute("BEGIN")
            try:
                for key, value in values.items():
                    if value is None:
                        conn.execute("DELETE FROM agent_settings WHERE key = ?", (key,))
                    else:
                        conn.execute(
                            "INSERT OR REPLACE INTO agent_settings(key, value) VALUES (?, ?)",
                            (key, json.dumps(value)),
                        )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._call(run)

    async def integrity_check(self) -> str:
        """`PRAGMA integrity_check`'s verdict ("ok" when sound)."""

        def run() -> str:
            assert self._conn is not None
            return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

        return await self._call(run)
