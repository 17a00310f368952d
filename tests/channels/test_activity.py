"""The activity channel's resource pushes, /info's `resources` and the /metrics gauges,
over a real socket and real HTTP."""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from tests.conftest import TOKEN
from tests.support import WsClient, wait_for


def is_resources(frame: dict[str, Any]) -> bool:
    return frame.get("channel") == "activity" and frame.get("type") == "resources"


def check_shape(body: dict[str, Any], root) -> None:
    assert set(body) >= {"cpu", "memory", "disk", "source"}
    assert set(body["cpu"]) == {"usedPercent", "usedCores", "limitCores"}
    assert body["source"] in ("cgroup", "psutil")
    assert 0 < body["memory"]["used"] <= body["memory"]["limit"]
    assert body["disk"]["total"] > body["disk"]["used"] > 0
    stat = os.statvfs(root)
    assert body["disk"]["total"] == stat.f_blocks * stat.f_frsize
    assert body["cpu"]["limitCores"] > 0 and 0 <= body["cpu"]["usedPercent"] <= 100


async def received_before_reply(client: WsClient) -> list[dict[str, Any]]:
    """The frames that reached `client` before the reply to a fresh request."""
    reply = await client.request("activity", "user_activity")
    assert reply["success"] is True
    frames, client.backlog = client.backlog, []
    return frames


async def test_resources_are_pushed_only_to_subscribed_sockets(start_daemon, workspace):
    running = await start_daemon(resources_interval=0.05)
    monitor = running.daemon.services.resources
    first = await running.connect()
    second = await running.connect()
    bystander = await running.connect()
    assert not monitor.ticking

    reply = await first.request("activity", "subscribe_resources")
    assert reply["success"] is True and reply["data"] is None
    # One frame at once (before the reply: no tick could have reached this socket yet),
    # then one per interval.
    assert [f for f in first.backlog if is_resources(f)] != []
    now = await first.expect(is_resources)
    check_shape(now, workspace)
    await second.send({"channel": "activity", "type": "subscribe_resources"})
    await second.expect(is_resources)
    # Subscribing twice is harmless: one more immediate frame, still one subscription.
    await second.send({"channel": "activity", "type": "subscribe_resources"})
    await second.expect(is_resources)
    assert monitor.subscriber_count == 2
    timer = monitor._ticker
    for _ in range(3):
        await first.expect(is_resources)
        await second.expect(is_resources)
    assert monitor._ticker is timer  # one timer serves both sockets

    # The socket that never subscribed got none of those frames.
    assert [f for f in await received_before_reply(bystander) if is_resources(f)] == []

    # unsubscribe_resources stops this socket's pushes; the timer goes on for the other.
    reply = await first.request("activity", "unsubscribe_resources")
    assert reply["success"] is True
    assert monitor.subscriber_count == 1 and monitor.ticking
    await received_before_reply(first)  # drop what was in flight before unsubscribing
    for _ in range(3):
        await second.expect(is_resources)
    assert [f for f in await received_before_reply(first) if is_resources(f)] == []

    # Closing the last subscribed socket stops the timer: nothing leaks.
    await second.close()
    await wait_for(lambda: monitor.subscriber_count == 0 and not monitor.ticking)
    assert timer is not None and timer.done()
    # Unsubscribing when not subscribed is a no-op.
    reply = await bystander.request("activity", "unsubscribe_resources")
    assert reply["success"] is True


async def test_info_and_metrics_report_the_same_kind_of_figures(daemon, workspace):
    async with aiohttp.ClientSession() as session:
        async with session.get(
            daemon.url("/workspaces/ws-test/info"), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with session.get(daemon.url("/metrics")) as resp:
            text = await resp.text()
    check_shape(body["resources"], workspace)
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    source = body["resources"]["source"]
    assert values[f'aetherd_workspace_resources_source{{source="{source}"}}'] == 1
    assert values["aetherd_workspace_memory_used_bytes"] > 0
    assert values["aetherd_workspace_memory_limit_bytes"] == body["resources"]["memory"]["limit"]
    assert values["aetherd_workspace_disk_total_bytes"] == body["resources"]["disk"]["total"]
    assert values["aetherd_workspace_cpu_limit_cores"] == body["resources"]["cpu"]["limitCores"]
    assert values["aetherd_workspace_cpu_seconds_total"] > 0
    assert "aetherd_workspace_cpu_used_cores" in values
    assert "aetherd_workspace_cpu_used_percent" in values
    assert "aetherd_workspace_disk_used_bytes" in values
