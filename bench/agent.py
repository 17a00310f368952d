"""Agent benchmarks, each beside a reference measured in the same run.

1. History on connect: a transcript of 10,000 events over 50 tasks; time from opening
   the WebSocket to the whole `agent/history` frame parsed by the client.
   Reference: `SELECT ... FROM events ORDER BY seq` of the same rows with plain
   `sqlite3` (fetchall + json.loads of each payload), in the same process.
2. Per-token overhead: a fake Anthropic server streams tokens; time from the server
   writing a token's SSE frame to the WebSocket client parsing its `text` event
   (one loopback HTTP hop, the SSE parser, the SQLite append, one loopback WS hop).
   Reference: the same fake server read directly by a plain aiohttp client with the
   same SSE parser (one loopback HTTP hop).

Run: `python -m bench.agent [--quick]` (from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from aetherd.agent.sse import SSEParser
from aetherd.services.transcript import TranscriptStore
from aetherd.settings import Settings
from bench.support import percentile, serve_in_process, settings_for
from tests.fake_providers import FakeProvider, Turn


@dataclass(frozen=True)
class Sizes:
    """How much each case does; the defaults are the figures of docs/performance.md."""

    tasks: int = 50
    events: int = 10_000  # a multiple of `tasks`
    runs: int = 15  # connects per history case
    tokens: int = 600


QUICK = Sizes(tasks=10, events=1_000, runs=3, tokens=50)


async def fill(path: Path, sizes: Sizes, mergeable: bool = True) -> None:
    """50 tasks of 200 events: status, 194 text pieces in 2 messages, tool call, result, done.

    With `mergeable=False` the text pieces are tool results instead (nothing merges:
    the worst case for the history frame)."""
    store = TranscriptStore(path)
    await store.start()
    per_task = sizes.events // sizes.tasks
    for t in range(sizes.tasks):
        task_id = f"task-{t}"
        await store.create_task(task_id, f"prompt {t}", "anthropic", "m", "completed")
        store.append(task_id, "status", {"status": "queued", "prompt": f"prompt {t}"})
        store.append(task_id, "status", {"status": "running"})
        pieces = per_task - 6
        for i in range(pieces):
            if mergeable:
                message = f"m{t}-{i * 2 // pieces}"
                store.append(task_id, "text", {"messageId": message, "content": f"token {i} "})
            else:
                store.append(
                    task_id,
                    "tool_result",
                    {
                        "toolCallId": f"c{t}-{i}",
                        "name": "grep",
                        "isError": False,
                        "result": "/a.py:1: x",
                    },
                )
        store.append(
            task_id,
            "tool_invocation",
            {
                "toolCallId": f"c{t}",
                "name": "bash",
                "input": {"command": "ls"},
                "status": "running",
            },
        )
        store.append(
            task_id,
            "tool_result",
            {"toolCallId": f"c{t}", "name": "bash", "isError": False, "result": "a\nb\n" * 50},
        )
        store.append(task_id, "status", {"status": "completed"})
        store.append(
            task_id,
            "done",
            {"status": "completed", "usage": {"inputTokens": 10, "outputTokens": 20}},
        )
        await store.flush()
    await store.stop()


async def start(settings: Settings) -> tuple[web.AppRunner, str]:
    """The daemon in this process; its runner and its WebSocket URL."""
    runner, base = await serve_in_process(settings)
    return runner, f"{base}/ws?token={settings.token}"


def settings_in(tmp: Path, **extra: Any) -> Settings:
    root = tmp / "ws"
    root.mkdir(exist_ok=True)
    return settings_for(root, tmp / "data", log_level="error", **extra)


async def bench_history(tmp: Path, sizes: Sizes, mergeable: bool) -> None:
    settings = settings_in(tmp)
    db = settings.data_dir / "agent.sqlite3"
    await fill(db, sizes, mergeable)
    ref = []
    for _ in range(sizes.runs):
        t0 = time.perf_counter()
        conn = sqlite3.connect(db)
        rows = conn.execute(
            "SELECT seq, task_id, type, created_at, payload FROM events ORDER BY seq"
        ).fetchall()
        [json.loads(r[4]) for r in rows]
        conn.close()
        ref.append(time.perf_counter() - t0)
    assert len(rows) == sizes.events
    runner, url = await start(settings)
    took = []
    size = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(sizes.runs):
            t0 = time.perf_counter()
            async with session.ws_connect(url) as ws:
                while True:
                    msg = await ws.receive(timeout=30)
                    frame = json.loads(msg.data)
                    if frame.get("type") == "history":
                        break
                took.append(time.perf_counter() - t0)
                size = len(msg.data)
    await runner.cleanup()
    assert frame["latestSeq"] == sizes.events and not frame["hasMore"]
    what = "mostly text pieces" if mergeable else "nothing mergeable"
    print(f"## History on connect ({sizes.events:,} events, {sizes.tasks} tasks, {what})")
    print(f"frame: {len(frame['events'])} merged events, {size / 1024:.0f} KiB")
    print("| measure | median | p95 |")
    print("|---|---|---|")
    print(
        f"| connect → whole history parsed | {statistics.median(took) * 1000:.1f} ms "
        f"| {percentile(took, 0.95) * 1000:.1f} ms |"
    )
    print(
        f"| reference: plain sqlite3 read + json.loads | {statistics.median(ref) * 1000:.1f} ms "
        f"| {percentile(ref, 0.95) * 1000:.1f} ms |"
    )
    print()


async def bench_tokens(tmp: Path, tokens: int) -> None:
    sent: dict[str, float] = {}

    def mark(_index: int, text: str) -> None:
        if '"text_delta"' in text:
            sent[json.loads(text.split("data: ", 1)[1])["delta"]["text"]] = time.perf_counter()

    pieces = [f"tok{i} " for i in range(tokens)]
    provider = await FakeProvider("anthropic").start()

    # Reference: the provider read directly, same SSE parser.
    provider.add(Turn(text=pieces, chunk_size=0, frame_delay=0.003, on_frame=mark))
    ref: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(provider.base_url + "/v1/messages", json={"model": "m"}) as resp:
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for event in parser.feed(chunk):
                    data = json.loads(event.data)
                    if data.get("type") == "content_block_delta":
                        ref.append(now - sent[data["delta"]["text"]])
    sent.clear()

    settings = settings_in(tmp / "tok", anthropic_api_key="k", anthropic_base_url=provider.base_url)
    runner, url = await start(settings)
    provider.add(Turn(text=pieces, chunk_size=0, frame_delay=0.003, on_frame=mark))
    took: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            await ws.send_json({"channel": "agent", "type": "prompt", "prompt": "go"})
            while True:
                msg = await ws.receive(timeout=30)
                now = time.perf_counter()
                frame = json.loads(msg.data)
                if frame.get("type") == "text":
                    took.append(now - sent[frame["content"]])
                elif frame.get("type") == "done":
                    break
    await runner.cleanup()
    await provider.close()
    assert len(took) == tokens, len(took)
    print(f"## Per-token overhead ({tokens} tokens, one SSE frame each, 3 ms apart)")
    print("| path | p50 | p99 | max |")
    print("|---|---|---|---|")
    for name, values in (
        ("provider → daemon → WebSocket client `text`", took),
        ("reference: provider → plain aiohttp client", ref),
    ):
        print(
            f"| {name} | {percentile(values, 0.5) * 1000:.2f} ms "
            f"| {percentile(values, 0.99) * 1000:.2f} ms "
            f"| {max(values) * 1000:.2f} ms |"
        )


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    sizes = QUICK if parser.parse_args(argv).quick else Sizes()
    os.environ.pop("ANTHROPIC_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        for sub, mergeable in (("h1", True), ("h2", False)):
            (Path(tmp) / sub).mkdir()
            await bench_history(Path(tmp) / sub, sizes, mergeable)
        (Path(tmp) / "tok").mkdir()
        await bench_tokens(Path(tmp), sizes.tokens)


if __name__ == "__main__":
    asyncio.run(main())
