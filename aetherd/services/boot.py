"""Boot terminals: `setup` once, `setup_on_boot` at start, autostart terminals kept running.

`BootRunner` follows the workspace config (`ConfigStore.subscribe`) and drives
terminal sessions through a `TerminalLauncher`, a small interface the terminal
manager implements, so the sessions are ordinary terminal sessions a client can
attach to:

- `setup` runs in the session `boot:setup-once` when the daemon starts, unless the
  same command already succeeded once (remembered in `<data_dir>/config/setup-done`
  by the command's hash, so an edited `setup` runs again, once).
- `setup_on_boot` runs in the session `boot:setup` at every daemon start, after `setup`.
- Then every terminal with `autostart: true` runs as `boot:<name>`, supervised with its
  `restart` policy: `never`, `on-failure` (exit code other than 0, or killed by a
  signal), `always`; restarts wait `boot_restart_delay * 2**n`, capped at
  `boot_restart_max_delay`; a run that lasted `boot_restart_reset` resets `n`.
- On a config change: new terminals start, removed ones stop, and ones whose command,
  cwd, environment or restart policy changed restart. `setup` and `setup_on_boot` are
  read at daemon start only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aetherd.config_model import TerminalSpec, WorkspaceConfig
from aetherd.services.config import ConfigStore
from aetherd.services.jail import Jail
from aetherd.services.terminal import TerminalManager
from aetherd.settings import Settings

log = logging.getLogger("aetherd.boot")

SETUP_ONCE_SESSION = "boot:setup-once"
SETUP_SESSION = "boot:setup"
SESSION_PREFIX = "boot:"


class TerminalLauncher(Protocol):
    """What the BootRunner needs from the terminal manager."""

    async def start(self, session_id: str, command: str, cwd: Path, env: dict[str, str]) -> None:
        """Start `command` (a shell command line) as the session `session_id`.

        `env` holds only the config's variables; the launcher adds them over its own
        base environment. Raises if the session cannot start.
        """

    async def stop(self, session_id: str) -> None:
        """End the session and its process group; a no-op when it is unknown or over."""

    async def wait(self, session_id: str) -> int | None:
        """Wait for the session's command to end: its exit code, None if a signal ended it."""


class SessionLauncher:
    """The TerminalLauncher over the real terminal manager: boot terminals are PTY
    sessions (`boot:<name>`), listed in `terminal/sessions`, that clients can attach to."""

    def __init__(self, terminals: TerminalManager, jail: Jail) -> None:
        self.terminals = terminals
        self.jail = jail

    @property
    def reloaded(self) -> bool:
        """True when this process took its sessions over from a reload (not a boot)."""
        return self.terminals.reloaded

    async def start(self, session_id: str, command: str, cwd: Path, env: dict[str, str]) -> None:
        """Start the session, replacing an exited one of the same id (a restart).

        A live session of that id handed over by a reload is the terminal already: kept.
        """
        existing = self.terminals.find(session_id)
        if existing is not None and existing.alive and existing.adopted:
            return
        self.terminals.discard(session_id)
        await self.terminals.create(
            session_id, command=command, cwd=self.jail.to_wire(cwd), env=env
        )

    async def stop(self, session_id: str) -> None:
        """End the session's process group; nothing when it is unknown or over."""
        session = self.terminals.find(session_id)
        if session is not None and session.alive:
            await self.terminals.close(session_id)

    async def wait(self, session_id: str) -> int | None:
        """The exit code of the session's command (None when a signal ended it)."""
        session = self.terminals.find(session_id)
        if session is None:
            return None
        return (await session.wait()).exit_code


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """The delay before restart number `failures + 1`: base * 2**failures, at most cap."""
    return min(cap, base * float(2 ** min(failures, 62)))


@dataclass
class TerminalStatus:
    """What a boot terminal is doing (for status reports and tests)."""

    session_id: str
    state: str = "starting"  # starting | running | backoff | exited | failed | stopped
    starts: int = 0
    last_exit: int | None = None
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=16))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "sessionId": self.session_id,
            "state": self.state,
            "starts": self.starts,
            "lastExit": self.last_exit,
            "delays": list(self.delays),
        }


@dataclass
class _Running:
    key: tuple[Any, ...]
    task: asyncio.Task[None]
    status: TerminalStatus


class BootRunner:
    """Runs the config's setup commands and autostart terminals through a launcher."""

    def __init__(
        self,
        settings: Settings,
        store: ConfigStore,
        launcher: TerminalLauncher,
        jail: Jail | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.jail = jail or Jail(settings.root)
        self.setup_marker = settings.data_dir / "config" / "setup-done"
        self.setup_result: dict[str, int | None] = {}  # session id → exit code of this boot
        self.booted = False  # the setup phase is over and terminals are managed
        self.applied = 0  # configs applied to the terminals so far (a marker for tests)
        self._terminals: dict[str, _Running] = {}
        self._pending: WorkspaceConfig | None = None
        self._changed = asyncio.Event()
        self._unsubscribe: Any = None
        self._stopping = False
        self._main: asyncio.Task[None] | None = None

    # -- public API ------------------------------------------------------------------
    def status(self) -> dict[str, dict[str, Any]]:
        """Each managed terminal's status, by name."""
        return {name: run.status.as_dict() for name, run in self._terminals.items()}

    async def start(self) -> None:
        """Follow the config: run the setups, then start and supervise the terminals."""
        self._stopping = False
        self._unsubscribe = self.store.subscribe(self._on_config)
        self._main = asyncio.create_task(self._run(), name="boot-runner")

    async def stop(self) -> None:
        """Stop following the config and stop every boot session."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stopping = True  # checked by the loop too, should a cancellation be lost
        self._changed.set()
        if self._main is not None:
            self._main.cancel()
            await asyncio.wait({self._main}, timeout=self.settings.shutdown_timeout)
            self._main = None
        await asyncio.gather(
            *(self._stop_terminal(name) for name in list(self._terminals)),
            return_exceptions=True,
        )

    # -- internals -------------------------------------------------------------------
    def _on_config(self, config: WorkspaceConfig) -> None:
        self._pending = config
        self._changed.set()

    async def _run(self) -> None:
        await self._changed.wait()
        config = self._pending or self.store.current
        await self._run_setups(config)
        self.booted = True
        while not self._stopping:
            await self._changed.wait()
            self._changed.clear()
            if self._stopping:
                return
            config = self._pending or self.store.current
            try:
                await self._reconcile(config)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying the boot terminals failed")
            self.applied += 1

    def _base_env(self, config: WorkspaceConfig) -> dict[str, str]:
        return dict(config.env)

    async def _run_setups(self, config: WorkspaceConfig) -> None:
        if getattr(self.launcher, "reloaded", False):
            log.info("reload, not a boot: setup commands skipped")
            return
        root = self.jail.root
        env = self._base_env(config)
        if config.setup:
            digest = hashlib.sha256(config.setup.encode()).hexdigest()
            done = await asyncio.to_thread(self._setup_done, digest)
            if done:
                log.info("setup already ran once; skipped")
            else:
                code = await self._run_once(SETUP_ONCE_SESSION, config.setup, root, env)
                if code == 0:
                    await asyncio.to_thread(self._remember_setup, digest)
                else:
                    log.warning("setup failed (exit %s); it will run again at next start", code)
        if config.setup_on_boot:
            code = await self._run_once(SETUP_SESSION, config.setup_on_boot, root, env)
            if code != 0:
                log.warning("setup_on_boot failed (exit %s)", code)

    async def _run_once(
        self, session_id: str, command: str, cwd: Path, env: dict[str, str]
    ) -> int | None:
        try:
            await self.launcher.start(session_id, command, cwd, env)
        except Exception as exc:
            log.warning("cannot start %s: %s", session_id, exc)
            self.setup_result[session_id] = None
            return None
        try:
            code = await self.launcher.wait(session_id)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.launcher.stop(session_id))
            raise
        self.setup_result[session_id] = code
        return code

    def _setup_done(self, digest: str) -> bool:
        try:
            return self.setup_marker.read_text().strip() == digest
        except OSError:
            return False

    def _remember_setup(self, digest: str) -> None:
        self.setup_marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.setup_marker.with_suffix(".tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, self.setup_marker)

    def _launch_plan(
        self, config: WorkspaceConfig, spec: TerminalSpec
    ) -> tuple[Path, dict[str, str]] | None:
        try:
            cwd = self.jail.resolve(spec.cwd or "/")
        except Exception as exc:
            log.warning("boot terminal %s: bad cwd: %s", spec.name, exc)
            return None
        env = self._base_env(config)
        if spec.port is not None:
            env["PORT"] = str(spec.port)
        env.update(spec.env)
        return cwd, env

    async def _reconcile(self, config: WorkspaceConfig) -> None:
        desired: dict[str, tuple[TerminalSpec, Path, dict[str, str]] | None] = {}
        for spec in config.terminals:
            if spec.autostart:
                plan = self._launch_plan(config, spec)
                desired[spec.name] = (spec, *plan) if plan is not None else None
        for name in list(self._terminals):
            if name not in desired:
                log.info("boot terminal %s removed; stopping it", name)
                await self._stop_terminal(name)
        for name, entry in desired.items():
            if entry is None:
                await self._stop_terminal(name)
                self._terminals[name] = _Running(
                    (), _done_task(), TerminalStatus(SESSION_PREFIX + name, state="failed")
                )
                continue
            spec, cwd, env = entry
            key = (spec.command, str(cwd), tuple(sorted(env.items())), spec.restart)
            running = self._terminals.get(name)
            if running is not None and running.key == key:
                continue
            if running is not None:
                log.info("boot terminal %s changed; restarting it", name)
                await self._stop_terminal(name)
            status = TerminalStatus(SESSION_PREFIX + name)
            task = asyncio.create_task(self._supervise(spec, cwd, env, status), name=f"boot-{name}")
            self._terminals[name] = _Running(key, task, status)

    async def _stop_terminal(self, name: str) -> None:
        running = self._terminals.pop(name, None)
        if running is None:
            return
        running.task.cancel()
        await asyncio.wait({running.task}, timeout=self.settings.shutdown_timeout)
        if running.key:
            try:
                await self.launcher.stop(running.status.session_id)
            except Exception:
                log.exception("stopping %s failed", running.status.session_id)
        running.status.state = "stopped"

    async def _supervise(
        self, spec: TerminalSpec, cwd: Path, env: dict[str, str], status: TerminalStatus
    ) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        failures = 0
        while True:
            began = loop.time()
            status.state = "starting"
            try:
                await self.launcher.start(status.session_id, spec.command, cwd, env)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot start %s: %s", status.session_id, exc)
                code: int | None = None
            else:
                status.starts += 1
                status.state = "running"
                code = await self.launcher.wait(status.session_id)
            status.last_exit = code
            if spec.restart == "never" or (spec.restart == "on-failure" and code == 0):
                status.state = "exited" if code == 0 else "failed"
                return
            if loop.time() - began >= settings.boot_restart_reset:
                failures = 0
            delay = backoff_delay(
                failures, settings.boot_restart_delay, settings.boot_restart_max_delay
            )
            failures += 1
            status.delays.append(delay)
            status.state = "backoff"
            log.info("%s exited (%s); restarting in %.2fs", status.session_id, code, delay)
            await asyncio.sleep(delay)


def _done_task() -> asyncio.Task[None]:
    async def nothing() -> None:
        return None

    return asyncio.ensure_future(nothing())
