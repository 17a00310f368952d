"""BootRunner with a real launcher: commands run as real subprocesses in their own groups."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from aetherd.services.boot import SETUP_ONCE_SESSION, SETUP_SESSION, BootRunner, backoff_delay
from aetherd.services.config import ConfigStore
from tests.support import wait_for


class ProcessLauncher:
    """The TerminalLauncher interface on plain subprocesses (no PTY), for these tests."""

    def __init__(self) -> None:
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.log: list[tuple[str, str]] = []
        self.commands: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}

    async def start(self, session_id: str, command: str, cwd: Path, env: dict[str, str]) -> None:
        old = self.procs.get(session_id)
        if old is not None and old.returncode is None:
            raise RuntimeError(f"{session_id} is already running")
        proc = await asyncio.create_subprocess_shell(
            command,
            cwd=cwd,
            env={**os.environ, "HOME": str(cwd), **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[session_id] = proc
        self.commands[session_id] = command
        self.envs[session_id] = env
        self.log.append(("start", session_id))

    async def stop(self, session_id: str) -> None:
        proc = self.procs.get(session_id)
        if proc is None or proc.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), 5)
                break
            except asyncio.TimeoutError:
                continue
        self.log.append(("stop", session_id))

    async def wait(self, session_id: str) -> int | None:
        code = await self.procs[session_id].wait()
        return code if code >= 0 else None

    async def close(self) -> None:
        for session_id in list(self.procs):
            await self.stop(session_id)

    def starts(self, session_id: str) -> int:
        return self.log.count(("start", session_id))


@pytest.fixture
async def boot(make_settings, workspace):
    made: list[tuple[ConfigStore, BootRunner, ProcessLauncher]] = []

    async def make(yaml_text: str | None = None, **overrides):
        if yaml_text is not None:
            path = workspace / ".aether" / "config.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml_text)
        values = {
            "config_debounce": 0.05,
            "config_poll_interval": 0,
            "boot_restart_delay": 0.01,
            "boot_restart_max_delay": 0.04,
            "boot_restart_reset": 60,
        }
        values.update(overrides)
        settings = make_settings(**values)
        store = ConfigStore(settings)
        launcher = ProcessLauncher()
        runner = BootRunner(settings, store, launcher)
        made.append((store, runner, launcher))
        await store.start()
        await runner.start()
        return store, runner, launcher

    yield make
    for store, runner, launcher in made:
        await runner.stop()
        await launcher.close()
        await store.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 0.5, 5) for n in range(6)] == [0.5, 1, 2, 4, 5, 5]
    assert backoff_delay(10_000, 1, 60) == 60


async def test_setups_then_terminals_with_cwd_and_env(boot, workspace):
    (workspace / "app").mkdir()
    config = (
        "setup: echo once >> setup.txt\n"
        'setup_on_boot: echo "$GREETING" > boot.txt\n'
        "env: {GREETING: hello, SHARED: base}\n"
        "terminals:\n"
        "  - name: web\n    cwd: app\n    port: 3000\n    env: {SHARED: mine}\n"
        '    command: echo "$PORT $SHARED $GREETING" > web.txt; exec sleep 60\n'
        "  - name: manual\n    command: exit 0\n    autostart: false\n"
    )
    _, runner, launcher = await boot(config)
    await wait_for(
        lambda: (
            (workspace / "app" / "web.txt").exists()
            and (workspace / "app" / "web.txt").read_text() != ""
        )
    )
    assert (workspace / "app" / "web.txt").read_text() == "3000 mine hello\n"
    assert (workspace / "boot.txt").read_text() == "hello\n"
    assert (workspace / "setup.txt").read_text() == "once\n"
    assert launcher.log[:3] == [
        ("start", SETUP_ONCE_SESSION),
        ("start", SETUP_SESSION),
        ("start", "boot:web"),
    ]
    assert runner.setup_result == {SETUP_ONCE_SESSION: 0, SETUP_SESSION: 0}
    assert "boot:manual" not in launcher.procs and set(runner.status()) == {"web"}
    assert runner.status()["web"]["state"] == "running"


async def test_setup_runs_once_across_restarts(boot, workspace):
    config = "setup: echo ran >> setup.txt\nsetup_on_boot: echo boot >> boot.txt\n"
    store, runner, _ = await boot(config)
    await wait_for(lambda: runner.booted)
    await runner.stop()
    await store.stop()
    _, second, launcher = await boot()  # a daemon restart with the same data dir
    await wait_for(lambda: second.booted)
    assert SETUP_ONCE_SESSION not in launcher.procs
    assert (workspace / "setup.txt").read_text() == "ran\n"
    assert (workspace / "boot.txt").read_text() == "boot\nboot\n"  # setup_on_boot: every boot
    # An edited setup command is a new setup: it runs (once) at the next start.
    (workspace / ".aether" / "config.yaml").write_text("setup: echo new >> setup.txt\n")
    _, third, _ = await boot()
    await wait_for(lambda: third.booted)
    assert (workspace / "setup.txt").read_text() == "ran\nnew\n"


async def test_failed_setup_is_not_remembered(boot, workspace):
    store, runner, _ = await boot("setup: echo try >> setup.txt; exit 3\n")
    await wait_for(lambda: runner.booted)
    assert runner.setup_result[SETUP_ONCE_SESSION] == 3
    await runner.stop()
    await store.stop()
    _, again, _ = await boot()
    await wait_for(lambda: again.booted)
    assert (workspace / "setup.txt").read_text() == "try\ntry\n"


COUNTER = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; "


async def test_restart_never_runs_once(boot, workspace):
    _, runner, launcher = await boot(
        f"terminals:\n  - name: t\n    restart: never\n    command: '{COUNTER}exit 1'\n"
    )
    await wait_for(lambda: runner.status().get("t", {}).get("state") == "failed")
    assert runner._terminals["t"].task.done()  # the supervisor ended: no restart can follow
    assert launcher.starts("boot:t") == 1 and (workspace / "count").read_text() == "1\n"
    assert runner.status()["t"]["lastExit"] == 1


async def test_restart_on_failure_until_success(boot, workspace):
    command = f"{COUNTER}" + '[ "$n" -ge 3 ] && exit 0; exit 7'
    _, runner, launcher = await boot(
        f"terminals:\n  - name: t\n    restart: on-failure\n    command: '{command}'\n"
    )
    await wait_for(lambda: runner.status().get("t", {}).get("state") == "exited")
    status = runner.status()["t"]
    assert status["starts"] == 3 and status["lastExit"] == 0
    assert status["delays"] == [0.01, 0.02]
    assert launcher.starts("boot:t") == 3


async def test_killed_by_a_signal_counts_as_failure(boot, workspace):
    command = f"{COUNTER}" + '[ "$n" -ge 2 ] && exit 0; kill -9 $$'
    _, runner, _ = await boot(
        f"terminals:\n  - name: t\n    restart: on-failure\n    command: '{command}'\n"
    )
    await wait_for(lambda: runner.status().get("t", {}).get("state") == "exited")
    assert runner.status()["t"]["starts"] == 2


async def test_restart_always_backs_off_with_a_cap(boot, workspace):
    _, runner, launcher = await boot(
        f"terminals:\n  - name: t\n    restart: always\n    command: '{COUNTER}exit 0'\n"
    )
    await wait_for(lambda: launcher.starts("boot:t") >= 5)
    assert runner.status()["t"]["delays"][:4] == [0.01, 0.02, 0.04, 0.04]


async def test_config_changes_start_stop_and_restart_terminals(boot, workspace):
    def terminal(name: str, tag: str) -> str:
        return f"  - name: {name}\n    command: echo {tag} > {name}.tag; echo $$ > {name}.pid; exec sleep 60\n"

    store, runner, launcher = await boot("terminals:\n" + terminal("a", "a1") + terminal("b", "b1"))
    await wait_for(lambda: (workspace / "a.pid").exists() and (workspace / "b.pid").exists())
    await wait_for(lambda: all((workspace / f"{n}.pid").read_text() for n in "ab"))
    pid_a, pid_b = read_pid(workspace / "a.pid"), read_pid(workspace / "b.pid")
    (workspace / "b.pid").unlink()
    await store.set(raw="terminals:\n" + terminal("b", "b2") + terminal("c", "c1"))
    await wait_for(lambda: (workspace / "c.pid").exists() and (workspace / "b.pid").exists())
    await wait_for(lambda: not alive(pid_a) and not alive(pid_b))
    await wait_for(lambda: (workspace / "b.tag").read_text() == "b2\n")
    assert set(runner.status()) == {"b", "c"}
    assert ("stop", "boot:a") in launcher.log and ("stop", "boot:b") in launcher.log
    assert launcher.starts("boot:b") == 2 and launcher.starts("boot:c") == 1
    # An env change restarts the terminals that see it; an unrelated edit restarts none.
    await store.set(
        raw="terminals:\n"
        + terminal("b", "b2")
        + terminal("c", "c1")
        + "ports:\n  80: {label: x}\n"
    )
    await store.set(raw="env: {X: '1'}\nterminals:\n" + terminal("b", "b2") + terminal("c", "c1"))
    await wait_for(lambda: launcher.starts("boot:c") == 2 and launcher.starts("boot:b") == 3)
    assert launcher.envs["boot:c"] == {"X": "1"}


async def test_disk_edit_adds_a_terminal(boot, workspace):
    _, runner, launcher = await boot("env: {}\n")
    await wait_for(lambda: runner.booted)
    (workspace / ".aether" / "config.yaml").write_text(
        "terminals:\n  - name: late\n    command: echo $$ > late.pid; exec sleep 60\n"
    )
    await wait_for(lambda: (workspace / "late.pid").exists())
    assert launcher.starts("boot:late") == 1


async def test_stop_ends_every_boot_session(boot, workspace):
    _, runner, _ = await boot(
        "terminals:\n  - name: s\n    restart: always\n    command: echo $$ > s.pid; exec sleep 60\n"
    )
    await wait_for(lambda: (workspace / "s.pid").exists() and (workspace / "s.pid").read_text())
    pid = read_pid(workspace / "s.pid")
    await runner.stop()
    assert not alive(pid)  # stop() returns once the session's process is gone
    assert runner.status() == {}


async def test_a_cwd_outside_the_root_is_refused(boot, workspace):
    _, runner, launcher = await boot(
        "terminals:\n  - name: out\n    cwd: ../..\n    command: touch escaped\n"
    )
    await wait_for(lambda: "out" in runner.status())
    assert runner.status()["out"]["state"] == "failed"
    assert "boot:out" not in launcher.procs
