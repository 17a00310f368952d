"""`aetherd init`: reaps orphans, forwards SIGTERM, exits with the daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import REPO, child_env

WAIT = 20.0


def _wait_until(predicate, timeout: float = WAIT, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met")


def _zombies_of(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_orphans_are_reaped_and_exit_code_is_passed_through(tmp_path: Path):
    marker = tmp_path / "orphan.pid"
    # The "daemon": its helper shell backgrounds a grandchild and exits at once, so the
    # grandchild is orphaned (as shells in terminals do), then the daemon waits.
    script = (
        "import os, subprocess, sys, time\n"
        f"subprocess.run(['sh', '-c', 'sh -c \\'echo $$ > {marker}; sleep 1\\' &'])\n"
        "deadline = time.time() + 15\n"
        f"while not os.path.exists('{marker}.done') and time.time() < deadline: time.sleep(0.05)\n"
        "sys.exit(7)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aetherd", "init", "--", sys.executable, "-c", script],
        cwd=tmp_path,
        env=child_env(tmp_path),
    )
    try:
        orphan_pid = int(_wait_until(lambda: marker.exists() and marker.read_text().strip()))
        # Its parent shell exited: the orphan is re-parented to init...
        _wait_until(lambda: psutil.Process(orphan_pid).ppid() == proc.pid)
        # ...and once it exits, init reaps it: it never lingers as a zombie.
        _wait_until(lambda: not psutil.pid_exists(orphan_pid))
        assert _zombies_of(proc.pid) == []
        (tmp_path / "orphan.pid.done").write_text("")
        assert proc.wait(WAIT) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sigterm_is_forwarded_to_the_daemon(tmp_path: Path):
    ready = tmp_path / "ready"
    script = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        f"pathlib.Path('{ready}').write_text('x')\n"
        "deadline = time.time() + 15\n"
        "while time.time() < deadline: time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "aetherd", "init", "--", sys.executable, "-c", script],
        env=child_env(tmp_path),
    )
    try:
        _wait_until(ready.exists)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_real_pid1_in_a_pid_namespace(tmp_path: Path):
    """Under `unshare --pid`, init really is PID 1, and passes the daemon's status through."""
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    )
    assert probe.returncode == 0, f"unshare is needed for this test: {probe.stderr!r}"
    out = tmp_path / "pid"
    script = (
        "import os, subprocess, sys, time\n"
        f"open('{out}', 'w').write(str(os.getppid()))\n"
        "subprocess.Popen(['sh', '-c', 'sleep 0.2'])\n"  # never waited for: an orphan-to-be
        "time.sleep(0.5)\n"
        "sys.exit(3)\n"
    )
    env = child_env(tmp_path)
    result = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "aetherd",
            "init",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        env=env,
        cwd=REPO,
        timeout=WAIT,
    )
    assert out.read_text() == "1"  # the daemon's parent was init, as PID 1
    assert result.returncode == 3
