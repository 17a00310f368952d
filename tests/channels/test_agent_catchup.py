"""Agent catch-up and filtering (docs/protocol.md section 4, "Catching up and one task at a
time"): `history` with `afterSeq`, `?agentHistory=` on connect, `subscribe`/`unsubscribe`.

A real daemon on loopback, real sockets, and the fake Anthropic server speaking the
provider's wire format.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from aetherd.agent.events import ContentPiece
from aetherd.channels.agent import connect_history
from tests.channels.test_agent import start_agent, task_events
from tests.fake_providers import FakeProvider, Turn
from tests.support import WsClient, connect


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def anthropic():
    provider = await FakeProvider("anthropic").start()
    yield provider
    await provider.close()


def stored(frame: dict[str, Any]) -> dict[str, Any]:
    """A live event as it appears inside a history page (no `channel`)."""
    return {k: v for k, v in frame.items() if k != "channel"}


async def run_task(client: WsClient, task_id: str) -> list[dict[str, Any]]:
    """Prompt `task_id` and return its live events up to its `done`."""
    reply = await client.request("agent", "prompt", prompt=f"do {task_id}", taskId=task_id)
    assert reply["success"] is True, reply
    return await task_events(client, task_id)


OPENED: list[WsClient] = []


@pytest.fixture(autouse=True)
async def _close_sockets():
    """Close the sockets `connect_with` opened, even when a test fails half-way."""
    yield
    while OPENED:
        await OPENED.pop().close()


async def connect_with(running, query: str) -> WsClient:
    """A socket opened with `?<query>&token=…`; closed at teardown at the latest."""
    url = f"{running.ws_url}?{query}&token={quote(running.token)}"
    client = await connect(url)
    OPENED.append(client)
    return client


async def frames_until_reply(client: WsClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Everything the socket received before the reply to a fresh request.

    Connect pushes are queued before the receive loop reads the first frame, so a
    push that was going to come is among the frames read here.
    """
    await client.send({"channel": "agent", "type": "history", "requestId": "probe", "limit": 1})
    before: list[dict[str, Any]] = []
    for _ in range(1000):
        frame = await client.expect(lambda f: True)
        if frame.get("requestId") == "probe":
            return before, frame
        before.append(frame)
    raise AssertionError("no reply")


async def test_after_seq_pages_forward_through_exactly_the_missed_events(start_daemon, anthropic):
    anthropic.add(Turn(text=["first answer"]), Turn(text=["second answer"]))
    running = await start_agent(start_daemon, anthropic)
    away = await running.connect()
    await away.expect_type("agent", "history")
    seen = await run_task(away, "t1")
    last_seen = seen[-1]["seq"]
    await away.close()

    # While the first client is away, another one runs a task.
    other = await running.connect()
    await other.expect_type("agent", "history")
    missed = await run_task(other, "t2")
    assert missed[0]["seq"] > last_seen

    back = await connect_with(running, "agentHistory=none")
    got: list[dict[str, Any]] = []
    after = last_seen
    for _ in range(len(missed) + 1):
        reply = await back.request("agent", "history", afterSeq=after, limit=2)
        assert reply["success"] is True, reply
        page = reply["data"]
        assert len(page["events"]) <= 2
        got.extend(page["events"])
        if page["events"]:
            assert page["latestSeq"] == page["events"][-1]["seq"]
        after = page["latestSeq"]
        if not page["hasMore"]:
            break
    assert got == [stored(f) for f in missed]
    # Caught up: an empty page at the same seq.
    reply = await back.request("agent", "history", afterSeq=after)
    assert reply["data"]["events"] == [] and reply["data"]["latestSeq"] == after
    assert reply["data"]["hasMore"] is False
    # From 0: everything, oldest first.
    reply = await back.request("agent", "history", afterSeq=0)
    assert [e["seq"] for e in reply["data"]["events"]] == [e["seq"] for e in [*seen, *missed]]
    await back.close()


async def test_history_refuses_before_and_after_together(daemon):
    client = await daemon.connect()
    await client.expect_type("agent", "history")
    reply = await client.request("agent", "history", afterSeq=3, beforeSeq=9)
    assert reply["success"] is False
    assert reply["code"] == "INVALID_MESSAGE" and reply["field"] == "afterSeq"
    reply = await client.request("agent", "history", afterSeq=-1)
    assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"
    # The socket is still fine.
    reply = await client.request("agent", "history", afterSeq=0)
    assert reply["success"] is True and reply["data"]["events"] == []


async def test_agent_history_none_and_after_seq_on_connect(start_daemon, anthropic):
    anthropic.add(Turn(text=["one"]), Turn(text=["two"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await client.expect_type("agent", "history")
    first = await run_task(client, "t1")
    second = await run_task(client, "t2")

    # none: no agent/history push at all.
    quiet = await connect_with(running, "agentHistory=none")
    before, reply = await frames_until_reply(quiet)
    assert reply["success"] is True
    assert [f for f in before if f.get("channel") == "agent"] == []
    await quiet.close()

    # after:SEQ: exactly the events after SEQ, oldest first.
    since = await connect_with(running, f"agentHistory=after:{first[-1]['seq']}")
    page = await since.expect_type("agent", "history")
    assert page["events"] == [stored(f) for f in second]
    assert page["latestSeq"] == second[-1]["seq"] and page["hasMore"] is False
    await since.close()

    # after the latest seq: an empty page; live events still follow.
    anthropic.add(Turn(text=["three"]))
    tip = await connect_with(running, f"agentHistory=after:{second[-1]['seq']}")
    page = await tip.expect_type("agent", "history")
    assert page["events"] == [] and page["latestSeq"] == second[-1]["seq"]
    await client.request("agent", "prompt", prompt="three", taskId="t3")
    live = await task_events(tip, "t3")
    assert live[-1]["type"] == "done" and live[0]["seq"] == second[-1]["seq"] + 1
    await tip.close()


async def test_a_bad_agent_history_value_is_reported_and_the_whole_history_follows(
    start_daemon, anthropic
):
    anthropic.add(Turn(text=["one"]))
    running = await start_agent(start_daemon, anthropic)
    client = await running.connect()
    await client.expect_type("agent", "history")
    events = await run_task(client, "t1")
    for bad in ("after:", "after:-1", "after:x", "later", "after:99999999999999999999"):
        sock = await connect_with(running, f"agentHistory={quote(bad)}")
        error = await sock.expect_type("agent", "error")
        assert error["code"] == "INVALID_MESSAGE" and error["field"] == "agentHistory"
        page = await sock.expect_type("agent", "history")
        assert [e["seq"] for e in page["events"]] == [e["seq"] for e in events]
        await sock.close()


def test_connect_history_values():
    assert connect_history(None) == (True, None)
    assert connect_history("all") == (True, None)
    assert connect_history("none") == (False, None)
    assert connect_history("after:0") == (True, 0)
    assert connect_history("after:42") == (True, 42)
    assert connect_history(f"after:{2**63 - 1}") == (True, 2**63 - 1)
    for bad in (
        "",
        "None",
        "after",
        "after:",
        "after: 1",
        "after:1.5",
        "after:٣",
        f"after:{2**63}",
    ):
        with pytest.raises(ValueError):
            connect_history(bad)


async def test_subscribe_narrows_live_events_to_one_task_and_unsubscribe_restores_all(
    start_daemon, anthropic
):
    anthropic.add(
        Turn(text=["one"], frame_delay=0.01),
        Turn(text=["two"]),
        Turn(text=["three"]),
    )
    running = await start_agent(start_daemon, anthropic)
    narrow = await running.connect()
    await narrow.expect_type("agent", "history")
    everything = await running.connect()
    await everything.expect_type("agent", "history")

    reply = await narrow.request("agent", "subscribe", taskId="t2")
    assert reply["success"] is True and reply["data"] == {"taskId": "t2"}
    # t1 runs while t2 waits behind it in the queue.
    for task_id in ("t1", "t2"):
        await everything.send(
            {"channel": "agent", "type": "prompt", "prompt": task_id, "taskId": task_id}
        )
    all_t1 = await task_events(everything, "t1")
    all_t2 = await task_events(everything, "t2")
    assert all_t1[-1]["type"] == "done" and all_t2[-1]["type"] == "done"

    # The narrowed socket gets t2's events, all of them, and nothing of t1 (which
    # finished before t2's `done`, so its events would have come first).
    got: list[dict[str, Any]] = []
    for _ in range(1000):
        frame = await narrow.expect(lambda f: f.get("channel") == "agent" and "seq" in f)
        got.append(frame)
        if frame["type"] == "done" and frame["taskId"] == "t2":
            break
    assert {f["taskId"] for f in got} == {"t2"}
    assert got == all_t2

    # A frame that belongs to no task still arrives (the agent `error` event).
    await narrow.send({"channel": "agent", "type": "abort", "taskId": "nope"})
    error = await narrow.expect_type("agent", "error")
    assert error["code"] == "TASK_NOT_FOUND"

    reply = await narrow.request("agent", "unsubscribe")
    assert reply["success"] is True and reply["data"] == {"taskId": "*"}
    await narrow.send({"channel": "agent", "type": "prompt", "prompt": "t3", "taskId": "t3"})
    again = await task_events(narrow, "t3")
    assert again[-1]["type"] == "done"
    assert [f["seq"] for f in again] == [f["seq"] for f in await task_events(everything, "t3")]

    # `*` is the same as unsubscribing; a taskId that does not exist yet is accepted.
    reply = await narrow.request("agent", "subscribe", taskId="*")
    assert reply["data"] == {"taskId": "*"}
    reply = await narrow.request("agent", "subscribe", taskId="later")
    assert reply["data"] == {"taskId": "later"}
    reply = await narrow.request("agent", "subscribe", taskId="")
    assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"


async def test_after_seq_on_connect_while_a_task_streams_has_no_gap_and_no_duplicate(
    start_daemon, anthropic
):
    pieces = [f"t{i};" for i in range(300)]
    anthropic.add(Turn(text=pieces, chunk_size=0, frame_delay=0.002))
    running = await start_agent(start_daemon, anthropic)
    runner = running.daemon.services.agent
    store = running.daemon.services.transcript
    original = store.history
    injected: list[int] = []

    async def racing_history(**kwargs):
        # Events between the subscription and the read, and during the read.
        injected.append(runner.events.emit("race", ContentPiece("text", "race-m", "A")).seq)
        result = await original(**kwargs)
        injected.append(runner.events.emit("race", ContentPiece("text", "race-m", "B")).seq)
        return result

    client = await running.connect()
    await client.expect_type("agent", "history")
    await client.send({"channel": "agent", "type": "prompt", "prompt": "stream", "taskId": "t1"})
    seen = await client.expect(lambda f: f.get("type") == "text" and f.get("content") == "t20;")
    store.history = racing_history  # type: ignore[method-assign]
    late = await connect_with(running, f"agentHistory=after:{seen['seq']}")
    store.history = original  # type: ignore[method-assign]
    page = await late.expect_type("agent", "history")
    assert page["events"][0]["seq"] > seen["seq"] and page["hasMore"] is False
    latest = page["latestSeq"]
    after: list[dict[str, Any]] = []
    for _ in range(2000):
        frame = await late.expect(lambda f: f.get("channel") == "agent" and "seq" in f)
        after.append(frame)
        if frame["type"] == "done" and frame["taskId"] == "t1":
            break
    live_seqs = [f["seq"] for f in after]
    assert live_seqs == list(range(latest + 1, latest + 1 + len(live_seqs)))  # no gap, no dup
    assert injected[0] <= latest < injected[1] and injected[1] in live_seqs
    text = "".join(
        e["content"] for e in page["events"] if e["type"] == "text" and e["taskId"] == "t1"
    )
    text += "".join(f["content"] for f in after if f["type"] == "text" and f["taskId"] == "t1")
    assert text == "".join(pieces[21:])
