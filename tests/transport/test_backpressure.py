"""Fairness: a client that pipelines thousands of requests while reading gets every reply."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.support import small_send_queue, wait_for


async def _pipeline(client, count: int) -> set[str]:
    """Send `count` requests without waiting, while reading; return the reply ids seen."""
    frames = [
        json.dumps({"channel": "activity", "type": "user_activity", "requestId": f"r{i}"})
        for i in range(count)
    ]

    async def send_all() -> None:
        for frame in frames:
            await client.ws.send_str(frame)

    sender = asyncio.create_task(send_all())
    seen: set[str] = set()
    try:
        while len(seen) < count:
            msg = await client.ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra, len(seen))
            reply = json.loads(msg.data)
            if reply.get("requestId"):
                assert reply["success"] is True, reply
                seen.add(reply["requestId"])
        await asyncio.wait_for(sender, 30)
    finally:
        sender.cancel()
    return seen


async def test_ten_thousand_pipelined_requests_all_get_replies(daemon):
    client = await daemon.connect()
    seen = await _pipeline(client, 10_000)
    assert seen == {f"r{i}" for i in range(10_000)}
    assert not client.ws.closed
    assert (await client.request("activity", "user_activity"))["success"] is True


async def test_the_reader_pauses_instead_of_dropping(start_daemon):
    # A tiny queue: without backpressure the 17th queued reply would drop the client.
    running = await start_daemon(send_queue_frames=small_send_queue(), send_queue_pause_frames=4)
    client = await running.connect()
    count = 300
    long_type = (
        "q" * 20_000
    )  # each error reply quotes it: 6 MB in all, more than the socket buffers
    frames = [
        json.dumps({"channel": "activity", "type": long_type, "requestId": f"r{i}"})
        for i in range(count)
    ]

    async def send_all() -> None:
        for frame in frames:
            await client.ws.send_str(frame)

    sender = asyncio.create_task(send_all())
    try:
        # Not reading yet: the daemon's writer blocks, its queue fills, its reader pauses.
        (peer,) = list(running.daemon.hub)
        await wait_for(lambda: peer.read_pauses > 0, timeout=20)
        seen = set()
        while len(seen) < count:
            msg = await client.ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra, len(seen))
            reply = json.loads(msg.data)
            if "requestId" in reply:  # skip the pushes sent on connect
                assert reply["code"] == "UNKNOWN_TYPE"
                seen.add(reply["requestId"])
        await asyncio.wait_for(sender, 30)
    finally:
        sender.cancel()
    assert not client.ws.closed
    assert (await client.request("activity", "user_activity"))["success"] is True
