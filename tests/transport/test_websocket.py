"""The socket end to end: envelope errors, limits, keepalive, slow clients, info, health."""

from __future__ import annotations

import asyncio
import io
import logging

import aiohttp
import pytest

from aetherd.app import close_sockets
from aetherd.logs import TextFormatter, redactor
from tests.conftest import TOKEN
from tests.support import RawWebSocket, small_send_queue, wait_for

CHANNELS = ["terminal", "files", "agent", "ports", "config"]


async def test_every_frame_error_keeps_the_socket_usable(daemon):
    client = await daemon.connect()
    cases = [
        ("{broken", "INVALID_JSON"),
        ('"just a string"', "INVALID_MESSAGE"),
        ('{"type":"x"}', "INVALID_MESSAGE"),
        ('{"channel":"terminal"}', "INVALID_MESSAGE"),
        ('{"channel":"weather","type":"x"}', "UNKNOWN_CHANNEL"),
    ]
    for text, code in cases:
        await client.send(text)
        frame = await client.expect_type("error", "error")
        assert frame["code"] == code, text
    await client.ws.send_bytes(b"\x00\x01")
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "UNSUPPORTED_FRAME"
    reply = await client.request("activity", "user_activity")
    assert reply["success"] is True


@pytest.mark.parametrize("channel", CHANNELS)
async def test_unknown_type_on_each_channel(daemon, channel):
    client = await daemon.connect()
    reply = await client.request(channel, "definitely_not_a_type")
    assert reply == {
        "channel": channel,
        "type": "definitely_not_a_type",
        "requestId": reply["requestId"],
        "success": False,
        "error": f"unknown type 'definitely_not_a_type' on channel '{channel}'",
        "code": "UNKNOWN_TYPE",
    }
    await client.send({"channel": channel, "type": "nope", "sessionId": "s1"})
    frame = await client.expect_type("error", "error")
    assert frame["code"] in ("UNKNOWN_TYPE", "INVALID_MESSAGE")
    if channel not in ("files", "config"):
        assert frame["ref"] == {"channel": channel, "type": "nope", "sessionId": "s1"}


async def _next_control(client) -> aiohttp.WSMessage:
    """The next non-text message; text frames pushed on connect (ports/open...) are skipped."""
    for _ in range(1000):
        msg = await client.ws.receive(timeout=5)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return msg
    raise AssertionError("no control frame among 1000 text frames")


async def test_oversize_frame_closes_with_1009(daemon):
    client = await daemon.connect()
    await client.send("x" * (1024 * 1024 + 1))
    msg = await _next_control(client)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert client.ws.close_code == 1009


async def test_frame_of_exactly_one_mib_is_accepted(daemon):
    client = await daemon.connect()
    body = '{"channel":"activity","type":"user_activity","requestId":"big","pad":"'
    text = body + "x" * (1024 * 1024 - len(body) - 2) + '"}'
    assert len(text) == 1024 * 1024
    await client.send(text)
    reply = await client.expect(lambda f: f.get("requestId") == "big")
    assert reply["success"] is True


async def test_server_pings_and_drops_a_client_that_never_pongs(start_daemon):
    running = await start_daemon(ping_interval=0.1, pong_timeout=0.6)
    client = await running.connect(autoping=False)
    msg = await _next_control(client)
    assert msg.type is aiohttp.WSMsgType.PING
    # Never answer: the server must close within pong_timeout (plus a tick).
    for _ in range(200):
        msg = await _next_control(client)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            break
        assert msg.type is aiohttp.WSMsgType.PING
    else:
        pytest.fail("server kept a silent client")
    assert client.ws.close_code == 1001
    await wait_for(lambda: len(running.daemon.hub) == 0)


async def test_a_client_that_pongs_stays_connected(start_daemon):
    running = await start_daemon(ping_interval=0.1, pong_timeout=0.5)
    client = await running.connect(autoping=False)
    pings = 0
    while pings < 12:  # 12 pings span well over twice the pong timeout
        msg = await _next_control(client)
        assert msg.type is aiohttp.WSMsgType.PING, msg
        pings += 1
        await client.ws.pong(msg.data)
    reply = await client.request("activity", "user_activity")
    assert reply["success"] is True


async def test_client_that_stops_reading_is_dropped_after_write_timeout(start_daemon):
    running = await start_daemon(write_timeout=0.5)
    raw = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", running.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    try:
        assert " 101 " in raw.status_line
        # Each frame provokes a ~200 KB error frame; the client reads none of them.
        await asyncio.to_thread(
            raw.send_many, '{"channel":"activity","type":"' + "t" * 100_000 + '"}', 200
        )
        await wait_for(lambda: len(running.daemon.hub) == 0, timeout=15)
    finally:
        raw.close()
    # The daemon is still healthy for everyone else.
    client = await running.connect()
    assert (await client.request("activity", "user_activity"))["success"] is True


async def test_flooding_client_that_never_reads_is_dropped_alone(start_daemon):
    # Its replies fill the queue, the daemon stops reading it (backpressure), its
    # socket stops draining, and the write timeout drops it; the other client is fine.
    running = await start_daemon(send_queue_frames=small_send_queue(), write_timeout=2)
    raw = await asyncio.to_thread(
        RawWebSocket, "127.0.0.1", running.server.port, f"/workspaces/ws-test/ws?token={TOKEN}"
    )
    other = await running.connect()
    try:
        await asyncio.to_thread(
            raw.send_many, '{"channel":"activity","type":"' + "q" * 60_000 + '"}', 400
        )
        await wait_for(lambda: len(running.daemon.hub) == 1, timeout=15)
    finally:
        raw.close()
    assert (await other.request("activity", "user_activity"))["success"] is True


async def test_info_reports_activity_and_idleness(daemon):
    info_url = daemon.url("/workspaces/ws-test/info")
    async with aiohttp.ClientSession() as session:
        async with session.get(info_url) as resp:
            assert resp.status == 401
        async with session.get(info_url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            body = await resp.json()
        assert set(body) == {
            "workspaceId",
            "version",
            "uptimeSeconds",
            "connections",
            "terminals",
            "runningTasks",
            "lastActivityAt",
            "idleSeconds",
            "startedAt",
            "generation",
            "restoredSessions",
            "resources",
        }
        assert set(body["resources"]) == {"cpu", "memory", "disk", "source"}
        assert body["workspaceId"] == "ws-test" and body["connections"] == 0
        assert body["lastActivityAt"].endswith("Z")
        client = await daemon.connect()
        await client.send({"channel": "activity", "type": "user_activity"})
        async with session.get(info_url, params={"token": TOKEN}) as resp:
            body = await resp.json()
        assert body["connections"] == 1 and body["idleSeconds"] == 0
        await client.close()
        await wait_for(lambda: daemon.daemon.services.activity.connections == 0)
        async with session.get(info_url, params={"token": TOKEN}) as resp:
            body = await resp.json()
        assert body["connections"] == 0 and body["idleSeconds"] >= 0


async def test_health_and_readiness(daemon):
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.url("/healthz")) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with session.get(daemon.url("/readyz")) as resp:
            assert resp.status == 200
        daemon.daemon.ready = False
        async with session.get(daemon.url("/readyz")) as resp:
            assert resp.status == 503


async def test_token_never_reaches_the_logs(daemon):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.addFilter(redactor)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        client = await daemon.connect()
        await client.request("activity", "user_activity")
        await client.close()
        async with aiohttp.ClientSession() as session:
            for token in (TOKEN, "wrong-token-value"):
                async with session.get(
                    daemon.url("/workspaces/ws-test/info"), params={"token": token}
                ):
                    pass
        await wait_for(lambda: "disconnected" in stream.getvalue())
        logging.getLogger("aetherd.test").info("oops %s", TOKEN)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert "token=***" in text  # access lines were written, redacted
    connected = [
        line
        for line in text.splitlines()
        if line.endswith(": connected") or ": connected (" in line
    ]
    assert connected and all(" [c" in line for line in connected)  # each carries its connection id
    assert TOKEN not in text
    assert "wrong-token-value" not in text


async def test_shutdown_closes_sockets_with_1001(start_daemon):
    running = await start_daemon()
    client = await running.connect()
    await close_sockets(running.app)
    msg = await _next_control(client)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == 1001


@pytest.mark.parametrize(
    ("code", "reason"), [(1001, "server shutting down"), (1012, "service restart")]
)
async def test_a_socket_upgraded_while_closing_gets_the_close_code(start_daemon, code, reason):
    running = await start_daemon()
    if code == 1001:
        await close_sockets(running.app)
    else:
        await close_sockets(running.app, code, reason)
    client = await running.connect()  # the upgrade itself succeeds ...
    msg = await _next_control(client)
    assert msg.type is aiohttp.WSMsgType.CLOSE  # ... and the close says why at once
    assert (msg.data, msg.extra) == (code, reason)
    assert len(running.daemon.hub) == 0


async def test_metrics_count_frames_errors_and_connections(daemon):
    client = await daemon.connect()
    await client.request("activity", "user_activity")
    await client.send("{nope")
    await client.expect_type("error", "error")
    await client.request("terminal", "no_such_type")
    async with aiohttp.ClientSession() as session, session.get(daemon.url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    lines = set(text.splitlines())
    assert "aetherd_connections 1.0" in lines
    assert "aetherd_connections_opened_total 1.0" in lines
    assert 'aetherd_frames_total{channel="activity",direction="in"} 1.0' in lines
    assert 'aetherd_frames_total{channel="activity",direction="out"} 1.0' in lines
    assert 'aetherd_frames_total{channel="unknown",direction="in"} 1.0' in lines
    assert 'aetherd_errors_total{code="INVALID_JSON"} 1.0' in lines
    assert 'aetherd_errors_total{code="UNKNOWN_TYPE"} 1.0' in lines
    assert TOKEN not in text


async def test_metrics_can_be_disabled(start_daemon):
    running = await start_daemon(metrics_enabled=False)
    async with aiohttp.ClientSession() as session, session.get(running.url("/metrics")) as resp:
        assert resp.status == 404
