"""Preview proxy benchmark: every figure beside the same measurement made directly on the
upstream, in the same run.

    python -m bench.proxy [--quick]

Three processes: an aiohttp upstream (a stand-in dev server, `--serve-upstream`), the
daemon (`python -m aetherd serve`), and the clients here. "direct" talks to the upstream;
"proxy" goes through `/workspaces/local/ports/{port}/…` with `Authorization: Bearer`.

1. GET of a 50 MiB response (8 MiB with `--quick`), streamed by the client in 1 MiB
   reads: MiB/s, median of 5 runs each (3 with `--quick`), direct and proxied
   interleaved. The daemon's RSS before and after.
2. Small requests, one at a time on one keep-alive connection: p50 and p99 latency of
   2,000 requests (200 with `--quick`), direct and proxied interleaved in batches of 100.
3. 200 concurrent keep-alive clients (50 with `--quick`), each with its own connection,
   20 requests each: errors, p50 and p99. The daemon runs with
   `--max-pending-connections 512`: with the default 64, the connection guard closes
   the oldest of a burst of 200 brand-new, not yet authenticated connections.
4. WebSocket echo: messages per second, one in flight (round trips) and 64 in flight
   (throughput), 5,000 messages of 100 bytes (1,000 with `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.support import (
    REPO,
    TOKEN,
    Child,
    Daemon,
    MiB,
    cpu_seconds,
    free_port,
    percentile,
    rss_bytes,
    step,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCK = bytes(range(256)) * 256  # 64 KiB


# -- The upstream (a child process) ---------------------------------------------------------


def serve_upstream(port: int) -> None:
    """A dev-server stand-in on 127.0.0.1: /big?size=N, /small, /ws (echo)."""

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            piece = BLOCK[: min(len(BLOCK), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def small(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/big", big)
        app.router.add_get("/small", small)
        app.router.add_get("/ws", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("upstream ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


# -- Measurements ---------------------------------------------------------------------------


async def bulk(session: aiohttp.ClientSession, url: str, size: int) -> float:
    """MiB/s of one streamed GET of `size` bytes."""
    start = time.perf_counter()
    received = 0
    async with session.get(f"{url}/big?size={size}", headers=AUTH) as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_chunked(MiB):
            received += len(chunk)
    assert received == size
    return size / MiB / (time.perf_counter() - start)


async def small_latencies(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    """Seconds of each of `count` sequential GET /small."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        async with session.get(f"{url}/small", headers=AUTH) as resp:
            await resp.read()
            assert resp.status == 200
        times.append(time.perf_counter() - start)
    return times


async def concurrent_clients(url: str, clients: int, each: int) -> tuple[int, list[float]]:
    """`clients` keep-alive clients, each on its own connection: (errors, latencies)."""
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(each):
                start = time.perf_counter()
                try:
                    async with session.get(f"{url}/small", headers=AUTH) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(one() for _ in range(clients)))
    return errors, latencies


async def ws_rate(url: str, count: int, window: int) -> float:
    """Echoed messages per second with `window` messages in flight."""
    payload = "x" * 100
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws", headers=AUTH, compress=0) as ws:
            start = time.perf_counter()
            sent = received = 0
            while received < count:
                while sent < count and sent - received < window:
                    await ws.send_str(payload)
                    sent += 1
                msg = await ws.receive(timeout=30)
                assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == payload
                received += 1
            return count / (time.perf_counter() - start)


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


async def run(quick: bool) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="aetherd-bench-proxy-", dir=os.environ.get("BENCH_DIR")))
    root = scratch / "ws"
    root.mkdir()
    upstream_port = free_port()
    upstream = Child(
        [sys.executable, "-m", "bench.proxy", "--serve-upstream", str(upstream_port)],
        {**os.environ, "PYTHONPATH": str(REPO)},
        ready="ready",
    )
    # A burst of 200 new connections would exceed the connection guard's default of 64
    # unauthenticated connections (aetherd/transport/guard.py closes the oldest ones);
    # the figure is about the proxy, so the limit is raised above the client count.
    daemon = Daemon(
        root, scratch / "data", "--log-level", "warning", "--max-pending-connections", "512"
    )
    try:
        daemon.wait_ready()
        direct = f"http://127.0.0.1:{upstream_port}"
        proxied = f"http://127.0.0.1:{daemon.port}/workspaces/local/ports/{upstream_port}"
        size = (8 if quick else 50) * MiB
        repeats = 3 if quick else 5
        lines: list[str] = []

        step(f"bulk GET of {size // MiB} MiB, {repeats} runs each")
        async with aiohttp.ClientSession() as session:
            for url in (direct, proxied):  # warm-up
                await bulk(session, url, MiB)
            rss_before = rss_bytes(daemon.pid)
            rates: dict[str, list[float]] = {"direct": [], "proxy": []}
            cpu = {"upstream": 0.0, "daemon": 0.0}
            for _ in range(repeats):
                before = cpu_seconds(upstream.pid)
                rates["direct"].append(await bulk(session, direct, size))
                cpu["upstream"] += cpu_seconds(upstream.pid) - before
                before = cpu_seconds(daemon.pid)
                rates["proxy"].append(await bulk(session, proxied, size))
                cpu["daemon"] += cpu_seconds(daemon.pid) - before
            rss_after = rss_bytes(daemon.pid)
        direct_rate = statistics.median(rates["direct"])
        proxy_rate = statistics.median(rates["proxy"])
        lines += [
            f"## GET of a {size // MiB} MiB response (median of {repeats})",
            "",
            "| path | MiB/s | ratio |",
            "|---|---|---|",
            f"| direct to the upstream | {direct_rate:.0f} | 1.00 |",
            f"| through the proxy | {proxy_rate:.0f} | {proxy_rate / direct_rate:.2f} |",
            "",
            f"Daemon RSS: {rss_before / MiB:.1f} MiB before, {rss_after / MiB:.1f} MiB after "
            f"{repeats} proxied transfers. CPU per MiB: the daemon relaying "
            f"{cpu['daemon'] * 1000 / (repeats * size / MiB):.2f} ms, the upstream serving "
            f"directly {cpu['upstream'] * 1000 / (repeats * size / MiB):.2f} ms.",
            "",
        ]

        count = 200 if quick else 2000
        step(f"{count} small requests each, one at a time")
        samples: dict[str, list[float]] = {"direct": [], "proxy": []}
        async with aiohttp.ClientSession() as d_session, aiohttp.ClientSession() as p_session:
            await small_latencies(d_session, direct, 20)
            await small_latencies(p_session, proxied, 20)
            cpu = {"upstream": 0.0, "daemon": 0.0}
            for _ in range(count // 100):
                before = cpu_seconds(upstream.pid)
                samples["direct"] += await small_latencies(d_session, direct, 100)
                cpu["upstream"] += cpu_seconds(upstream.pid) - before
                before = cpu_seconds(daemon.pid)
                samples["proxy"] += await small_latencies(p_session, proxied, 100)
                cpu["daemon"] += cpu_seconds(daemon.pid) - before
        d50, p50 = percentile(samples["direct"], 0.5), percentile(samples["proxy"], 0.5)
        lines += [
            f"## Small requests, one at a time on a keep-alive connection ({count} each)",
            "",
            "| path | p50 | p99 |",
            "|---|---|---|",
            f"| direct | {ms(d50)} | {ms(percentile(samples['direct'], 0.99))} |",
            f"| through the proxy | {ms(p50)} | {ms(percentile(samples['proxy'], 0.99))} |",
            f"| overhead of the proxy (p50) | {ms(p50 - d50)} | |",
            "",
            f"CPU per request: the daemon relaying {cpu['daemon'] / count * 1e6:.0f} µs, the "
            f"upstream answering directly {cpu['upstream'] / count * 1e6:.0f} µs.",
            "",
        ]

        clients = 50 if quick else 200
        step(f"{clients} concurrent keep-alive clients, 20 requests each")
        rows = []
        for name, url in (("direct", direct), ("through the proxy", proxied)):
            start = time.perf_counter()
            errors, latencies = await concurrent_clients(url, clients, 20)
            elapsed = time.perf_counter() - start
            rows.append(
                f"| {name} | {errors} | {len(latencies) / elapsed:.0f} | "
                f"{ms(percentile(latencies, 0.5))} | {ms(percentile(latencies, 0.99))} |"
            )
        lines += [
            f"## {clients} concurrent keep-alive clients, 20 requests each",
            "",
            "| path | errors | requests/s | p50 | p99 |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]

        messages = 1000 if quick else 5000
        step(f"WebSocket echo, {messages} messages")
        ws_rows = []
        for window in (1, 64):
            before = cpu_seconds(upstream.pid)
            d_rate = await ws_rate(direct, messages, window)
            up_cpu = cpu_seconds(upstream.pid) - before
            before = cpu_seconds(daemon.pid)
            p_rate = await ws_rate(proxied, messages, window)
            relay_cpu = cpu_seconds(daemon.pid) - before
            ws_rows.append(
                f"| {window} in flight | {d_rate:.0f} | {p_rate:.0f} | {p_rate / d_rate:.2f} | "
                f"{up_cpu / messages * 1e6:.0f} µs | {relay_cpu / messages * 1e6:.0f} µs |"
            )
        lines += [
            f"## WebSocket echo, {messages} messages of 100 bytes",
            "",
            "| messages in flight | direct msgs/s | proxied msgs/s | ratio | upstream CPU/msg "
            "(direct) | daemon CPU/msg (relay) |",
            "|---|---|---|---|---|---|",
            *ws_rows,
        ]
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        )
        print("\n".join(lines))
    finally:
        daemon.stop()
        upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
