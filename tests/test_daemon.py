"""The services container: the search, git and agent services are built on first use.

An idle daemon has none of them (tests/test_imports.py checks that it has not even
imported their modules); each channel's first request builds and starts its service,
and the agent also starts at boot when its transcript holds tasks a crash left active.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

import aetherd
from aetherd.services.transcript import TranscriptStore, has_active_tasks
from tests.support import child_env, wait_for

LAZY = ("search", "git", "agent", "transcript")


def built(running, name: str):
    return running.daemon.services.built(name)


async def metrics_text(running) -> str:
    async with aiohttp.ClientSession() as session, session.get(running.url("/metrics")) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_a_ready_daemon_has_not_built_the_lazy_services(start_daemon):
    running = await start_daemon()
    assert running.daemon.ready
    assert [name for name in LAZY if built(running, name) is not None] == []
    # /metrics does not build them either: their series appear once they exist.
    text = await metrics_text(running)
    assert "aetherd_connections" in text or "aetherd_" in text
    assert "aetherd_git_" not in text and "aetherd_agent_" not in text
    assert [name for name in LAZY if built(running, name) is not None] == []


async def test_the_first_connection_starts_the_agent_and_each_first_request_its_service(
    start_daemon, workspace
):
    running = await start_daemon()
    client = await running.connect()
    page = await client.expect_type("agent", "history")
    assert page["events"] == [] and page["latestSeq"] == 0
    agent = built(running, "agent")
    assert agent is not None and built(running, "transcript") is not None
    assert agent._started  # started, not only built: a prompt is accepted
    assert built(running, "git") is None and built(running, "search") is None
    (workspace / "needle.txt").write_text("a haystack with a needle\n")
    reply = await client.request("files", "search", query="needle")
    assert reply["success"] is True, reply
    assert [m["path"] for m in reply["data"]["matches"]] == ["/needle.txt"]
    assert built(running, "search") is not None
    reply = await client.request("git", "status")
    assert reply["success"] is False and reply["code"] == "NOT_A_REPOSITORY", reply
    assert built(running, "git") is not None
    text = await metrics_text(running)
    assert "aetherd_git_commands_total " in text and "aetherd_git_watching 1.0" in text
    assert "aetherd_agent_tasks_running 0.0" in text


async def _transcript_with(path, status: str) -> None:
    store = TranscriptStore(path)
    await store.start()
    try:
        await store.create_task("t1", "hello", None, None, status)
        await store.flush()
    finally:
        await store.stop()


async def test_a_task_a_crash_left_running_is_failed_at_boot_without_a_client(
    start_daemon, make_settings
):
    path = make_settings().data_dir / "agent.sqlite3"
    await _transcript_with(path, "running")
    assert has_active_tasks(path)
    running = await start_daemon()
    assert built(running, "agent") is not None

    def status() -> tuple[str, str]:
        conn = sqlite3.connect(path)
        try:
            return conn.execute("SELECT status, error FROM tasks WHERE task_id='t1'").fetchone()
        finally:
            conn.close()

    await wait_for(lambda: status()[0] == "failed")
    assert status() == ("failed", "daemon restarted")
    assert not has_active_tasks(path)


async def test_finished_tasks_leave_the_agent_unbuilt(start_daemon, make_settings):
    path = make_settings().data_dir / "agent.sqlite3"
    await _transcript_with(path, "completed")
    assert not has_active_tasks(path)
    running = await start_daemon()
    assert built(running, "agent") is None


def test_an_unreadable_transcript_counts_as_work(tmp_path):
    path = tmp_path / "agent.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    assert has_active_tasks(path)  # the agent's own start then reports it


def _reload_check(tmp_path: Path, code: Path) -> subprocess.CompletedProcess[str]:
    """`AETHERD_RELOAD_CHECK=1 aetherd serve …` (what a reload runs) on the code in `code`."""
    (tmp_path / "root").mkdir(exist_ok=True)
    env = child_env(tmp_path, AETHERD_RELOAD_CHECK="1")
    env["PYTHONPATH"] = str(code)
    return subprocess.run(
        [sys.executable, "-m", "aetherd", "serve", "--token", "t", "--root", str(tmp_path / "root"),
         "--data-dir", str(tmp_path / "data")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_reload_check_imports_what_is_built_on_first_use(tmp_path):
    code = tmp_path / "code"
    shutil.copytree(
        Path(aetherd.__file__).parent,
        code / "aetherd",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    passed = _reload_check(tmp_path, code)
    assert passed.returncode == 0 and "reload check passed" in passed.stdout, passed.stderr
    # A new version whose git service (imported only at the first git request) is broken.
    (code / "aetherd" / "services" / "git.py").write_text("raise ImportError('broken git')\n")
    refused = _reload_check(tmp_path, code)
    assert refused.returncode != 0 and "broken git" in refused.stderr
    # The running daemon's fingerprint covers that file although it never imported it.
    from aetherd.reload import code_fingerprint

    fingerprint = code_fingerprint() or ()
    assert str(Path(aetherd.__file__).parent / "services" / "git.py") in {f[0] for f in fingerprint}
