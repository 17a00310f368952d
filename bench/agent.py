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

Run: `python bench/agent.py` (from the repository root).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aetherd.agent.sse import SSEParser  # noqa: E402
from aetherd.app import create_app  # noqa: E402
from aetherd.services.transcript import TranscriptStore  # noqa: E402
from aetherd.settings import Settings  # noqa: E402
from tests.fake_providers import FakeProvider, Turn  # noqa: E402

TOKEN = "bench-token"
TASKS, EVENTS = 50, 10_000
RUNS = 15
TOKENS = 600


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def fill(path: Path, mergeable: bool = True) -> None:
    """50 tasks of 200 events: status, 194 text pieces in 2 messages, tool call, result, done.

    With `mergeable=False` the text pieces are tool results instead (nothing merges:
    the worst case for the history frame)."""
    store = TranscriptStore(path)
    await store.start()
    per_task = EVENTS // TASKS
    for t in range(TASKS):
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
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/workspaces/bench/ws?token={TOKEN}"


def settings_for(tmp: Path, **extra) -> Settings:
    root = tmp / "ws"
    root.mkdir(exist_ok=True)
    return Settings(
        port=0,
        workspace_id="bench",
        root=root,
        data_dir=tmp / "data",
        token=TOKEN,
        log_level="error",
        **extra,
    )


async def bench_history(tmp: Path, mergeable: bool) -> None:
    settings = settings_for(tmp)
    db = settings.data_dir / "agent.sqlite3"
    await fill(db, mergeable)
    ref = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        conn = sqlite3.connect(db)
        rows = conn.execute(
            "SELECT seq, task_id, type, created_at, payload FROM events ORDER BY seq"
        ).fetchall()
        [json.loads(r[4]) for r in rows]
        conn.close()
        ref.append(time.perf_counter() - t0)
    assert len(rows) == EVENTS
    runner, url = await start(settings)
    took = []
    size = 0
    async with aiohttp.ClientSession() as session:
        for _ in range(RUNS):
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
    assert frame["latestSeq"] == EVENTS and not frame["hasMore"]
    what = "mostly text pieces" if mergeable else "nothing mergeable"
    print(f"## History on connect (10,000 events, 50 tasks, {what})")
    print(f"frame: {len(frame['events'])} merged events, {size / 1024:.0f} KiB")
    print("| measure | median | p95 |")
    print("|---|---|---|")
    print(
        f"| connect → whole history parsed | {statistics.median(took) * 1000:.1f} ms "
        f"| {pct(took, 0.95) * 1000:.1f} ms |"
    )
    print(
        f"| reference: plain sqlite3 read + json.loads | {statistics.median(ref) * 1000:.1f} ms "
        f"| {pct(ref, 0.95) * 1000:.1f} ms |"
    )
    print()


async def bench_tokens(tmp: Path) -> None:
    sent: dict[str, float] = {}

    def mark(_index: int, text: str) -> None:
        if '"text_delta"' in text:
            sent[json.loads(text.split("data: ", 1)[1])["delta"]["text"]] = time.perf_counter()

    pieces = [f"tok{i} " for i in range(TOKENS)]
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

    settings = settings_for(
        tmp / "tok", anthropic_api_key="k", anthropic_base_url=provider.base_url
    )
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
    assert len(took) == TOKENS, len(took)
    print(f"## Per-token overhead ({TOKENS} tokens, one SSE frame each, 3 ms apart)")
    print("| path | p50 | p99 | max |")
    print("|---|---|---|---|")
    for name, values in (
        ("provider → daemon → WebSocket client `text`", took),
        ("reference: provider → plain aiohttp client", ref),
    ):
        print(
            f"| {name} | {pct(values, 0.5) * 1000:.2f} ms | {pct(values, 0.99) * 1000:.2f} ms "
            f"| {max(values) * 1000:.2f} ms |"
        )


async def main() -> None:
    os.environ.pop("ANTHROPIC_API_KEY", None)
    with tempfile.TemporaryDirectory() as tmp:
        for sub, mergeable in (("h1", True), ("h2", False)):
            (Path(tmp) / sub).mkdir()
            await bench_history(Path(tmp) / sub, mergeable)
        (Path(tmp) / "tok").mkdir()
        await bench_tokens(Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
