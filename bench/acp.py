"""ACP backend benchmarks (protocol section 17), each beside a reference measured in the
same run. The daemon runs in this process with the scripted ACP agent
(tests/fixtures/acp_agent.py) as its backend; a real WebSocket client drives it.

1. Prompt round trip: `prompt` sent → `done` received for a short turn (thinking and
   text chunks). Reference: the same JSON-RPC `session/prompt` sent straight to the
   same agent over its pipes by a bare client (no daemon, no transcript, no socket).
2. Abort: `abort` sent → `done{aborted}` received, for an agent that answers
   `session/cancel`, and for one that ignores it (its process group is killed after
   `acp_cancel_grace`, 1 s by default). Reference: the grace itself, and the time to
   SIGKILL and reap a plain child process.

Run: `python -m bench.acp [--quick]` (from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.support import TOKEN, percentile, serve_in_process, settings_for
from tests.support import WsClient, connect

AGENT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "acp_agent.py"


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"| {name} | {statistics.median(ms):.1f} ms | {percentile(ms, 0.9):.1f} ms | {len(ms)} |"


async def until_done(client: WsClient, task_id: str) -> dict[str, Any]:
    return await client.expect_type("agent", "done", timeout=60, taskId=task_id)


async def bare_round_trips(runs: int) -> list[float]:
    """session/prompt straight to the agent over its pipes (the reference)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(AGENT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    next_id = 0

    async def call(method: str, params: dict[str, Any]) -> dict[str, Any]:
        nonlocal next_id
        next_id += 1
        assert proc.stdin is not None and proc.stdout is not None
        message = {"jsonrpc": "2.0", "id": next_id, "method": method, "params": params}
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        await proc.stdin.drain()
        while True:
            reply = json.loads(await proc.stdout.readline())
            if reply.get("id") == next_id and "method" not in reply:
                return dict(reply)

    await call("initialize", {"protocolVersion": 1})
    session = (await call("session/new", {"cwd": "/", "mcpServers": []}))["result"]["sessionId"]
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        await call(
            "session/prompt", {"sessionId": session, "prompt": [{"type": "text", "text": "hello"}]}
        )
        out.append(time.perf_counter() - started)
    proc.stdin.close()
    proc.kill()
    await proc.wait()
    return out


async def kill_and_reap(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        proc = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
        started = time.perf_counter()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        out.append(time.perf_counter() - started)
    return out


async def run(tmp: Path, runs: int) -> None:
    root = tmp / "root"
    root.mkdir()
    settings = settings_for(
        root,
        tmp / "data",
        agent_backends={"scripted": shlex.join([sys.executable, str(AGENT)])},
        agent_permission_mode="full",
    )
    runner, base = await serve_in_process(settings)
    client = await connect(base.replace("http", "ws", 1) + "/ws", TOKEN)
    try:
        await client.expect_type("agent", "history")

        async def prompt(task_id: str, text: str) -> float:
            started = time.perf_counter()
            await client.send(
                {"channel": "agent", "type": "prompt", "prompt": text, "taskId": task_id,
                 "backend": "scripted"}
            )  # fmt: skip
            done = await until_done(client, task_id)
            assert done["status"] == "completed", done
            return time.perf_counter() - started

        await prompt("warm", "hello")  # starts the agent
        trips = [await prompt(f"t{i}", "hello") for i in range(runs)]

        async def abort(task_id: str, script: str) -> float:
            await client.send(
                {"channel": "agent", "type": "prompt", "prompt": script, "taskId": task_id,
                 "backend": "scripted"}
            )  # fmt: skip
            await client.expect_type("agent", "text", timeout=60, taskId=task_id)
            started = time.perf_counter()
            await client.send({"channel": "agent", "type": "abort", "taskId": task_id})
            done = await until_done(client, task_id)
            assert done["status"] == "aborted", done
            return time.perf_counter() - started

        cooperative = [await abort(f"a{i}", "slow") for i in range(runs)]
        stubborn = [await abort(f"s{i}", "ignore-cancel") for i in range(max(2, runs // 3))]
    finally:
        await client.close()
        await runner.cleanup()
    bare = await bare_round_trips(runs)
    kills = await kill_and_reap(runs)
    print(f"## ACP backends ({runs} runs; median, p90)\n")
    print("| case | median | p90 | runs |\n|---|---|---|---|")
    print(row("prompt → done, short turn, through the daemon", trips))
    print(row("reference: session/prompt straight to the agent's pipes", bare))
    print(row("abort → done, agent answers session/cancel", cooperative))
    print(row("abort → done, agent ignores session/cancel (killed)", stubborn))
    print(f"| reference: acp_cancel_grace | {settings.acp_cancel_grace * 1000:.1f} ms | — | — |")
    print(row("reference: SIGKILL and reap a plain child", kills))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="few runs, for a smoke run")
    runs = 3 if parser.parse_args(argv).quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), runs))


if __name__ == "__main__":
    main()
