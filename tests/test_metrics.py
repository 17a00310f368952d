"""GET /metrics exposes each service's state: ports, watcher, agent, transcript."""

from __future__ import annotations

import aiohttp

from aetherd.metrics import channel_of
from tests.fake_providers import FakeProvider, HttpError, Turn
from tests.support import wait_for


async def _scrape(running) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(running.url("/metrics")) as resp:
        assert resp.status == 200
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_service_metrics(start_daemon, monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENROUTER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    provider = await FakeProvider("openai").start()
    try:
        provider.add(Turn(text=["hello ", "there"]), HttpError(400, "bad request"))
        running = await start_daemon(
            agent_provider="openai",
            openai_api_key="k",
            openai_base_url=provider.base_url,
            agent_retry_attempts=0,
        )
        client = await running.connect()
        await client.send({"channel": "agent", "type": "prompt", "prompt": "hi", "taskId": "t1"})
        await client.expect_type("agent", "done", taskId="t1", status="completed")
        await client.send({"channel": "agent", "type": "prompt", "prompt": "again", "taskId": "t2"})
        await client.expect_type("agent", "done", taskId="t2", status="failed")
        ports = running.daemon.services.ports
        await wait_for(lambda: ports.scans >= 2)
        values = await _scrape(running)
    finally:
        await provider.close()
    assert values["aetherd_port_scans_total"] >= 2
    assert values["aetherd_port_scan_seconds_total"] > 0
    assert "aetherd_ports_listening" in values
    assert values["aetherd_watches"] >= 1
    assert values["aetherd_watches_max"] == running.settings.watcher_max_watches
    assert values["aetherd_agent_tasks_running"] == 0
    assert values['aetherd_agent_tasks_finished_total{status="completed"}'] == 1
    assert values['aetherd_agent_tasks_finished_total{status="failed"}'] == 1
    assert values['aetherd_agent_provider_requests_total{provider="openai"}'] == 2
    assert values['aetherd_agent_provider_errors_total{provider="openai"}'] == 1
    assert values['aetherd_agent_provider_first_token_seconds_total{provider="openai"}'] > 0
    assert values["aetherd_transcript_bytes"] > 0
    assert values["aetherd_transcript_latest_seq"] >= 6


def test_frames_are_counted_by_channel_as_text_or_utf8_bytes():
    """Terminal output leaves as UTF-8 bytes, the rest as text: both are labelled alike."""
    for frame in ('{"channel":"terminal","type":"output"}', '{"channel":"files","x":1}'):
        assert channel_of(frame) == channel_of(frame.encode()) == frame[12:-1].split('"')[0]
    assert channel_of(b'{"channel":"nosuch"}') == channel_of('{"channel":"nosuch"}') == "other"
    assert channel_of(b'{"type":"x"}') == channel_of('{"type":"x"}') == "unknown"
