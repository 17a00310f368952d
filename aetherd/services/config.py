"""The workspace config: model, load, validate, atomic write, disk watching, subscribers.

`ConfigStore` owns `.aether/config.yaml` (a setting). It keeps `current`, the last
good validated `WorkspaceConfig`, and tells two kinds of listeners about changes:

- `subscribe(cb)`: `cb(config)` with the effective config once when the store starts
  (or at once if it has started), then each time the effective config changes. Other
  services (ports, watcher, agent, terminals, boot runner) use this.
- `listen(cb)`: `cb(ConfigEvent)` for every change of the file, valid or not, with its
  source (`client` or `disk`). The config channel turns these into `changed` frames.

The file is watched with its own watchdog observer on the file's parent directory,
not recursively. When that directory does not exist yet, the nearest existing
ancestor inside the root is watched instead, and the watch moves down when the
directory appears (and back up when it is deleted). Events are debounced. A cheap
periodic stat check (`config_poll_interval`) catches anything the watch missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import stat as stat_mod
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from aetherd.errors import AetherError, ErrorCode
from aetherd.services.jail import Jail
from aetherd.settings import Settings

log = logging.getLogger("aetherd.config")

LEGACY_KEYS = ("setup", "setup_on_boot", "terminals")
# Events that say the file (or a directory on its way) changed; opened/closed-no-write
# are our own reads and would otherwise make the watcher re-read forever.
_RELEVANT_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed"})
# A burst of events longer than this many debounce periods is read anyway.
_MAX_DEBOUNCE_EXTENSIONS = 20
# A document of more nodes than this, once aliases are expanded, is refused before
# validation ("billion laughs": a 1 KiB file can name a billion nodes).
MAX_EXPANDED_NODES = 1_000_000
# Bound on one watchdog control call (schedule, unschedule, stop): they join threads
# without a timeout, so they run in a daemon thread the loop waits on this long at most.
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


# -- The model --------------------------------------------------------------------------


def _scalar_to_str(value: Any) -> Any:
    """Env values may be written as YAML numbers or booleans; they become strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


EnvValue = Annotated[
    str,
    BeforeValidator(_scalar_to_str),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]
EnvMap = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], EnvValue]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    """Unknown keys are errors, so that typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")


class TerminalSpec(_Strict):
    """A terminal the workspace declares; autostarted ones run as session `boot:<name>`."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Unique name; the session id is boot:<name>",
    )
    command: str = Field(min_length=1, description="Shell command to run")
    cwd: str | None = Field(None, description="Working directory, relative to the workspace root")
    env: EnvMap = Field(
        default_factory=dict,
        description="Extra environment variables",
        json_schema_extra={"additionalProperties": False},
    )
    port: PortNumber | None = Field(
        None, description="Port the command serves; exported as PORT unless env sets it"
    )
    autostart: bool = Field(True, description="Start at daemon start")
    restart: Literal["never", "on-failure", "always"] = Field(
        "never", description="What to do when the command exits"
    )


class PortSpec(_Strict):
    """How one port is shown."""

    label: str | None = Field(None, max_length=200, description="Name shown for the port")
    visibility: Literal["private", "public"] = Field("private", description="Preview visibility")
    ignore: bool = Field(False, description="Never report this port")


class AgentSpec(_Strict):
    """Defaults for the agent."""

    provider: str | None = Field(None, description="Provider name, for example anthropic")
    model: str | None = Field(None, description="Model name")
    permission_mode: str | None = Field(None, description="Default permission mode")


class FilesSpec(_Strict):
    """File watcher options."""

    ignore: list[str] = Field(default_factory=list, description="Extra ignore globs")


class WorkspaceConfig(_Strict):
    """The workspace config file (`.aether/config.yaml`). Every key is optional."""

    model_config = ConfigDict(extra="forbid", title="aetherd workspace config")

    setup: str | None = Field(None, description="Run once, the first time the daemon starts")
    setup_on_boot: str | None = Field(
        None, description="Run at every daemon start, in the session boot:setup"
    )
    terminals: list[TerminalSpec] = Field(default_factory=list)
    ports: dict[PortNumber, PortSpec] = Field(
        default_factory=dict,
        json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,5}$"}},
    )
    env: EnvMap = Field(
        default_factory=dict,
        description="Added to every terminal and agent command",
        json_schema_extra={"additionalProperties": False},
    )
    agent: AgentSpec = Field(default_factory=AgentSpec)
    files: FilesSpec = Field(default_factory=FilesSpec)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, generated from the model."""
    schema = WorkspaceConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The committed form of the schema (docs/config.schema.json)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


# -- Parsing and validation ----------------------------------------------------------------


@dataclass
class Parsed:
    """The outcome of validating one text or object."""

    config: WorkspaceConfig | None
    errors: list[dict[str, Any]]

    @property
    def valid(self) -> bool:
        """True when there are no errors."""
        return self.config is not None and not self.errors


def version_of(data: bytes) -> str:
    """The version of a file's bytes (a missing file has the version of no bytes)."""
    return hashlib.sha256(data).hexdigest()[:32]


def _error(loc: list[Any], message: str, node: Any = None) -> dict[str, Any]:
    line, column = _locate(node, loc) if node is not None else (None, None)
    return {"loc": loc, "line": line, "column": column, "message": message}


def _locate(node: Any, loc: list[Any]) -> tuple[int | None, int | None]:
    """The 1-based line and column of `loc` in a composed YAML node tree."""
    mark = node.start_mark
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            found = None
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)
            if found is None:
                break
            mark, current = found[0].start_mark, found[1]
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(current.value):
                break
            current = current.value[part]
            mark = current.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key {str(err['loc'][-1])!r}" if err["loc"] else "unknown key"
    return str(err["msg"]).removeprefix("Value error, ")


def validate_data(data: Any, node: Any = None, *, max_terminals: int = 64) -> Parsed:
    """Validate a decoded document; `node` (composed YAML) gives errors their line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return Parsed(None, [_error([], "the config must be a mapping of keys", node)])
    try:
        config = WorkspaceConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = [p for p in err["loc"] if p != "[key]"]
            errors.append(_error(loc, _message(err), node))
        return Parsed(None, errors)
    errors = []
    if len(config.terminals) > max_terminals:
        errors.append(_error(["terminals"], f"at most {max_terminals} terminals", node))
    seen: set[str] = set()
    for index, terminal in enumerate(config.terminals):
        if terminal.name in seen:
            message = f"duplicate terminal name {terminal.name!r}"
            errors.append(_error(["terminals", index, "name"], message, node))
        seen.add(terminal.name)
    return Parsed(None, errors) if errors else Parsed(config, [])


def _decode(data: bytes) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return None, {"loc": [], "line": line, "column": None, "message": "not valid UTF-8"}


def _yaml_problem(exc: yaml.YAMLError) -> dict[str, Any]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    return {
        "loc": [],
        "line": mark.line + 1 if mark is not None else None,
        "column": mark.column + 1 if mark is not None else None,
        "message": message,
    }


def _compose(text: str) -> tuple[Any, Any]:
    """Compose and construct one YAML document: (node, data). Raises yaml.YAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _structure_problems(root: Any) -> list[dict[str, Any]]:
    """Recursive aliases, alias bombs and duplicate keys, found on the node graph."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            visiting.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                message = f"the document expands to more than {MAX_EXPANDED_NODES} values"
                return [_error([], message, root)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in visiting:
            mark = node.start_mark
            return [
                {
                    "loc": [],
                    "line": mark.line + 1,
                    "column": mark.column + 1,
                    "message": "recursive alias",
                }
            ]
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    errors: list[dict[str, Any]] = []
    seen_nodes: set[int] = set()
    walk: list[tuple[Any, list[Any]]] = [(root, [])]
    while walk:
        node, loc = walk.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name != "<<":
                    if name in keys:
                        mark = key.start_mark
                        errors.append(
                            {
                                "loc": [*loc, name],
                                "line": mark.line + 1,
                                "column": mark.column + 1,
                                "message": f"duplicate key {name!r}",
                            }
                        )
                    keys.add(name)
                walk.append((value, [*loc, name if name is not None else "?"]))
        elif isinstance(node, yaml.SequenceNode):
            walk.extend((item, [*loc, index]) for index, item in enumerate(node.value))
    errors.sort(key=lambda e: e["line"])
    return errors


def parse_yaml(text: str, *, max_terminals: int = 64) -> Parsed:
    """Parse and validate YAML config text; errors point at YAML lines."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            # Before construction: merge keys (`<<`) are flattened into the nodes then.
            problems = _structure_problems(node)
            if problems:
                return Parsed(None, problems)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        return Parsed(None, [_yaml_problem(exc)])
    except (ValueError, RecursionError) as exc:  # e.g. a huge integer, absurd nesting
        return Parsed(None, [{"loc": [], "line": None, "column": None, "message": str(exc)}])
    finally:
        loader.dispose()
    return validate_data(data, node, max_terminals=max_terminals)


def parse_legacy(text: str, *, max_terminals: int = 64) -> Parsed:
    """Read the older `.aether/environment.json`: only setup, setup_on_boot and terminals."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        message = f"JSON syntax error: {getattr(exc, 'msg', exc)}"
        return Parsed(None, [{"loc": [], "line": line, "column": column, "message": message}])
    except RecursionError as exc:
        return Parsed(None, [{"loc": [], "line": None, "column": None, "message": str(exc)}])
    node = None
    with contextlib.suppress(yaml.YAMLError, ValueError, RecursionError):
        node = _compose(text)[0]  # JSON is (nearly) YAML: the nodes give lines
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if key in LEGACY_KEYS}
    return validate_data(data, node, max_terminals=max_terminals)


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text for a config object, keys in the order given."""
    if not data:
        return ""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid config: {where}{loc + ': ' if loc else ''}{first['message']}{more}"


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


@dataclass
class _State:
    kind: str = "missing"
    path: str = ""
    raw: str = ""
    version: str = field(default_factory=lambda: version_of(b""))
    valid: bool = True
    errors: list[dict[str, Any]] = field(default_factory=list)


class _EventForwarder(FileSystemEventHandler):
    """Runs in watchdog's thread; only hands paths to the store."""

    def __init__(self, on_paths: Callable[[list[str]], None]) -> None:
        self._on_paths = on_paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _RELEVANT_EVENTS:
            return
        paths = [os.fsdecode(event.src_path)]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(os.fsdecode(dest))
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
        self._observer: Any = None
        self._watches: dict[str, tuple[Any, tuple[int, int]]] = {}
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
        parsed = validate_data(config, max_terminals=self.settings.config_max_terminals)
        return {"valid": parsed.valid, "errors": parsed.errors}

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
            parsed = validate_data(config, max_terminals=self.settings.config_max_terminals)
            text = dump_yaml(config) if parsed.valid else ""
        if not parsed.valid:
            raise AetherError(
                ErrorCode.INVALID_CONFIG, _summary(parsed.errors), errors=parsed.errors
            )
        data = text.encode("utf-8")
        if len(data) > self.settings.config_max_bytes:
            raise AetherError(
                ErrorCode.FILE_TOO_LARGE,
                f"the config is larger than {self.settings.config_max_bytes} bytes",
            )
        assert parsed.config is not None
        async with self._lock:
            disk = await asyncio.to_thread(self._read_disk)
            on_disk = version_of(disk.data)
            if version is not None and version != on_disk:
                raise AetherError(
                    ErrorCode.CONFLICT,
                    "the config file changed since it was read; get it again",
                    currentVersion=on_disk,
                )
            target = self._write_target()
            signature = await asyncio.to_thread(self._write_atomic, target, data)
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
            disk = await asyncio.to_thread(self._read_disk)
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
                    _summary(parsed.errors),
                )
            self._emit("disk")
            return True

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load the file, start watching it, and give subscribers the effective config."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._kick = asyncio.Event()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        async with self._lock:
            await self._update_watches()
            disk = await asyncio.to_thread(self._read_disk)
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
                    "config file is invalid; using the defaults: %s", _summary(parsed.errors)
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
        observer, self._observer = self._observer, None
        self._watches.clear()
        if observer is not None:

            def stop_observer() -> None:
                observer.stop()
                observer.join(_WATCH_CONTROL_TIMEOUT)

            try:
                await _in_daemon_thread(stop_observer, _WATCH_CONTROL_TIMEOUT * 2)
            except asyncio.TimeoutError:
                log.warning("the config watcher did not stop in time; left to exit with us")

    # -- internals -------------------------------------------------------------------
    def _wire(self, disk: _DiskRead) -> str:
        lexical = self._legacy_lexical if disk.kind == "legacy" else self._yaml_lexical
        return self.jail.to_wire(lexical)

    async def _parse_text(self, raw: str) -> Parsed:
        if len(raw.encode("utf-8", "surrogatepass")) > self.settings.config_max_bytes:
            message = f"the config is larger than {self.settings.config_max_bytes} bytes"
            return Parsed(None, [{"loc": [], "line": None, "column": None, "message": message}])
        return await asyncio.to_thread(
            parse_yaml, raw, max_terminals=self.settings.config_max_terminals
        )

    async def _parse_disk(self, disk: _DiskRead) -> Parsed:
        if disk.kind == "missing":
            return Parsed(WorkspaceConfig(), [])
        if disk.too_large:
            message = f"the file is larger than {self.settings.config_max_bytes} bytes"
            return Parsed(None, [{"loc": [], "line": None, "column": None, "message": message}])
        text, problem = _decode(disk.data)
        if text is None:
            assert problem is not None
            return Parsed(None, [problem])
        parse = parse_legacy if disk.kind == "legacy" else parse_yaml
        return await asyncio.to_thread(
            parse, text, max_terminals=self.settings.config_max_terminals
        )

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
                self._tasks.append(task)  # type: ignore[arg-type]
                task.add_done_callback(
                    lambda t: self._tasks.remove(t) if t in self._tasks else None
                )  # type: ignore[arg-type]
        except Exception:
            log.exception("config subscriber %r failed", callback)

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

    def _read_one(self, path: Path) -> tuple[bytes, bool, tuple[Any, ...]] | None:
        limit = self.settings.config_max_bytes
        try:
            with path.open("rb") as handle:
                st = os.fstat(handle.fileno())
                if not stat_mod.S_ISREG(st.st_mode):
                    return None
                data = handle.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror)
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if len(data) > limit:
            return b"", True, signature
        return data, False, signature

    def _read_disk(self) -> _DiskRead:
        """Read the YAML file, else the legacy JSON one (in a thread)."""
        for kind, lexical in (("yaml", self._yaml_lexical), ("legacy", self._legacy_lexical)):
            real = Path(os.path.realpath(lexical))
            if not self.jail.is_inside(str(real)):
                log.warning("%s resolves outside the workspace; ignored", lexical)
                continue
            got = self._read_one(real)
            if got is not None:
                data, too_large, signature = got
                return _DiskRead(kind, real, data, too_large, (kind, *signature))  # type: ignore[arg-type]
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
        """Temp file in the same directory, fsync, rename over, fsync the directory."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if not self.jail.is_inside(os.path.realpath(target.parent)):
            raise AetherError(ErrorCode.INVALID_PATH, "the config directory leaves the workspace")
        try:
            mode = stat_mod.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            code = {
                errno.ENOSPC: ErrorCode.NO_SPACE,
                errno.EDQUOT: ErrorCode.NO_SPACE,
                errno.EACCES: ErrorCode.PERMISSION_DENIED,
                errno.EPERM: ErrorCode.PERMISSION_DENIED,
                errno.EROFS: ErrorCode.PERMISSION_DENIED,
                errno.EISDIR: ErrorCode.IS_DIRECTORY,
                errno.ENOTDIR: ErrorCode.NOT_DIRECTORY,
            }.get(exc.errno or 0, ErrorCode.INTERNAL_ERROR)
            raise AetherError(code, f"cannot write the config: {exc.strerror}") from None
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        st = os.stat(target)
        return ("yaml", st.st_ino, st.st_size, st.st_mtime_ns)

    # -- watching --------------------------------------------------------------------
    def _desired_watch_dirs(self) -> set[str]:
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
        return dirs

    async def _update_watches(self) -> None:
        """Move the watches where they belong, off the event loop and bounded in time."""
        try:
            await _in_daemon_thread(self._place_watches, _WATCH_CONTROL_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("placing the config watch timed out; the poll still runs")

    def _place_watches(self) -> None:
        """Watch each file's directory, or its nearest existing ancestor (non-recursive)."""
        observer = self._observer
        if observer is None:
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
                with contextlib.suppress(Exception):
                    observer.unschedule(watch)
                del self._watches[directory]
        for directory in desired - set(self._watches):
            try:
                st = os.stat(directory)
                watch = observer.schedule(
                    _EventForwarder(self._on_paths), directory, recursive=False
                )
            except OSError as exc:
                log.warning("cannot watch %s: %s (the poll still runs)", directory, exc)
                continue
            self._watches[directory] = (watch, (st.st_dev, st.st_ino))

    def _on_paths(self, paths: list[str]) -> None:
        """Watchdog thread: wake the debounce loop when a path concerns the config."""
        targets = (self._yaml_lexical, self._legacy_lexical)
        relevant = any(
            path == target or target.startswith(path.rstrip("/") + "/")
            for path in paths
            for target in targets
        )
        if not relevant or self._loop is None or self._kick is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._kick.set)

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
                signature = await asyncio.to_thread(self._stat_signature)
                if signature != self._signature or not self._watches:
                    assert self._kick is not None
                    self._kick.set()
            except Exception:
                log.exception("config poll failed")


if __name__ == "__main__":  # python -m aetherd.services.config > docs/config.schema.json
    print(schema_text(), end="")
