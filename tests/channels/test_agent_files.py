"""The agent's file tools on a hostile workspace, end to end.

A real daemon, a real socket, the fake OpenAI-compatible provider on loopback, and
`auto` permission mode (file writes need no approval): the model asks for writes and
reads that a planted symlink or a FIFO would once have turned against the daemon.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from aetherd.services.fileio import TEMP_PREFIX
from tests.channels.test_agent import KEY_VARS, history, task_events
from tests.fake_providers import FakeProvider, ToolUse, Turn
from tests.support import wait_for


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def openai():
    provider = await FakeProvider("openai").start()
    yield provider
    await provider.close()


async def start(start_daemon, provider: FakeProvider, **overrides):
    return await start_daemon(
        agent_provider="openai",
        openai_api_key="sk-oai-test",
        openai_base_url=provider.base_url,
        agent_permission_mode="auto",
        agent_retry_base_delay=0.01,
        agent_retry_max_delay=0.05,
        **overrides,
    )


def results(events) -> dict[str, dict]:
    return {e["toolCallId"]: e for e in events if e["type"] == "tool_result"}


async def test_planted_temp_symlinks_cannot_redirect_the_agents_writes(
    start_daemon, openai, workspace, tmp_path
):
    """Defect 1: `.{name}.aetherd-agent-{pid}.tmp` was opened with a plain open()."""
    outside = tmp_path / "outside.txt"
    outside.write_text("SECRET")
    os.chmod(outside, 0o600)
    before = outside.stat()
    (workspace / "a.txt").write_text("old\n")
    os.chmod(workspace / "a.txt", 0o640)
    # The old predictable names, for this process and plausible others, plus a few
    # names in the shape of the new temp files: all point outside the root.
    planted = [f".a.txt.aetherd-agent-{pid}.tmp" for pid in (os.getpid(), 1, 2, 100, 4242)]
    planted += [f".b.txt.aetherd-agent-{os.getpid()}.tmp", ".a.txt.tmp", "a.txt.tmp"]
    planted += [f"{TEMP_PREFIX}{'0' * 16}.upd", f"{TEMP_PREFIX}{'0' * 16}.new"]
    for name in planted:
        os.symlink(outside, workspace / name)
    write = ToolUse("write_file", json.dumps({"path": "/a.txt", "content": "new A\n"}))
    create = ToolUse("write_file", json.dumps({"path": "/b.txt", "content": "new B\n"}))
    edit = ToolUse(
        "edit_file", json.dumps({"path": "/a.txt", "old_string": "new", "new_string": "NEW"})
    )
    openai.add(Turn(tools=[write, create]), Turn(tools=[edit]), Turn(text=["done"]))
    running = await start(start_daemon, openai)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "write", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "completed"
    got = results(events)
    assert [got[t.id]["isError"] for t in (write, create, edit)] == [False] * 3, got
    # The outside file: same content, same mode, same inode.
    assert outside.read_text() == "SECRET"
    after = outside.stat()
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_ino == before.st_ino
    # The writes landed inside, the existing file's mode kept, the planted links intact.
    assert (workspace / "a.txt").read_text() == "NEW A\n"
    assert stat.S_IMODE((workspace / "a.txt").stat().st_mode) == 0o640
    assert (workspace / "b.txt").read_text() == "new B\n"
    for name in planted:
        assert os.readlink(workspace / name) == str(outside)
    leftovers = [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]
    assert sorted(leftovers) == sorted(n for n in planted if n.startswith(TEMP_PREFIX))


async def test_the_agents_edit_of_an_existing_file_is_a_modify(start_daemon, openai, workspace):
    """One writer for everyone: the watcher sees the agent's edit as the files channel's."""
    (workspace / "notes.md").write_text("one\n")
    edit = ToolUse(
        "edit_file", json.dumps({"path": "/notes.md", "old_string": "one", "new_string": "two"})
    )
    openai.add(Turn(tools=[edit]), Turn(text=["ok"]))
    running = await start(start_daemon, openai, watcher_debounce=0.02)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "edit", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert not results(events)[edit.id]["isError"]
    frame = await client.expect_type("files", "change", path="/notes.md")
    assert frame["action"] == "modify"
    assert (workspace / "notes.md").read_text() == "two\n"


async def test_fifos_fail_the_agents_read_and_grep_at_once(start_daemon, openai, workspace):
    """Defect 2: read_file and grep opened a FIFO without O_NONBLOCK and hung a thread."""
    os.mkfifo(workspace / "pipe")
    (workspace / "text.txt").write_text("needle here\n")
    reads = [ToolUse("read_file", json.dumps({"path": "/pipe"})) for _ in range(20)]
    grep = ToolUse("grep", json.dumps({"pattern": "needle"}))
    grep_fifo = ToolUse("grep", json.dumps({"pattern": "x", "path": "/pipe"}))
    edit = ToolUse("edit_file", json.dumps({"path": "/pipe", "old_string": "a", "new_string": "b"}))
    openai.add(Turn(tools=[*reads, grep, grep_fifo, edit]), Turn(text=["ok"]))
    running = await start(start_daemon, openai, file_io_threads=4)
    client = await running.connect()
    await history(client)
    await client.send({"channel": "agent", "type": "prompt", "prompt": "read", "taskId": "t1"})
    events = await task_events(client, "t1")
    assert events[-1]["status"] == "completed"
    got = results(events)
    for tool in reads:
        assert got[tool.id]["isError"] and "not a regular file" in got[tool.id]["error"]
    assert got[grep.id]["result"] == "/text.txt:1: needle here"
    assert got[grep_fifo.id]["result"] == "no matches"
    assert got[edit.id]["isError"] and "not a regular file" in got[edit.id]["error"]
    # The daemon still does file work: the pool has all its threads back.
    reply = await client.request("files", "list", path="/")
    assert reply["success"] is True
    executor = running.daemon.services.jail.executor
    await wait_for(lambda: executor.stats()["busy"] == 0)  # no thread is left stuck
    assert (workspace / "pipe").is_fifo()
