"""The daemon's event loop: uvloop when installed, asyncio's when asked or without it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aetherd.errors import SettingsError
from aetherd.eventloop import loop_factory, loop_name, run
from tests.support import aetherd_command, child_env, read_port

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed here")


async def _which() -> str:
    return loop_name(asyncio.get_running_loop())


@needs_uvloop
def test_auto_takes_uvloop_when_installed() -> None:
    assert loop_factory("auto")[1] == "uvloop"
    assert run(_which(), "auto") == "uvloop"
    assert run(_which(), "uvloop") == "uvloop"


def test_asyncio_is_always_available() -> None:
    factory, name = loop_factory("asyncio")
    assert name == "asyncio" and factory is asyncio.new_event_loop
    assert run(_which(), "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert loop_factory("auto")[1] == "asyncio"
    assert run(_which(), "auto") == "asyncio"
    coro = _which()
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        run(coro, "uvloop")
    assert coro.cr_frame is None  # closed, so no "never awaited" warning


def test_an_unknown_loop_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="unknown loop"):
        loop_factory("trio")


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice", ["default", "asyncio", pytest.param("uvloop", marks=needs_uvloop)]
)
def test_the_daemon_runs_on_the_chosen_loop_and_says_so(tmp_path: Path, choice: str) -> None:
    """A real daemon process: the `listening` line names its loop (asyncio's by default,
    even with uvloop installed)."""
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.Popen(
        [
            *aetherd_command(),
            "serve",
            "--port",
            "0",
            "--root",
            str(root),
            "--data-dir",
            str(tmp_path / "data"),
            "--token",
            "loop-test-token-0123456789",
            "--log-format",
            "json",
            *([] if choice == "default" else ["--event-loop", choice]),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(tmp_path),
    )
    try:
        _, lines = read_port(proc, timeout=30)
        listening = json.loads(lines[-1])
        assert listening["eventLoop"] == ("asyncio" if choice == "default" else choice)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
    assert proc.returncode == 0


def test_a_missing_uvloop_stops_the_daemon_with_a_settings_error(tmp_path: Path) -> None:
    """`--event-loop uvloop` without uvloop: exit status 2 and one clear line."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop blocked for this test')\n")
    env = child_env(tmp_path)
    env["PYTHONPATH"] = f"{blocker}:{env['PYTHONPATH']}"
    done = subprocess.run(
        [
            *aetherd_command(),
            "serve",
            "--port",
            "0",
            "--root",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "data"),
            "--token",
            "loop-test-token-0123456789",
            "--event-loop",
            "uvloop",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "uvloop is not installed" in done.stderr
