"""The transcript store alone: real SQLite files, a real SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aetherd.agent.runner import AgentRunner
from aetherd.errors import AetherError
from aetherd.services.jail import Jail
from aetherd.services.transcript import MIGRATIONS, SCHEMA_VERSION, TranscriptStore, merge_events

REPO = Path(__file__).resolve().parents[2]


async def open_store(path: Path, **kwargs) -> TranscriptStore:
    store = TranscriptStore(path, **kwargs)
    await store.start()
    return store


async def test_schema_wal_and_monotonic_seq_across_reopen(tmp_path):
    path = tmp_path / "agent.sqlite3"
    store = await open_store(path)
    first = [store.append("t1", "text", {"messageId": "m", "content": str(i)}) for i in range(5)]
    assert [e["seq"] for e in first] == [1, 2, 3, 4, 5]
    await store.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()
    store = await open_store(path)
    assert store.append(None, "status", {"status": "x"})["seq"] == 6
    events, latest, more = await store.history(limit=100, max_bytes=1 << 20)
    assert latest == 6 and more is False
    assert events[0]["content"] == "01234" and events[0]["seq"] == 5
    await store.stop()


async def test_a_version_1_file_is_migrated_in_place(tmp_path):
    path = tmp_path / "agent.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute(
        "INSERT INTO tasks(task_id, status, prompt, created_at, finished_at) "
        "VALUES ('old', 'completed', 'p', 'x', 'y')"
    )
    conn.commit()
    conn.close()
    store = await open_store(path)
    await store.update_task("old", final_text="answer")
    assert await store.recent_tasks(5) == [
        {
            "task_id": "old",
            "prompt": "p",
            "status": "completed",
            "final_text": "answer",
            "error": None,
        }
    ]
    await store.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "agent.sqlite3"
    store = await open_store(path)
    await store.stop()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(AetherError) as info:
        await open_store(path)
    assert "newer" in info.value.message


async def test_tasks_settings_and_conflicts(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    await store.create_task("t1", "do it", "anthropic", "m", "queued")
    with pytest.raises(AetherError) as info:
        await store.create_task("t1", "again", None, None, "queued")
    assert info.value.code.value == "CONFLICT"
    await store.update_task("t1", status="completed", input_tokens=3, output_tokens=4)
    row = await store.get_task("t1")
    assert row["status"] == "completed" and row["prompt"] == "do it" and row["output_tokens"] == 4
    assert row["created_at"].endswith("Z")
    assert await store.tasks_with_status(("queued", "running")) == []
    await store.save_settings({"provider": "openai", "model": "x"})
    await store.save_settings({"model": None})
    assert await store.load_settings() == {"provider": "openai"}
    await store.stop()


async def test_history_pages_and_byte_bound(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    for i in range(20):
        store.append("t", "tool_result", {"toolCallId": str(i), "result": "x" * 1000})
    events, latest, more = await store.history(limit=5, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == [16, 17, 18, 19, 20] and latest == 20 and more
    events, latest, more = await store.history(before_seq=16, limit=100, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == list(range(1, 16)) and latest == 15 and not more
    events, _, more = await store.history(limit=100, max_bytes=3500)
    assert [e["seq"] for e in events] == [18, 19, 20] and more
    await store.stop()


async def test_history_forward_pages_from_after_seq(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    for i in range(20):
        store.append("t", "tool_result", {"toolCallId": str(i), "result": "x" * 1000})
    # Oldest first after the seq; hasMore means newer events exist.
    events, latest, more = await store.history(after_seq=5, limit=4, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == [6, 7, 8, 9] and latest == 9 and more
    events, latest, more = await store.history(after_seq=latest, limit=100, max_bytes=1 << 20)
    assert [e["seq"] for e in events] == list(range(10, 21)) and latest == 20 and not more
    # Bounded by bytes too, still from the oldest; at least one event per page.
    events, latest, more = await store.history(after_seq=0, limit=100, max_bytes=3500)
    assert [e["seq"] for e in events] == [1, 2, 3] and latest == 3 and more
    events, latest, more = await store.history(after_seq=0, limit=100, max_bytes=10)
    assert [e["seq"] for e in events] == [1] and more
    # Caught up: an empty page covering up to the seq asked for.
    assert await store.history(after_seq=20, limit=10, max_bytes=1 << 20) == ([], 20, False)
    with pytest.raises(ValueError):
        await store.history(before_seq=3, after_seq=1, limit=10, max_bytes=1 << 20)
    await store.stop()


async def test_history_forward_merges_pieces_within_a_page(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    store.append("t", "status", {"status": "running"})
    for piece in ("a", "b", "c"):
        store.append("t", "text", {"messageId": "m1", "content": piece})
    store.append("t", "done", {"status": "completed"})
    events, latest, more = await store.history(after_seq=1, limit=10, max_bytes=1 << 20)
    assert [(e["type"], e["seq"]) for e in events] == [("text", 4), ("done", 5)]
    assert events[0]["content"] == "abc" and latest == 5 and not more
    await store.stop()


async def test_unencodable_text_is_a_clean_error_and_never_poisons_the_queue(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    try:
        for task_id, prompt, field in (("t\ud800", "p", "taskId"), ("t1", "p\udfff", "prompt")):
            with pytest.raises(AetherError) as info:
                await store.create_task(task_id, prompt, "openai", "m", "queued")
            assert info.value.code.value == "INVALID_MESSAGE"
            assert info.value.extra["field"] == field
        with pytest.raises(AetherError) as info:
            await store.get_task("t\ud800")
        assert info.value.code.value == "INVALID_MESSAGE"
        with pytest.raises(AetherError):
            store.append("t\ud800", "status", {"status": "queued"})
        assert store.latest_seq == 0  # a refused event takes no seq
        # Event text from a tool or a model (an undecodable file name) is stored escaped
        # and read back as the same text; the rows around it are committed too.
        store.append("t1", "text", {"messageId": "m", "content": "a"})
        store.append("t1", "tool_result", {"toolCallId": "c", "result": "name-\udcff"})
        store.append("t1", "text", {"messageId": "n", "content": "b"})
        await store.flush()
        events, latest, _ = await store.history(limit=10, max_bytes=1 << 20)
        assert latest == 3 and [e["seq"] for e in events] == [1, 2, 3]
        assert events[1]["result"] == "name-\udcff"
        # A final answer with a surrogate is stored, replaced, rather than failing the task.
        await store.create_task("t1", "p", "openai", "m", "queued")
        await store.update_task("t1", final_text="x\ud800y", status="completed")
        assert (await store.get_task("t1"))["final_text"] == "x?y"
    finally:
        await store.stop()


async def test_before_seq_beyond_64_bits_is_bounded(tmp_path):
    store = await open_store(tmp_path / "a.sqlite3")
    try:
        for i in range(3):
            store.append("t", "status", {"status": str(i)})
        for bound in (2**63, 2**63 - 1, 10**30):
            events, latest, more = await store.history(
                before_seq=bound, limit=10, max_bytes=1 << 20
            )
            assert [e["seq"] for e in events] == [1, 2, 3] and latest == 3 and not more
        events, latest, _ = await store.history(before_seq=-(2**70), limit=10, max_bytes=1 << 20)
        assert events == [] and latest == 0
    finally:
        await store.stop()


def test_merge_keeps_messages_apart_and_takes_the_last_seq():
    events = [
        {"type": "text", "messageId": "a", "content": "he", "seq": 1},
        {"type": "thinking", "messageId": "a", "content": "hm", "seq": 2},
        {"type": "text", "messageId": "a", "content": "llo", "seq": 3},
        {"type": "tool_invocation", "toolCallId": "c", "seq": 4},
        {"type": "text", "messageId": "b", "content": "!", "seq": 5},
    ]
    merged = merge_events(events)
    assert [(e["type"], e.get("content"), e["seq"]) for e in merged] == [
        ("text", "hello", 3),
        ("thinking", "hm", 2),
        ("tool_invocation", None, 4),
        ("text", "!", 5),
    ]


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from aetherd.services.transcript import TranscriptStore

    async def main():
        store = TranscriptStore({path!r}, commit_batch=64)
        await store.start()
        await store.create_task("t1", "p", "anthropic", "m", "running")
        n = 0
        while True:
            for _ in range(50):
                n += 1
                store.append("t1", "text", {{"messageId": "m", "content": "x" * 200}})
            await store.flush()
            print(n, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_sigkill_mid_stream_keeps_committed_events_and_a_sound_file(tmp_path, make_settings):
    path = tmp_path / "data" / "agent.sqlite3"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), path=str(path)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    committed = 0
    try:
        deadline = time.monotonic() + 30
        while committed < 3000 and time.monotonic() < deadline:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not line:
                break
            committed = int(line)
        assert committed >= 3000, await proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it keeps appending
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = await open_store(path)
    try:
        assert await store.integrity_check() == "ok"
        _, latest, _ = await store.history(limit=1, max_bytes=1 << 20)
        assert latest >= committed  # every event reported committed survived
        conn = sqlite3.connect(path)
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
        conn.close()
        assert seqs == list(range(1, latest + 1))  # no hole: a prefix of the stream survived
        # The task the killed process was running is failed on the next start.
        runner = AgentRunner(make_settings(), Jail(tmp_path), store)
        await runner.start()
        try:
            row = await store.get_task("t1")
            assert row["status"] == "failed" and row["error"] == "daemon restarted"
            events, _, _ = await store.history(limit=3, max_bytes=1 << 20)
            assert events[-1]["type"] == "done" and events[-1]["error"] == "daemon restarted"
            assert events[-1]["seq"] == latest + 2
        finally:
            await runner.stop()
    finally:
        await store.stop()
