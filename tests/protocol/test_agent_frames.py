"""The agent channel's frames: the models' bytes equal the hand-built dicts they replaced,
and transcripts stored before the models replay unchanged."""

from __future__ import annotations

import json
import sqlite3

from aetherd.agent.events import (
    ContentPiece,
    PermissionRequest,
    Recorded,
    TaskDone,
    TaskStatus,
    ToolInvocation,
    ToolResult,
)
from aetherd.agent.runner import HistoryPage
from aetherd.channels.agent import channel, frame_text, history_frame_text, history_reply
from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import dumps, encode
from aetherd.protocol.agent import (
    AgentErrorEvent,
    AgentHistoryFrame,
    AgentOtherEvent,
    AgentStatus,
    event_item,
)
from aetherd.services.transcript import MIGRATIONS, SCHEMA_VERSION, TranscriptStore

EVENTS = [
    TaskStatus("queued", "fix the bug — ünïcode ✓"),
    TaskStatus("running"),
    ContentPiece("text", "m1", 'say "hi"\n\t\\ ☃'),
    ContentPiece("thinking", "m2", "hmm"),
    ToolInvocation("c1", "bash", {"command": "ls", "timeout": 3, "n": None}, "running"),
    ToolInvocation("c1", "bash", {"command": "ls"}, "running", "out\n"),
    ToolInvocation("c2", "ask_user", {"question": "which?"}, "awaiting_input"),
    PermissionRequest("r1", "c3", "write_file", {"path": "a", "content": "x"}, "write a"),
    ToolResult("c1", "bash", "listing", False),
    ToolResult("c3", "write_file", "the user rejected this tool call", True),
    TaskDone("completed", 10, 5),
    TaskDone("failed", 0, 0, "HTTP 400: bad", "PROVIDER_ERROR"),
]


def old_event(recorded: Recorded) -> dict:
    """The event dict the runner built before the models: store.append's return value."""
    event = {
        "type": recorded.type,
        "taskId": recorded.task_id,
        "seq": recorded.seq,
        "createdAt": recorded.created_at,
    }
    event.update(recorded.event.payload())
    return event


def test_every_event_frame_has_the_bytes_of_the_old_dict():
    for seq, event in enumerate(EVENTS, 1):
        recorded = Recorded("t1", seq, "2026-01-01T00:00:00.000Z", event)
        old = old_event(recorded)
        assert frame_text(recorded) == dumps({"channel": "agent", **old})
        assert encode(event_item(old)) == dumps(old)  # inside a history page
        assert type(event_item(old)).TYPE == event.type  # a typed model, not the fallback
        assert frame_text(recorded) is frame_text(recorded)  # encoded once per event


def test_every_pushed_type_is_declared_on_the_channel():
    declared = {frame.TYPE for frame in channel.pushes}
    assert {e.type for e in EVENTS} | {"history", "error"} <= declared


def test_error_event_and_history_frame_bytes():
    err = AetherError(ErrorCode.CONFLICT, "task 't' already exists", taskId="t")
    old = {"channel": "agent", "type": "error", "error": err.message, "code": "CONFLICT"}
    old.update(err.extra)
    assert encode(AgentErrorEvent(error=err.message, code=err.code, **err.extra)) == dumps(old)
    records = [old_event(Recorded("t", i, "x", e)) for i, e in enumerate(EVENTS, 1)]
    page = HistoryPage(records, len(records), True, records[6:8])
    body = history_reply(page)
    frame = AgentHistoryFrame(events=body.events, latest_seq=9, has_more=True, pending=body.pending)
    expected = {
        "channel": "agent",
        "type": "history",
        "events": records,
        "latestSeq": 9,
        "hasMore": True,
        "pending": records[6:8],
    }
    assert encode(frame) == dumps(expected)
    assert history_frame_text(HistoryPage(records, 9, True, records[6:8])) == encode(frame)
    data = {k: v for k, v in expected.items() if k not in ("channel", "type")}
    data["latestSeq"] = len(records)
    assert channel.handlers["history"].encode_data(body) == dumps(data)


async def test_a_transcript_written_before_the_models_replays_byte_for_byte(tmp_path):
    # Rows exactly as the old runner stored them (payload: json.dumps of its fields,
    # compact, UTF-8), plus what another version might have left: an unknown type and
    # an extra field.
    path = tmp_path / "agent.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for script in MIGRATIONS:
        conn.executescript(script)
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
    rows = [
        ("t1", "status", {"status": "queued", "prompt": "p ✓"}),
        ("t1", "status", {"status": "running"}),
        ("t1", "text", {"messageId": "m", "content": "hel"}),
        ("t1", "text", {"messageId": "m", "content": "lo"}),
        (
            "t1",
            "tool_invocation",
            {
                "toolCallId": "c",
                "name": "bash",
                "input": {"command": "ls"},
                "status": "running",
                "progress": "a",
            },
        ),
        ("t1", "tool_result", {"toolCallId": "c", "name": "bash", "isError": False, "result": "a"}),
        ("t1", "note", {"text": "from a newer daemon"}),
        ("t1", "status", {"status": "completed", "extra": 1}),
        ("t1", "done", {"status": "completed", "usage": {"inputTokens": 1, "outputTokens": 2}}),
        (None, "status", {"status": "x"}),
    ]
    for seq, (task_id, type_, fields) in enumerate(rows, 1):
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
        conn.execute(
            "INSERT INTO events(seq, task_id, type, created_at, payload) VALUES (?,?,?,?,?)",
            (seq, task_id, type_, "2025-01-01T00:00:00.000Z", payload),
        )
    conn.commit()
    conn.close()
    store = TranscriptStore(path)
    await store.start()
    try:
        events, latest, more = await store.history(limit=100, max_bytes=1 << 20)
    finally:
        await store.stop()
    assert latest == 10 and not more and len(events) == 9  # the two text pieces merged
    items = [event_item(e) for e in events]
    assert [encode(i) for i in items] == [dumps(e) for e in events]
    assert isinstance(items[5], AgentOtherEvent) and items[5].type == "note"
    assert isinstance(items[6], AgentOtherEvent)  # a known type with a field it lacks today
    assert isinstance(items[8], AgentStatus) and items[8].task_id is None
    body = history_reply(HistoryPage(events, latest, more, []))
    hand = history_frame_text(HistoryPage(events, latest, more, []))
    assert hand == encode(
        AgentHistoryFrame(events=body.events, latest_seq=latest, has_more=more, pending=[])
    )
    assert hand == dumps(
        {
            "channel": "agent",
            "type": "history",
            "events": events,
            "latestSeq": 10,
            "hasMore": False,
            "pending": [],
        }
    )


def test_the_settings_literals_are_the_services_values():
    import typing

    from aetherd.agent.defaults import PROVIDERS
    from aetherd.agent.permissions import MODES
    from aetherd.protocol.agent import PermissionMode, Provider

    assert typing.get_args(Provider) == PROVIDERS
    assert typing.get_args(PermissionMode) == MODES


def test_history_with_unencodable_text_takes_the_model_path():
    record = old_event(Recorded("t", 1, "x", ToolResult("c", "list_files", "bad-\udcff", False)))
    text = history_frame_text(HistoryPage([record], 1, False, []))
    assert json.loads(text)["events"][0]["result"] == "bad-?"
