"""The workspace watcher: inotify through watchdog, one watch per non-ignored directory.

watchdog's recursive inotify watch places a watch on every subdirectory, ignored ones
included (a large `node_modules` alone can exhaust the kernel's limit). So this module
uses watchdog's inotify layer (`InotifyFD`: the fd, its reader thread, the watch
bookkeeping) but places the watches itself: a non-recursive watch on each directory
that is not ignored, found by a walk that never descends into ignored directories, plus
a watch for every directory created (or moved in) later.

Raw inotify events are translated in the reader thread (rename pairing, new directory
walks), passed through a bounded queue to the event loop, debounced per path and
coalesced there, then handed to subscribers as plain dicts:

    {"type": "change", "action": "create"|"modify"|"delete"|"rename",
     "path": "/a", "isDirectory": False, "oldPath": "/b"}        # oldPath on rename only
    {"type": "resync", "reason": "watch_limit"|"overflow"}
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)
from watchdog.observers.inotify_c import InotifyConstants as IC

from aetherd.metrics import Sample
from aetherd.services.fs import TEMP_PREFIX, TEMP_UPD, is_temp_name, path_fields


class Change(str, Enum):
    """What happened to a path (watchfiles' `Change`, with renames kept as one event)."""

    CREATE = "create"
    MODIFY = "modify"
    DELETE = "delete"
    RENAME = "rename"


log = logging.getLogger("aetherd.watcher")

DEFAULT_IGNORED = ("node_modules", ".git", ".next", "dist", "build", "__pycache__")
WATCH_MASK = Mask(
    IC.IN_CREATE
    | IC.IN_DELETE
    | IC.IN_MODIFY
    | IC.IN_ATTRIB
    | IC.IN_MOVED_FROM
    | IC.IN_MOVED_TO
    | IC.IN_ONLYDIR
    | IC.IN_DONT_FOLLOW
    | IC.IN_EXCL_UNLINK
)
# Our key among the shared inotify fd's callbacks; watchdog's own emitters use
# `id(emitter)`, which is never negative.
CALLBACK_ID = CallbackId(-1)
Listener = Callable[[dict[str, Any]], None]


def kernel_watch_limit() -> int | None:
    """`/proc/sys/fs/inotify/max_user_watches`, or None when unreadable."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches", encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def count_fd_watches(fd: int) -> int:
    """Watches the kernel holds on inotify `fd` (`inotify wd:` lines of its fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as handle:
            return sum(1 for line in handle if line.startswith("inotify wd:"))
    except OSError:
        return 0


class IgnoreRules:
    """Which paths the watcher skips: built-in directory names plus glob patterns.

    A pattern without `/` matches any single name (`*.log`, `.venv`); a pattern with
    `/` matches the root-relative path (`src/generated`, `docs/*.tmp`). A leading
    `**/` and a trailing `/**` are accepted and mean the same. Everything below an
    ignored directory is ignored too, since it is never walked.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.names = frozenset(DEFAULT_IGNORED)
        self.name_globs: list[str] = []
        self.path_globs: list[str] = []
        self.extra = tuple(extra)
        for raw in self.extra:
            pattern = raw.strip()
            while pattern.startswith("**/"):
                pattern = pattern[3:]
            while pattern.endswith("/**"):
                pattern = pattern[:-3]
            pattern = pattern.strip("/")
            if not pattern:
                continue
            (self.path_globs if "/" in pattern else self.name_globs).append(pattern)

    def ignored(self, rel: str, name: str) -> bool:
        """True when root-relative `rel` (no leading slash), named `name`, is ignored."""
        if name in self.names or is_temp_name(name):
            return True
        if any(fnmatch.fnmatchcase(name, glob) for glob in self.name_globs):
            return True
        return any(fnmatch.fnmatchcase(rel, glob) for glob in self.path_globs)


class _Reader(InotifyFD):
    """watchdog's InotifyFD with a close-on-exec fd and an end-of-batch hook."""

    def __init__(self, on_batch: Callable[[], None]) -> None:
        super().__init__()
        flags = fcntl.fcntl(self._inotify_fd, fcntl.F_GETFD)
        fcntl.fcntl(self._inotify_fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        self._on_batch = on_batch
        self.name = "aetherd-inotify"

    @property
    def fd(self) -> int:
        return self._inotify_fd

    def run(self) -> None:
        while self.should_keep_running():
            try:
                events = self.read_events()
                for event in events:
                    self.handle_event(event)
                self._on_batch()
            except Exception:  # never let the reader die silently
                log.exception("inotify reader failed on a batch")
                if not self.should_keep_running():
                    return
                time.sleep(0.01)


@dataclass
class _Pending:
    action: Change
    path: str
    is_dir: bool
    deadline: float
    old_path: str | None = None


@dataclass
class _MoveFrom:
    path: str
    is_dir: bool
    ignored: bool
    replaced: bool  # the source is our own temp file of an overwrite
    at: float = 0.0  # when it was seen (monotonic)


@dataclass
class WatcherStats:
    """For /metrics."""

    watches: int
    max_watches: int
    kernel_limit: int | None
    pending_events: int
    resyncs: dict[str, int] = field(default_factory=dict)


class Watcher:
    """Watches the workspace and hands debounced change events to subscribers."""

    def __init__(
        self,
        root: Path | str,
        *,
        debounce: float = 0.1,
        max_watches: int = 65_536,
        queue_size: int = 65_536,
        max_events_per_second: int = 2000,
        move_grace: float = 0.05,
        extra_ignores: Iterable[str] = (),
    ) -> None:
        self.root = os.path.realpath(root)
        self.debounce = debounce
        self.max_watches = max_watches
        self.queue_size = queue_size
        self.max_events_per_second = max_events_per_second
        self.move_grace = move_grace
        self._move_timer: asyncio.TimerHandle | None = None
        self._window_start = 0.0
        self._window_count = 0
        self._base_ignores = tuple(extra_ignores)  # from settings; kept across config changes
        self.rules = IgnoreRules(self._base_ignores)
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._wd_path: dict[WatchDescriptor, str] = {}
        self._path_wd: dict[str, WatchDescriptor] = {}
        self._moves: dict[int, _MoveFrom] = {}
        self._raw: deque[tuple[Change, str, bool, str | None]] = deque()
        self._raw_overflow = False
        self._limit_hit = False
        self._resync_reasons: deque[str] = deque(maxlen=8)
        self._wake_scheduled = False
        self._reader: _Reader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.resync_counts: dict[str, int] = {"watch_limit": 0, "overflow": 0}
        self._stopped = False
        self.error: str | None = None  # why the watcher could not start, if it could not
        self.kernel_overflows = 0  # IN_Q_OVERFLOW seen
        self.raw_events = 0

    # -- public API -----------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` on the event loop for every change/resync; returns unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def start(self) -> None:
        """Open the inotify fd, start its reader thread, place the watches (in a thread)."""
        self._loop = asyncio.get_running_loop()
        try:
            self._reader = _Reader(self._end_batch)
        except OSError as exc:
            # No inotify instance left (EMFILE) or none at all: serve files unwatched.
            self.error = f"cannot start inotify: {exc.strerror or exc}"
            log.error("watcher disabled: %s", self.error)
            return
        self._reader.start()
        await asyncio.to_thread(self._sync_watches)

    async def stop(self) -> None:
        """Remove every watch, stop the reader thread, drop pending events."""
        self._stopped = True
        for timer in (self._timer, self._move_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._move_timer = None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()  # closes the fd and removes the kernel's watches
            await asyncio.to_thread(reader.join, 5.0)
        with self._lock:
            self._wd_path.clear()
            self._path_wd.clear()
            self._raw.clear()
        self._pending.clear()

    async def set_extra_ignores(self, patterns: Iterable[str]) -> None:
        """Set the workspace config's ignore patterns and re-place the watches.

        They replace the previous config patterns and add to the built-in names and the
        `watcher_ignore` setting. Runs the walk in a thread; returns when it is done.
        """
        rules = IgnoreRules((*self._base_ignores, *patterns))
        with self._lock:
            self.rules = rules
        if self._reader is not None:
            await asyncio.to_thread(self._sync_watches)

    @property
    def watch_count(self) -> int:
        """Watches this watcher holds (its own bookkeeping)."""
        with self._lock:
            return len(self._wd_path)

    def kernel_watch_count(self) -> int:
        """Watches the kernel reports on our inotify fd (from /proc/self/fdinfo)."""
        reader = self._reader
        return count_fd_watches(reader.fd) if reader is not None else 0

    def metrics(self) -> Iterator[Sample]:
        """Watches against the limits, and events, read at scrape time."""
        stats = self.stats()
        yield Sample("aetherd_watches", "inotify watches held by the watcher", stats.watches)
        yield Sample("aetherd_watches_max", "The watcher's own cap on watches", stats.max_watches)
        if stats.kernel_limit is not None:
            yield Sample(
                "aetherd_inotify_max_user_watches",
                "The kernel's per-user watch limit",
                stats.kernel_limit,
            )
        yield Sample(
            "aetherd_watcher_pending_events", "Raw events not yet debounced", stats.pending_events
        )
        yield Sample(
            "aetherd_watcher_raw_events",
            "Raw inotify events received",
            self.raw_events,
            kind="counter",
        )
        for reason, count in stats.resyncs.items():
            yield Sample(
                "aetherd_watcher_resyncs",
                "resync pushes by reason",
                count,
                {"reason": reason},
                "counter",
            )

    def stats(self) -> WatcherStats:
        """Watches in use, our cap, the kernel's per-user limit, queued events, resyncs."""
        with self._lock:
            raw = len(self._raw)
        return WatcherStats(
            watches=self.watch_count,
            max_watches=self.max_watches,
            kernel_limit=kernel_watch_limit(),
            pending_events=raw + len(self._pending),
            resyncs=dict(self.resync_counts),
        )

    def watched_dirs(self) -> list[str]:
        """Wire paths of the watched directories (sorted; for tests and diagnostics)."""
        with self._lock:
            return sorted(self._wire(p) for p in self._path_wd)

    # -- paths --------------------------------------------------------------------------
    def _rel(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")

    def _wire(self, path: str) -> str:
        return "/" + self._rel(path)

    def _is_ignored(self, path: str) -> bool:
        rel = self._rel(path)
        return self.rules.ignored(rel, rel.rsplit("/", 1)[-1])

    # -- watches (any thread; under self._lock) ---------------------------------------------
    def _add_watch(self, path: str) -> bool:
        """Watch one directory. False when the limit is reached (and flagged)."""
        if path in self._path_wd:
            return True
        reader = self._reader
        if reader is None:
            return False
        if len(self._wd_path) >= self.max_watches:
            self._flag_limit()
            return False
        try:
            wd = reader.add_callback(os.fsencode(path), WATCH_MASK, self, CALLBACK_ID)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._flag_limit()
                return False
            # Gone, not a directory, or no permission: nothing to watch there.
            return True
        if wd < 0:  # watchdog ignores EACCES and returns -1
            return True
        old = self._wd_path.get(wd)
        if old is not None and old != path:
            self._path_wd.pop(old, None)
        self._wd_path[wd] = path
        self._path_wd[path] = wd
        return True

    def _walk_add(self, top: str, found: list[tuple[str, bool]] | None) -> None:
        """Watch `top` and every non-ignored directory below it; list entries in `found`."""
        stack = [top]
        while stack:
            directory = stack.pop()
            if not self._add_watch(directory):
                return
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                path = entry.path
                if self._is_ignored(path):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if found is not None:
                    found.append((path, is_dir))
                if is_dir:
                    stack.append(path)

    def _remove_under(self, top: str) -> None:
        """Drop the watches of `top` and below (moved out of the tree or now ignored)."""
        prefix = top + "/"
        doomed = [(p, wd) for p, wd in self._path_wd.items() if p == top or p.startswith(prefix)]
        for path, wd in doomed:
            self._path_wd.pop(path, None)
            self._wd_path.pop(wd, None)
        reader = self._reader
        if reader is not None and doomed:
            with contextlib.suppress(OSError):
                reader.remove_callbacks([(wd, CALLBACK_ID) for _, wd in doomed])
            self._limit_hit = False

    def _rekey_under(self, old: str, new: str) -> None:
        """A watched directory moved inside the tree: same watches, new paths."""
        prefix = old + "/"
        moved = [(p, wd) for p, wd in self._path_wd.items() if p == old or p.startswith(prefix)]
        for path, _wd in moved:
            self._path_wd.pop(path, None)
        for path, wd in moved:
            target = new + path[len(old) :]
            self._path_wd[target] = wd
            self._wd_path[wd] = target

    def _flag_limit(self) -> None:
        if not self._limit_hit:
            self._limit_hit = True
            log.warning("inotify watch limit reached; some directories are not watched")
            self._queue_resync("watch_limit")

    def _sync_watches(self) -> None:
        """Make the watches match the tree and the rules (start, new rules, overflow)."""
        with self._lock:
            self._limit_hit = False
            desired: list[str] = []
            stack = [self.root]
            while stack and len(desired) <= self.max_watches:
                directory = stack.pop()
                desired.append(directory)
                try:
                    with os.scandir(directory) as entries:
                        for entry in entries:
                            if self._is_ignored(entry.path):
                                continue
                            with contextlib.suppress(OSError):
                                if entry.is_dir(follow_symlinks=False):
                                    stack.append(entry.path)
                except OSError:
                    continue
            wanted = set(desired)
            for path in [p for p in self._path_wd if p not in wanted]:
                self._remove_under(path)
            for path in desired:
                if not self._add_watch(path):
                    break

    # -- reader thread: translate raw events ---------------------------------------------
    def on_event(self, event: InotifyEvent) -> None:
        """watchdog callback (reader thread): one raw inotify event."""
        if not event.name:
            return  # events on a watched directory itself arrive through its parent
        with self._lock:
            directory = self._wd_path.get(event.wd)
            if directory is None:
                return
            name = os.fsdecode(event.name)
            path = directory + "/" + name
            is_dir = event.is_directory
            ignored = self._is_ignored(path)
            if event.is_moved_from:
                self._moves[event.cookie] = _MoveFrom(
                    path,
                    is_dir,
                    ignored,
                    name.startswith(TEMP_PREFIX) and name.endswith(TEMP_UPD),
                    time.monotonic(),
                )
            elif event.is_moved_to:
                self._moved_to(path, is_dir, ignored, self._moves.pop(event.cookie, None))
            elif ignored:
                return
            elif event.is_create:
                if is_dir:
                    found: list[tuple[str, bool]] = []
                    self._emit(Change.CREATE, path, True)
                    self._walk_add(path, found)
                    for child, child_is_dir in found:
                        self._emit(Change.CREATE, child, child_is_dir)
                else:
                    self._emit(Change.CREATE, path, False)
            elif event.is_delete:
                self._emit(Change.DELETE, path, is_dir)
            elif (event.is_modify or event.is_attrib) and not is_dir:
                self._emit(Change.MODIFY, path, False)

    def _moved_to(self, path: str, is_dir: bool, ignored: bool, src: _MoveFrom | None) -> None:
        if ignored:
            if src is not None and not src.ignored:
                self._emit(Change.DELETE, src.path, src.is_dir)
                if src.is_dir:
                    self._remove_under(src.path)
            return
        if src is not None and not src.ignored:
            if src.is_dir:
                self._rekey_under(src.path, path)
            self._emit(Change.RENAME, path, is_dir, src.path)
            return
        # Moved in from outside the tree, from an ignored name, or our own temp file.
        action = Change.MODIFY if src is not None and src.replaced and not is_dir else Change.CREATE
        self._emit(action, path, is_dir)
        if is_dir:
            found: list[tuple[str, bool]] = []
            self._walk_add(path, found)
            for child, child_is_dir in found:
                self._emit(Change.CREATE, child, child_is_dir)

    def _end_batch(self) -> None:
        """After each read: expire old unpaired move sources, or look again soon.

        The kernel queues a rename's MOVED_FROM and MOVED_TO one after the other, and
        the reader can wake between them, so a source waits `move_grace` for its
        destination before it counts as moved out of the tree.
        """
        if self._expire_moves() and self._loop is not None and not self._stopped:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._arm_move_timer)

    def _expire_moves(self) -> bool:
        """Report move sources older than the grace as deletes; True if some remain."""
        with self._lock:
            now = time.monotonic()
            for cookie, src in list(self._moves.items()):
                if now - src.at < self.move_grace:
                    continue
                del self._moves[cookie]
                if src.is_dir:
                    self._remove_under(src.path)
                if not src.ignored:
                    self._emit(Change.DELETE, src.path, src.is_dir)
            return bool(self._moves)

    def _arm_move_timer(self) -> None:
        loop = self._loop
        if loop is None or self._stopped or self._move_timer is not None:
            return

        def fire() -> None:
            self._move_timer = None
            if self._expire_moves():
                self._arm_move_timer()

        self._move_timer = loop.call_later(self.move_grace, fire)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        """watchdog callback: the kernel dropped a watch (its directory is gone)."""
        with self._lock:
            path = self._wd_path.pop(wd, None)
            if path is not None and self._path_wd.get(path) == wd:
                del self._path_wd[path]
            if len(self._wd_path) < self.max_watches:
                self._limit_hit = False  # the next failure is a new episode

    def on_queue_overflow(self) -> None:
        """watchdog callback: the kernel's queue overflowed; events were lost."""
        self.kernel_overflows += 1
        self._queue_resync("overflow")
        self._sync_watches()

    # -- reader thread → event loop -------------------------------------------------------
    def _emit(self, action: Change, path: str, is_dir: bool, old: str | None = None) -> None:
        self.raw_events += 1
        if len(self._raw) >= self.queue_size:
            if not self._raw_overflow:
                self._raw_overflow = True
                self._raw.clear()
                self._queue_resync("overflow")
            return
        self._raw.append((action, path, is_dir, old))
        self._schedule_drain()

    def _queue_resync(self, reason: str) -> None:
        with self._lock:
            self._resync_reasons.append(reason)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        loop = self._loop
        if loop is None or self._wake_scheduled or self._stopped:
            return
        self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._drain)

    # -- event loop: debounce and coalesce ------------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            raw = list(self._raw)
            self._raw.clear()
            self._raw_overflow = False
            reasons = list(self._resync_reasons)
            self._resync_reasons.clear()
        for reason in reasons:
            self.resync_counts[reason] = self.resync_counts.get(reason, 0) + 1
            self._deliver({"type": "resync", "reason": reason})
        if self._stopped:
            return
        deadline = time.monotonic() + self.debounce
        for action, path, is_dir, old in raw:
            self._merge(
                action, self._wire(path), is_dir, self._wire(old) if old else None, deadline
            )
        self._arm_timer()

    def _merge(
        self, action: Change, path: str, is_dir: bool, old: str | None, deadline: float
    ) -> None:
        pending = self._pending
        if action is Change.RENAME and old is not None:
            before = pending.pop(old, None)
            if before is not None and before.action is Change.CREATE:
                action, old = Change.CREATE, None  # created and renamed in one window
            elif before is not None and before.action is Change.RENAME and before.old_path:
                old = before.old_path  # a → b → c reads as a → c
                if old == path:
                    return  # moved back where it was
            pending.pop(path, None)
            pending[path] = _Pending(action, path, is_dir, deadline, old)
            return
        prev = pending.get(path)
        if prev is None:
            pending[path] = _Pending(action, path, is_dir, deadline, old)
            return
        merged: Change | None
        if prev.action is Change.CREATE:
            merged = None if action is Change.DELETE else Change.CREATE
        elif prev.action is Change.DELETE:
            merged = Change.CREATE if is_dir else Change.MODIFY  # replaced within the window
        elif prev.action is Change.RENAME:
            if action is Change.DELETE:
                # Renamed, then deleted: for the client the old name is what vanished.
                del pending[path]
                pending[prev.old_path or path] = _Pending(
                    Change.DELETE, prev.old_path or path, prev.is_dir, prev.deadline
                )
                return
            merged = Change.RENAME
        else:  # modify
            merged = action if action is Change.DELETE else Change.MODIFY
        if merged is None:
            del pending[path]
        else:
            prev.action = merged
            prev.is_dir = is_dir

    def _arm_timer(self) -> None:
        loop = self._loop
        if loop is None or not self._pending or self._stopped:
            return
        earliest = min(p.deadline for p in self._pending.values())
        if self._timer is not None and self._timer_at <= earliest:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, earliest - time.monotonic())
        self._timer_at = earliest
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        due = [p for p in self._pending.values() if p.deadline <= now]
        if self._window_count + len(due) > self.max_events_per_second:
            # A burst (a checkout, an install) would flood every client's send queue:
            # drop the events and tell clients to re-list instead, once per window.
            for item in due:
                del self._pending[item.path]
            if self._window_count <= self.max_events_per_second:
                self._window_count = self.max_events_per_second + 1
                self.resync_counts["overflow"] = self.resync_counts.get("overflow", 0) + 1
                self._deliver({"type": "resync", "reason": "overflow"})
            self._arm_timer()
            return
        self._window_count += len(due)
        for item in due:
            del self._pending[item.path]
            event: dict[str, Any] = {
                "type": "change",
                "action": item.action.value,
                **path_fields("path", item.path),
                "isDirectory": item.is_dir,
            }
            if item.action is Change.RENAME and item.old_path is not None:
                event.update(path_fields("oldPath", item.old_path))
            self._deliver(event)
        self._arm_timer()

    def _deliver(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("watcher listener failed")
