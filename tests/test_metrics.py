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


def test_exposition_is_what_prometheus_client_prints_for_the_same_counts() -> None:
    """The daemon keeps its counters as plain numbers and builds the families at scrape
    time; the text must be what prometheus-client's Counter and Histogram would print."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from aetherd.metrics import Metrics, Sample

    class Source:
        def metrics(self):
            yield Sample("aetherd_things", "Things", 3)
            yield Sample("aetherd_done", "Done", 2, {"status": "ok"}, kind="counter")

    ours = Metrics()
    ours.add_source(Source())
    ref = CollectorRegistry(auto_describe=True)
    frames = Counter(
        "aetherd_frames", ours.frames.documentation, ["channel", "direction"], registry=ref
    )
    nbytes = Counter(
        "aetherd_frame_bytes",
        ours.frame_bytes.documentation,
        ["channel", "direction"],
        registry=ref,
    )
    errors = Counter("aetherd_errors", ours.errors.documentation, ["code"], registry=ref)
    opened = Counter(
        "aetherd_connections_opened", ours.connections_opened.documentation, registry=ref
    )
    dropped = Counter(
        "aetherd_connections_dropped",
        ours.connections_dropped.documentation,
        ["reason"],
        registry=ref,
    )
    seconds = Histogram(
        "aetherd_request_seconds",
        ours.request_seconds.documentation,
        ["channel"],
        registry=ref,
        buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
    )
    Gauge("aetherd_things", "Things", registry=ref).set(3)  # the source's samples, in order
    Counter("aetherd_done", "Done", ["status"], registry=ref).labels("ok").inc(2)

    def ref_text() -> str:
        # prometheus-client's `_created` series are switched off in the daemon.
        lines = generate_latest(ref).decode().splitlines(keepends=True)
        return "".join(line for line in lines if "_created" not in line)

    # Before anything happened: the unlabelled counter at 0, the others with no series.
    assert ours.render().decode() == ref_text()
    ours.frame_in("terminal", 120)
    frames.labels("terminal", "in").inc()
    nbytes.labels("terminal", "in").inc(120)
    ours.frame_in("nonsense", 7)
    frames.labels("other", "in").inc()
    nbytes.labels("other", "in").inc(7)
    text = '{"channel":"files","type":"x"}'
    ours.frame_out(text)
    frames.labels("files", "out").inc()
    nbytes.labels("files", "out").inc(len(text))
    ours.error("NOT_FOUND")
    errors.labels("NOT_FOUND").inc()
    ours.connections_opened.inc()
    opened.inc()
    ours.connections_dropped.labels("pong_timeout").inc()
    dropped.labels("pong_timeout").inc()
    for value in (0.0001, 0.0005, 0.003, 0.7, 9.0, 0.003):
        ours.request_seconds.labels("files").observe(value)
        seconds.labels("files").observe(value)
    ours.request_seconds.labels("terminal").observe(0.02)
    seconds.labels("terminal").observe(0.02)
    assert ours.render().decode() == ref_text()


def test_frames_are_counted_by_channel_as_text_or_utf8_bytes():
    """Terminal output leaves as UTF-8 bytes, the rest as text: both are labelled alike."""
    for frame in ('{"channel":"terminal","type":"output"}', '{"channel":"files","x":1}'):
        assert channel_of(frame) == channel_of(frame.encode()) == frame[12:-1].split('"')[0]
    assert channel_of(b'{"channel":"nosuch"}') == channel_of('{"channel":"nosuch"}') == "other"
    assert channel_of(b'{"type":"x"}') == channel_of('{"type":"x"}') == "unknown"
