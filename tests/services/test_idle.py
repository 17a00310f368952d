"""The idle action runs once per idle period, and activity re-arms it."""

from __future__ import annotations

from pathlib import Path

from aetherd.services.activity import ActivityTracker
from aetherd.services.idle import IdleAction
from tests.support import wait_for


async def test_idle_action_runs_once_then_rearms(tmp_path: Path):
    activity = ActivityTracker()
    log = tmp_path / "idle.log"
    action = IdleAction(activity, f"echo idle >> {log}", after=0.2, cwd=str(tmp_path))
    await action.start()
    try:
        await wait_for(lambda: log.exists() and log.read_text().count("idle") == 1)
        activity.connection_opened()  # a client: not idle, re-armed
        await wait_for(lambda: activity.idle_seconds() == 0)
        activity.connection_closed()
        await wait_for(lambda: log.exists() and log.read_text().count("idle") == 2)
        assert action.fired == 2
    finally:
        await action.stop()


async def test_idle_action_waits_for_running_tasks(tmp_path: Path):
    activity = ActivityTracker()
    running = [1]
    marker = tmp_path / "fired"
    action = IdleAction(
        activity, f"touch {marker}", after=0.1, cwd=str(tmp_path), running_tasks=lambda: running[0]
    )
    await action.start()
    try:
        # While a task runs the workspace is busy: many checks pass and nothing fires.
        await wait_for(lambda: action.checks >= 6)
        assert action.fired == 0 and not marker.exists()
        running[0] = 0
        await wait_for(marker.exists)
    finally:
        await action.stop()


async def test_daemon_wires_the_idle_action(start_daemon, tmp_path: Path):
    marker = tmp_path / "idle-marker"
    running = await start_daemon(idle_action=f"touch {marker}", idle_action_after=0.2)
    assert running.daemon.services.idle is not None
    await wait_for(marker.exists)
