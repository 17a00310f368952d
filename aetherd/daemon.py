"""The daemon's process-wide state: the services container and the `Daemon` record.

`Services` holds plain asyncio classes with the daemon's real logic (no aiohttp, no
frames). Each service may define `async start()` and `async stop()`; `Services` starts
them in the order they were added and stops them in reverse. A channel reaches its
service through `ctx.services.<name>`. `Daemon` bundles the settings, the services,
the hub of live connections and the channel registry.

The search, git and agent services (with the transcript store) are built on first use:
an idle daemon imports none of their modules (docs/performance.md, "Issue 18, second
pass"). Reading `services.git` builds it; a service with an `async start()` built
while the daemon runs is started by `await services.ensure(name)`, which its channel
calls before using it. The agent is also started at boot when its transcript holds
tasks a previous run left active, so that they are failed as before.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aetherd.metrics import Metrics
from aetherd.services.activity import ActivityTracker
from aetherd.services.boot import BootRunner, SessionLauncher
from aetherd.services.config import ConfigStore
from aetherd.services.executors import Executors
from aetherd.services.fs import FileLimits, FileSystem
from aetherd.services.idle import IdleAction
from aetherd.services.jail import Jail
from aetherd.services.ports import PortScanner
from aetherd.services.process import ProcessManager
from aetherd.services.resources import ResourceMonitor
from aetherd.services.terminal import TerminalManager
from aetherd.services.watcher import IgnoreRules, Watcher
from aetherd.services.wiring import wire_agent_config, wire_config
from aetherd.settings import Settings

if TYPE_CHECKING:
    from aetherd.agent.runner import AgentRunner
    from aetherd.protocol.hub import Hub
    from aetherd.protocol.registry import Registry
    from aetherd.reload import ReloadState
    from aetherd.services.git import GitService
    from aetherd.services.search import SearchService
    from aetherd.services.transcript import TranscriptStore

log = logging.getLogger("aetherd.services")
S = TypeVar("S")


class Services:
    """The daemon's services, built from its settings."""

    config: ConfigStore
    fs: FileSystem
    watcher: Watcher | None  # None when watcher_enabled is false
    search: SearchService  # built on first use
    terminals: TerminalManager
    processes: ProcessManager
    boot: BootRunner
    ports: PortScanner
    git: GitService  # built on first use
    transcript: TranscriptStore  # built with the agent
    agent: AgentRunner  # built on first use, or at boot with tasks to fail
    resources: ResourceMonitor
    idle: IdleAction | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lifecycle: list[Any] = []
        self._started: list[Any] = []
        # name -> the function that builds it (and sets the attribute) on first access
        self._factories: dict[str, Callable[[], None]] = {}
        self._running = False  # between start() and stop(): a built service is started
        self._ensure_lock: asyncio.Lock | None = None
        self.metrics = Metrics()
        self.activity = ActivityTracker()
        # First in, so stopped last: every service's file work is done before the pools go.
        self.executors = Executors(
            file_threads=settings.file_io_threads,
            search_threads=settings.search_threads,
            shutdown_timeout=min(5.0, settings.shutdown_timeout / 2),
        )
        self._lifecycle.append(self.executors)
        self.metrics.add_source(self.executors)
        self.jail = Jail(settings.root, self.executors.file)
        self.metrics.add_source(self.activity)

    def add(self, service: S) -> S:
        """Register `service` for start/stop (and its `metrics()`, if any); return it.

        Added while the services run (built on first use): one without `start()` counts
        as started at once; one with it waits for `ensure()`.
        """
        self._lifecycle.append(service)
        if callable(getattr(service, "metrics", None)):
            self.metrics.add_source(service)
        if self._running and getattr(service, "start", None) is None:
            self._started.append(service)
        return service

    def lazy(self, names: tuple[str, ...], build: Callable[[], None]) -> None:
        """Build the services `names` by `build()` (which sets them) on first access."""
        for name in names:
            self._factories[name] = build

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not set: a lazy service's first access builds it.
        build = self.__dict__.get("_factories", {}).get(name)
        if build is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        for other in [n for n, b in self._factories.items() if b is build]:
            del self._factories[other]
        build()
        return self.__dict__[name]

    def built(self, name: str) -> Any | None:
        """The service `name` if it exists, without building a lazy one."""
        return self.__dict__.get(name)

    async def ensure(self, name: str) -> Any:
        """The service `name`, built and, while the services run, started."""
        service = getattr(self, name)
        if not self._running or len(self._started) == len(self._lifecycle):
            return service  # the fast path: nothing waits to start
        if self._ensure_lock is None:
            self._ensure_lock = asyncio.Lock()
        async with self._ensure_lock:
            for pending in [s for s in self._lifecycle if s not in self._started]:
                if not self._running:
                    break
                await pending.start()
                self._started.append(pending)
        return service

    async def start(self) -> None:
        """Start every service in order; on failure, stop the ones already started."""
        self._running = True
        index = 0
        while index < len(self._lifecycle):  # grows if a lazy service is built meanwhile
            service = self._lifecycle[index]
            index += 1
            if service in self._started:
                continue
            start = getattr(service, "start", None)
            if start is not None:
                try:
                    await start()
                except BaseException:
                    await self.stop()
                    raise
            self._started.append(service)
        if "agent" in self._factories:
            transcript = self.settings.data_dir / "agent.sqlite3"
            if await self.executors.file.run(_has_active_tasks, transcript):
                log.info("the agent transcript holds unfinished tasks: starting the agent")
                try:
                    await self.ensure("agent")
                except BaseException:
                    await self.stop()
                    raise

    async def stop(self) -> None:
        """Stop the started services in reverse order; one failing does not stop the rest."""
        self._running = False
        while self._started:
            service = self._started.pop()
            stop = getattr(service, "stop", None)
            if stop is None:
                continue
            try:
                await asyncio.wait_for(stop(), timeout=self.settings.shutdown_timeout)
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)

    def terminal_count(self) -> int:
        """Live terminal sessions (0 until the terminal service exists)."""
        terminals = getattr(self, "terminals", None)
        return terminals.count() if terminals is not None else 0

    def running_tasks(self) -> int:
        """Agent tasks running now (0 until the agent service exists)."""
        agent = self.built("agent")
        return agent.running_count() if agent is not None else 0


# The modules of the services built on first use (the reload check imports them all).
LAZY_MODULES = (
    "aetherd.services.search",
    "aetherd.services.git",
    "aetherd.services.transcript",
    "aetherd.agent.runner",
)


def import_lazy_modules() -> None:
    """Import the modules of the services built on first use (raises what they raise)."""
    for name in LAZY_MODULES:
        importlib.import_module(name)


def _has_active_tasks(path: Path) -> bool:
    """Whether the transcript at `path` holds tasks a previous run left active.

    No file (a workspace that never used the agent) is no: sqlite3 is not even
    imported. Otherwise one read-only query; a database it cannot read counts as yes,
    so that the agent's own start reports (or migrates) it as before.
    """
    if not path.exists():
        return False
    from aetherd.services.transcript import has_active_tasks

    return has_active_tasks(path)


def build_services(settings: Settings) -> Services:
    """Create every service for `settings` (not started yet)."""
    services = Services(settings)
    # Start order matters: later services may read earlier ones; stop runs in reverse.

    # -- config (the workspace config store) --
    services.config = services.add(ConfigStore(settings, services.jail))

    # -- files (file system operations, watcher) --
    services.fs = FileSystem(
        services.jail,
        FileLimits(
            max_file_size=settings.files_max_size,
            read_page_size=settings.files_read_page,
            max_list_entries=settings.files_list_max_entries,
            temp_max_age=settings.files_temp_max_age,
            loop_read_max=settings.files_loop_read_max,
        ),
    )
    services.watcher = None
    if settings.watcher_enabled:
        services.watcher = services.add(
            Watcher(
                settings.root,
                debounce=settings.watcher_debounce,
                max_watches=settings.watcher_max_watches,
                queue_size=settings.watcher_queue_size,
                max_events_per_second=settings.watcher_max_events_per_second,
                move_grace=settings.watcher_move_grace,
                extra_ignores=settings.watcher_ignore,
            )
        )

    # -- search (files/search and files/find; skips what the watcher ignores) --
    static_rules = IgnoreRules(settings.watcher_ignore)
    watcher = services.watcher

    def ignore_rules() -> tuple[list[str], list[str], list[str]]:
        rules = watcher.rules if watcher is not None else static_rules
        return sorted(rules.names), list(rules.name_globs), list(rules.path_globs)

    def build_search() -> None:
        from aetherd.services.search import SearchLimits, SearchService

        services.search = services.add(
            SearchService(
                services.jail,
                services.executors.search,
                SearchLimits(
                    timeout=settings.search_timeout,
                    max_file_size=settings.search_max_file_size,
                    max_reply_chars=settings.search_max_reply_chars,
                    max_concurrent=settings.search_max_concurrent,
                ),
                engine=settings.search_engine,
                rg_binary=settings.search_ripgrep,
                ignore_rules=ignore_rules,
            )
        )

    services.lazy(("search",), build_search)

    # -- terminal (PTY sessions) --
    services.terminals = services.add(TerminalManager(settings, services.jail))
    # Boot terminals are terminal sessions: the runner starts after the manager and
    # stops before it.
    launcher = SessionLauncher(services.terminals, services.jail)
    services.boot = services.add(BootRunner(settings, services.config, launcher, services.jail))

    # -- process (commands without a terminal) --
    services.processes = services.add(ProcessManager(settings, services.jail))

    # -- ports (port scanner) --
    services.ports = services.add(PortScanner(settings))

    # -- git (the real git binary; the root repository's watch for git/changed) --
    def build_git() -> None:
        from aetherd.services.git import GitService

        services.git = services.add(
            GitService(
                services.jail,
                binary=settings.git_binary,
                timeout=settings.git_timeout,
                max_output=settings.git_max_output,
                max_concurrent=settings.git_max_concurrent,
                watch_debounce=settings.git_watch_debounce,
                watch_max_dirs=settings.git_watch_max_dirs,
            )
        )

    services.lazy(("git",), build_git)

    # -- agent (transcript store, agent runner) --
    def build_agent() -> None:
        from aetherd.agent.runner import AgentRunner
        from aetherd.services.transcript import TranscriptStore

        services.transcript = services.add(
            TranscriptStore(
                settings.data_dir / "agent.sqlite3", commit_batch=settings.agent_commit_batch
            )
        )
        services.agent = services.add(
            AgentRunner(
                settings,
                services.jail,
                services.transcript,
                fs=services.fs,
                processes=services.processes,
            )
        )
        wire_agent_config(services.config, services.agent)

    services.lazy(("transcript", "agent"), build_agent)

    # -- operations (resources, metrics, notify) --
    services.resources = services.add(
        ResourceMonitor(
            settings.root, interval=settings.resources_interval, executor=services.executors.file
        )
    )
    if settings.idle_action:
        services.idle = services.add(
            IdleAction(
                services.activity,
                settings.idle_action,
                settings.idle_action_after,
                str(settings.root),
                services.running_tasks,
            )
        )

    wire_config(services)
    return services


@dataclass
class Daemon:
    """Process-wide state shared by every connection."""

    settings: Settings
    services: Services
    hub: Hub
    registry: Registry
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    # Set when the sockets are being closed for a shutdown or a reload: the close code
    # and reason that a socket upgraded from then on gets at once.
    closing: tuple[int, str] | None = None
    reloads: ReloadState | None = None  # set by serve(): generation, reload outcomes
