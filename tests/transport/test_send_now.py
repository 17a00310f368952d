"""Replies sent at once (`Connection.send_now`) when nothing is queued, in order otherwise."""

from __future__ import annotations

import asyncio
import json

from tests.support import wait_for


async def test_a_reply_goes_out_at_once_when_nothing_is_queued(daemon):
    client = await daemon.connect()
    await client.request("activity", "user_activity")  # the connection is up and idle
    (conn,) = list(daemon.daemon.hub)
    await wait_for(lambda: conn.queued_bytes == 0 and not conn._queue)
    sent = conn.frames_sent
    await conn.send_now('{"channel":"activity","type":"direct"}')
    # Written before send_now returned: no hand-off to the writer task.
    assert conn.frames_sent == sent + 1
    frame = await client.expect_type("activity", "direct")
    assert frame == {"channel": "activity", "type": "direct"}


async def test_a_reply_waits_behind_queued_frames(daemon):
    client = await daemon.connect()
    await client.request("activity", "user_activity")
    (conn,) = list(daemon.daemon.hub)
    await wait_for(lambda: not conn._queue)
    sent = conn.frames_sent
    # Queued but not written yet (the writer runs at the next loop iteration):
    for i in range(3):
        conn.send(json.dumps({"channel": "activity", "type": "queued", "n": i}))
    await conn.send_now('{"channel":"activity","type":"queued","n":3}')
    assert conn.frames_sent == sent  # queued behind the others, not written ahead
    seen = [(await client.expect_type("activity", "queued"))["n"] for _ in range(4)]
    assert seen == [0, 1, 2, 3]


async def test_send_now_on_a_closed_connection_sends_nothing(daemon):
    client = await daemon.connect()
    await client.request("activity", "user_activity")
    (conn,) = list(daemon.daemon.hub)
    await client.close()
    await wait_for(lambda: conn.closed)
    sent = conn.frames_sent
    await conn.send_now('{"channel":"activity","type":"late"}')  # must not raise
    assert conn.frames_sent == sent


async def test_the_reader_yields_after_a_run_of_direct_replies(daemon):
    """Pipelined requests answered by `send_now` queue nothing; the reader still lets the
    loop run after DIRECT_RUN of them, as it does after each queued reply."""
    from aetherd.transport.connection import DIRECT_RUN

    client = await daemon.connect()
    await client.request("activity", "user_activity")
    (conn,) = list(daemon.daemon.hub)
    await wait_for(lambda: not conn._queue)
    ran: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: ran.append(conn.frames_sent))
    start = conn.frames_sent
    for i in range(DIRECT_RUN - 1):  # below the run: no yield
        await conn.send_now(json.dumps({"channel": "activity", "type": "run", "n": i}))
        await conn.wait_writable()
    assert ran == []
    await conn.send_now('{"channel":"activity","type":"run","n":-1}')
    await conn.wait_writable()  # the run is complete: the loop runs
    assert ran == [start + DIRECT_RUN]
    await asyncio.sleep(0)
    assert conn._direct_run == 0  # reset once the loop ran
