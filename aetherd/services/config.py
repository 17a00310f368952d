"""The live workspace config store: load, validate, atomic write, disk watching, subscribers.

The model and its (pure) parser are in `aetherd.config_model`; their names are
re-exported here for existing callers.

`ConfigStore` owns `.aether/config.yaml` (a setting). It keeps `current`, the last
good validated `WorkspaceConfig`, and tells two kinds of listeners about changes:

- `subscribe(cb)`: `cb(config)` with the effective config once when the store starts
  (or at once if it has started), then each time the effective config changes. Other
  services (ports, watcher, agent, terminals, boot runner) use this.
- `listen(cb)`: `cb(ConfigEvent)` for every change of the file, valid or not, with its
  source (`client` or `disk`). The config channel turns these into `changed` frames.

The file is watched through one inotify fd of its own, read on the event loop (no
thread: a watchdog observer cost three threads and 0.35 MiB, docs/performance.md), on
the file's parent directory, not recursively. When that directory does not exist yet,
the nearest existing ancestor inside the root is watched instead, and the watch moves
down when the directory appears (and back up when it is deleted). Events are
debounced. A cheap periodic stat check (`config_poll_interval`) catches anything the
watch missed, or everything when inotify is unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import inspect
import logging
import os
import stat as stat_mod
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from watchdog.observers.inotify_c import InotifyConstants as IC
from watchdog.observers.inotify_c import (
    WatchDescriptor,
    inotify_add_watch,
    inotify_init,
    inotify_rm_watch,
)

from aetherd.config_model import (
    LEGACY_KEYS,
    MAX_EXPANDED_NODES,
    AgentSpec,
    FilesSpec,
    Parsed,
    PortSpec,
    TerminalSpec,
    WorkspaceConfig,
    config_schema,
    decode_config,
    dump_yaml,
    parse_legacy,
    parse_yaml,
    schema_text,
    summary,
    validate_data,
    version_of,
)
from aetherd.errors import AetherError, ErrorCode
from aetherd.services.fileio import UNLIMITED, os_error, read_regular, write_atomic
from aetherd.services.jail import Jail
from aetherd.settings import Settings

__all__ = [
    "LEGACY_KEYS",
    "MAX_EXPANDED_NODES",
    "AgentSpec",
    "ConfigEvent",
    "ConfigStore",
    "FilesSpec",
    "Parsed",
    "PortSpec",
    "TerminalSpec",
    "WorkspaceConfig",
    "config_schema",
    "dump_yaml",
    "parse_legacy",
    "parse_yaml",
    "schema_text",
    "validate_data",
    "version_of",
]

log = logging.getLogger("aetherd.config")

# What says the file (or a directory on its way) changed: the inotify mask of a watch.
# Opens and reads (ours, and the shared opener's directory walk) never reach us, nor do
# closes without a write, which would otherwise make the store re-read forever.
_WATCH_MASK = (
    IC.IN_CREATE
    | IC.IN_DELETE
    | IC.IN_MODIFY
    | IC.IN_MOVED_FROM
    | IC.IN_MOVED_TO
    | IC.IN_CLOSE_WRITE
    | IC.IN_DELETE_SELF
    | IC.IN_MOVE_SELF
    | IC.IN_ONLYDIR
    | IC.IN_DONT_FOLLOW
    | IC.IN_EXCL_UNLINK
)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
_READ_SIZE = 64 * 1024  # bytes per read of the inotify fd (a few hundred events)
# A burst of events longer than this many debounce periods is read anyway.
_MAX_DEBOUNCE_EXTENSIONS = 20
# Bound on placing the watches (stat and inotify_add_watch on the workspace's file
# system, which may hang): they run in a daemon thread the loop waits on this long at most.
_WATCH_CONTROL_TIMEOUT = 5.0


async def _in_daemon_thread(func: Callable[[], Any], timeout: float) -> Any:
    """Run `func` in a daemon thread and wait at most `timeout` for it.

    Unlike `asyncio.to_thread`, a call that never returns cannot hold up the default
    executor's shutdown (and with it the daemon's exit).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            result = func()
        except BaseException as exc:  # handed to the awaiting task
            ok, value = False, exc
        else:
            ok, value = True, result
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name="aetherd-config-watch", daemon=True).start()
    # asyncio.wait, not wait_for: on Python 3.10/3.11, wait_for swallows a cancellation
    # that arrives as the inner future completes (gh-86296), and stop() would then hang.
    done, _ = await asyncio.wait({future}, timeout=timeout)
    if not done:
        raise asyncio.TimeoutError
    return future.result()


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` is set within `timeout` (cancellation-safe, unlike wait_for on 3.10/3.11)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


# -- The store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigEvent:
    """One change of the config file, as the channel reports it."""

    config: WorkspaceConfig
    version: str
    valid: bool
    errors: list[dict[str, Any]]
    source: Literal["client", "disk"]
    path: str


@dataclass
class _DiskRead:
    kind: Literal["yaml", "legacy", "missing"]
    real: Path
    data: bytes
    too_large: bool
    signature: tuple[Any, ...]
    problem: str | None = None  # e.g. "not a regular file": the file exists but is unusable


@dataclass
class _State:
    kind: str = "missing"
    path: str = ""
    raw: str = ""
    version: str = field(default_factory=lambda: version_of(b""))
    valid: bool = True
    errors: list[dict[str, Any]] = field(default_factory=list)


class _DirWatch:
    """One inotify fd, read on the event loop: non-recursive watches on a few directories.

    `on_paths(paths)` gets, per read, the paths the events name (a watched directory
    itself when it is deleted or moved, or when the kernel's queue overflowed).
    `add` and `remove` may run in another thread (the placement's); reading runs on the
    loop. Raises OSError when no inotify instance can be had.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_paths: Callable[[list[str]], None]
    ) -> None:
        fd = inotify_init()
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        os.set_blocking(fd, False)
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        self.fd = fd
        self._loop = loop
        self._on_paths = on_paths
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory
        loop.add_reader(fd, self._read)

    def add(self, directory: str) -> int:
        """Watch `directory` (not recursively); its watch descriptor."""
        wd = int(inotify_add_watch(self.fd, os.fsencode(directory), _WATCH_MASK))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), directory)
        self._dirs[wd] = directory
        return wd

    def remove(self, wd: int) -> None:
        """Stop watching (the kernel may have dropped the watch already)."""
        if self._dirs.pop(wd, None) is not None:
            inotify_rm_watch(self.fd, WatchDescriptor(wd))

    def remove_all(self) -> None:
        """Remove every watch (the fd stays open)."""
        for wd in list(self._dirs):
            self.remove(wd)

    def close(self) -> None:
        """Stop reading and close the fd (which drops its watches)."""
        if self.fd < 0:
            return
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        self._dirs.clear()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("reading the config watch failed: %s (the poll still runs)", exc)
            self.close()
            return
        paths: list[str] = []
        offset, size = 0, _EVENT_HEADER.size
        while offset + size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            name = data[offset + size : offset + size + length].rstrip(b"\0")
            offset += size + length
            if mask & IC.IN_Q_OVERFLOW:
                paths.extend(self._dirs.values())  # events were lost: re-read
                continue
            directory = self._dirs.get(wd)
            if directory is None:
                continue
            if mask & IC.IN_IGNORED:  # the kernel dropped the watch (directory gone)
                self._dirs.pop(wd, None)
            paths.append(os.path.join(directory, os.fsdecode(name)) if name else directory)
        if paths:
            self._on_paths(paths)


class ConfigStore:
    """The workspace config: load, validate, write atomically, watch, tell subscribers."""

    def __init__(self, settings: Settings, jail: Jail | None = None) -> None:
        self.settings = settings
        self.jail = jail or Jail(settings.root)
        root = str(self.jail.root)
        self._yaml_lexical = os.path.normpath(os.path.join(root, settings.config_path))
        self._legacy_lexical = os.path.normpath(os.path.join(root, settings.config_legacy_path))
        self.current = WorkspaceConfig()
        self._state = _State(path=self.jail.to_wire(self._yaml_lexical))
        self._signature: tuple[Any, ...] = ()
        self._subscribers: list[Callable[[WorkspaceConfig], Any]] = []
        self._listeners: list[Callable[[ConfigEvent], Any]] = []
        self._lock = asyncio.Lock()
        self._kick: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: _DirWatch | None = None
        self._watches: dict[str, tuple[int, tuple[int, int]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False
        self.reloads = 0  # disk reads that found a new version (for tests and metrics)

    # -- public API ------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The version (hash) of the file as last read or written."""
        return self._state.version

    @property
    def valid(self) -> bool:
        """False while the file on disk is invalid (and `current` is the last good one)."""
        return self._state.valid

    def subscribe(self, callback: Callable[[WorkspaceConfig], Any]) -> Callable[[], None]:
        """Call `callback(config)` once at start (now if started) and on every effective change.

        Callbacks are plain functions run on the event loop; they must be quick (start a
        task for slow work). An exception is logged and does not stop the others.
        Returns a function that unsubscribes.
        """
        self._subscribers.append(callback)
        if self._started:
            self._call(callback, self.current)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def listen(self, callback: Callable[[ConfigEvent], Any]) -> Callable[[], None]:
        """Call `callback(event)` for every change of the file, valid or not."""
        self._listeners.append(callback)

        def unlisten() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unlisten

    def snapshot(self) -> dict[str, Any]:
        """`{config, raw, version, path, valid, errors, legacy}` as the `get` reply."""
        state = self._state
        return {
            "config": self.current.model_dump(mode="json"),
            "raw": state.raw,
            "version": state.version,
            "path": state.path,
            "valid": state.valid,
            "errors": state.errors,
            "legacy": state.kind == "legacy",
        }

    async def validate(self, raw: str) -> dict[str, Any]:
        """`{valid, errors}` for YAML text, without touching anything."""
        parsed = await self._parse_text(raw)
        return {"valid": parsed.valid, "errors": parsed.errors}

    async def validate_object(self, config: dict[str, Any]) -> dict[str, Any]:
        """`{valid, errors}` for a config object."""
        parsed = await self._validate_object(config)
        return {"valid": parsed.valid, "errors": parsed.errors}

    async def _validate_object(self, config: dict[str, Any]) -> Parsed:
        """Validation of a client's object, off the loop (it may be up to a frame's size)."""
        limit = self.settings.config_max_terminals
        return await self.jail.executor.run(lambda: validate_data(config, max_terminals=limit))

    async def set(
        self,
        *,
        raw: str | None = None,
        config: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Validate, check `version`, write atomically, apply; returns the new snapshot.

        Raises CONFLICT when `version` is given and the file's version differs,
        INVALID_CONFIG (with `errors`) when the content is invalid; the file is then
        left untouched.
        """
        if (raw is None) == (config is None):
            raise AetherError(
                ErrorCode.INVALID_MESSAGE, "give exactly one of 'raw' or 'config'", field="raw"
            )
        if raw is not None:
            parsed = await self._parse_text(raw)
            text = raw
        else:
            assert config is not None
            parsed = await self._validate_object(config)
            text = await self.jail.executor.run(dump_yaml, config) if parsed.valid else ""
        if not parsed.valid:
            raise AetherError(
                ErrorCode.INVALID_CONFIG, summary(parsed.errors), errors=parsed.errors
            )
        data = text.encode("utf-8")
        if len(data) > self.settings.config_max_bytes:
            raise AetherError(
                ErrorCode.FILE_TOO_LARGE,
                f"the config is larger than {self.settings.config_max_bytes} bytes",
            )
        assert parsed.config is not None
        async with self._lock:
            disk = await self.jail.executor.run(self._read_disk)
            on_disk = version_of(disk.data)
            if version is not None and version != on_disk:
                raise AetherError(
                    ErrorCode.CONFLICT,
                    "the config file changed since it was read; get it again",
                    currentVersion=on_disk,
                )
            target = self._write_target()
            signature = await self.jail.executor.run(self._write_atomic, target, data)
            self._signature = signature
            self._state = _State(
                kind="yaml",
                path=self.jail.to_wire(self._yaml_lexical),
                raw=text,
                version=version_of(data),
                valid=True,
                errors=[],
            )
            self._apply(parsed.config)
            self._emit("client")
            return self.snapshot()

    async def reload(self) -> bool:
        """Re-read the file now; True when its version changed (then `changed` is emitted)."""
        async with self._lock:
            await self._update_watches()
            disk = await self.jail.executor.run(self._read_disk)
            self._signature = disk.signature
            new_version = version_of(disk.data)
            if new_version == self._state.version and disk.kind == self._state.kind:
                return False
            self.reloads += 1
            parsed = await self._parse_disk(disk)
            self._state = _State(
                kind=disk.kind,
                path=self._wire(disk),
                raw=disk.data.decode("utf-8", "replace") if not disk.too_large else "",
                version=new_version,
                valid=parsed.valid,
                errors=parsed.errors,
            )
            if parsed.valid:
                assert parsed.config is not None
                self._apply(parsed.config)
            else:
                log.warning(
                    "config file is invalid; keeping the last good config: %s",
                    summary(parsed.errors),
                )
            self._emit("disk")
            return True

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load the file, start watching it, and give subscribers the effective config."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._kick = asyncio.Event()
        try:
            self._inotify = _DirWatch(self._loop, self._on_paths)
        except OSError as exc:
            log.warning("cannot watch the config file: %s (the poll still runs)", exc)
        async with self._lock:
            await self._update_watches()
            disk = await self.jail.executor.run(self._read_disk)
            self._signature = disk.signature
            parsed = await self._parse_disk(disk)
            self._state = _State(
                kind=disk.kind,
                path=self._wire(disk),
                raw=disk.data.decode("utf-8", "replace") if not disk.too_large else "",
                version=version_of(disk.data),
                valid=parsed.valid,
                errors=parsed.errors,
            )
            if parsed.config is not None:
                self.current = parsed.config
            else:
                log.warning(
                    "config file is invalid; using the defaults: %s", summary(parsed.errors)
                )
        self._started = True
        for callback in list(self._subscribers):
            self._call(callback, self.current)
        self._tasks.append(asyncio.create_task(self._debounce_loop(), name="config-watch"))
        if self.settings.config_poll_interval > 0:
            self._tasks.append(asyncio.create_task(self._poll_loop(), name="config-poll"))

    async def stop(self) -> None:
        """Stop watching. Subscribers are kept (they belong to their owners)."""
        self._started = False
        self._stopping = True  # the loops also check this, should a cancellation be lost
        if self._kick is not None:
            self._kick.set()
        tasks = list(self._tasks)
        for _ in range(3):
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=1.0) if tasks else (set(), set())
            tasks = list(pending)
            if not tasks:
                break
        for task in tasks:
            log.warning("config task %s did not stop", task.get_name())
        self._tasks.clear()
        inotify, self._inotify = self._inotify, None
        self._watches.clear()
        if inotify is not None:
            inotify.close()

    # -- internals -------------------------------------------------------------------
    def _wire(self, disk: _DiskRead) -> str:
        lexical = self._legacy_lexical if disk.kind == "legacy" else self._yaml_lexical
        return self.jail.to_wire(lexical)

    async def _parse_text(self, raw: str) -> Parsed:
        if len(raw.encode("utf-8", "surrogatepass")) > self.settings.config_max_bytes:
            message = f"the config is larger than {self.settings.config_max_bytes} bytes"
            return Parsed(None, [{"loc": [], "line": None, "column": None, "message": message}])
        # Off the loop, in the bounded file executor; the parser bounds depth itself.
        return await self.jail.executor.run(self._parse, parse_yaml, raw)

    def _parse(self, parse: Callable[..., Parsed], text: str) -> Parsed:
        return parse(
            text,
            max_terminals=self.settings.config_max_terminals,
            max_depth=self.settings.config_max_depth,
        )

    async def _parse_disk(self, disk: _DiskRead) -> Parsed:
        if disk.kind == "missing":
            return Parsed(WorkspaceConfig(), [])
        if disk.problem is not None:
            return Parsed(
                None, [{"loc": [], "line": None, "column": None, "message": disk.problem}]
            )
        if disk.too_large:
            message = f"the file is larger than {self.settings.config_max_bytes} bytes"
            return Parsed(None, [{"loc": [], "line": None, "column": None, "message": message}])
        text, problem = decode_config(disk.data)
        if text is None:
            assert problem is not None
            return Parsed(None, [problem])
        parse = parse_legacy if disk.kind == "legacy" else parse_yaml
        return await self.jail.executor.run(self._parse, parse, text)

    def _apply(self, config: WorkspaceConfig) -> None:
        if config == self.current:
            return
        self.current = config
        for callback in list(self._subscribers):
            self._call(callback, config)

    def _call(self, callback: Callable[[Any], Any], value: Any) -> None:
        try:
            result = callback(value)
            if inspect.isawaitable(result):  # tolerate async callbacks: run them as tasks
                task = asyncio.ensure_future(result)
                self._tasks.append(task)
                task.add_done_callback(self._forget)
        except Exception:
            log.exception("config subscriber %r failed", callback)

    def _forget(self, task: asyncio.Future[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def _emit(self, source: Literal["client", "disk"]) -> None:
        state = self._state
        event = ConfigEvent(
            self.current, state.version, state.valid, state.errors, source, state.path
        )
        for callback in list(self._listeners):
            self._call(callback, event)

    def _write_target(self) -> Path:
        """The real path to write: symlinks followed, but only inside the root."""
        return self.jail.resolve(self.jail.to_wire(self._yaml_lexical))

    def _read_one(self, path: Path, lexical: str) -> _DiskRead | None:
        """One candidate file (through the shared opener: no FIFO wait, no symlink race)."""
        limit = self.settings.config_max_bytes
        wire = self.jail.to_wire(lexical)
        try:
            data, st = read_regular(self.jail, path, wire, limit)
        except AetherError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.NOT_DIRECTORY, ErrorCode.IS_DIRECTORY):
                return None
            log.warning("cannot read the config file %s", err.message)
            return _DiskRead("yaml", path, b"", False, ("unreadable", err.message), err.message)
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if len(data) > limit:
            return _DiskRead("yaml", path, b"", True, signature)
        return _DiskRead("yaml", path, data, False, signature)

    def _read_disk(self) -> _DiskRead:
        """Read the YAML file, else the legacy JSON one (in the file executor)."""
        for kind, lexical in (("yaml", self._yaml_lexical), ("legacy", self._legacy_lexical)):
            real = Path(os.path.realpath(lexical))
            if not self.jail.is_inside(str(real)):
                log.warning("%s resolves outside the workspace; ignored", lexical)
                continue
            got = self._read_one(real, lexical)
            if got is not None:
                got.kind = kind  # type: ignore[assignment]
                got.signature = (kind, *got.signature)
                return got
        return _DiskRead("missing", Path(self._yaml_lexical), b"", False, ("missing",))

    def _stat_signature(self) -> tuple[Any, ...]:
        for kind, lexical in (("yaml", self._yaml_lexical), ("legacy", self._legacy_lexical)):
            try:
                st = os.stat(lexical)
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                return (kind, st.st_ino, st.st_size, st.st_mtime_ns)
        return ("missing",)

    def _write_atomic(self, target: Path, data: bytes) -> tuple[Any, ...]:
        """The daemon's one atomic writer; the mode of an existing file is kept."""
        wire = self.jail.to_wire(self._yaml_lexical)
        try:
            st = write_atomic(self.jail, target, data, UNLIMITED)
        except OSError as exc:
            err = os_error(exc, wire)
            raise AetherError(err.code, f"cannot write the config: {err.message}") from None
        return ("yaml", st.st_ino, st.st_size, st.st_mtime_ns)

    # -- watching --------------------------------------------------------------------
    def _desired_watch_dirs(self) -> frozenset[str]:
        root = str(self.jail.root)
        dirs: set[str] = set()
        for lexical in (self._yaml_lexical, self._legacy_lexical):
            directory = os.path.dirname(lexical)
            while directory != root and not os.path.isdir(directory):
                parent = os.path.dirname(directory)
                if parent == directory or not self.jail.is_inside(parent):
                    directory = root
                    break
                directory = parent
            dirs.add(directory)
        return frozenset(dirs)

    async def _update_watches(self) -> None:
        """Move the watches where they belong, off the event loop and bounded in time."""
        try:
            await _in_daemon_thread(self._place_watches, _WATCH_CONTROL_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("placing the config watch timed out; the poll still runs")

    def _place_watches(self) -> None:
        """Watch each file's directory, or its nearest existing ancestor (non-recursive)."""
        inotify = self._inotify
        if inotify is None:
            return
        desired = self._desired_watch_dirs()
        for directory in list(self._watches):
            watch, inode = self._watches[directory]
            try:
                st = os.stat(directory)
                same = (st.st_dev, st.st_ino) == inode
            except OSError:
                same = False
            if directory not in desired or not same:
                # A directory that was deleted (and maybe recreated) has a dead watch.
                with contextlib.suppress(OSError):
                    inotify.remove(watch)
                self._watches.pop(directory, None)  # a timed-out placement may race
        for directory in desired - set(self._watches):
            try:
                st = os.stat(directory)
                watch = inotify.add(directory)
            except OSError as exc:
                log.warning("cannot watch %s: %s (the poll still runs)", directory, exc)
                continue
            self._watches[directory] = (watch, (st.st_dev, st.st_ino))

    def _on_paths(self, paths: list[str]) -> None:
        """On the loop: wake the debounce loop when a path concerns the config."""
        targets = (self._yaml_lexical, self._legacy_lexical)
        relevant = any(
            path == target or target.startswith(path.rstrip("/") + "/")
            for path in paths
            for target in targets
        )
        if relevant and self._kick is not None:
            self._kick.set()

    async def _debounce_loop(self) -> None:
        assert self._kick is not None
        kick = self._kick
        while not self._stopping:
            await kick.wait()
            for _ in range(_MAX_DEBOUNCE_EXTENSIONS):
                kick.clear()
                if self._stopping or not await _wait_event(kick, self.settings.config_debounce):
                    break
            kick.clear()
            if self._stopping:
                return
            try:
                await self.reload()
            except Exception:
                log.exception("re-reading the config failed")

    async def _poll_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.settings.config_poll_interval)
            try:
                signature = await self.jail.executor.run(self._stat_signature)
                if signature != self._signature or not self._watches:
                    assert self._kick is not None
                    self._kick.set()
            except Exception:
                log.exception("config poll failed")
