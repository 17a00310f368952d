"""Files benchmark: every figure beside its reference, measured in the same run.

    python -m bench.files [--quick]

1. HTTP bulk read (GET) and write (PUT) of a 50 MiB file (8 MiB with `--quick`) with
   curl, against `cp` of the same file on the same disk (and `cp` + `sync`, since PUT
   fsyncs).
2. 1,000 reads of 4 KiB files over the WebSocket (one at a time, and 32 in flight),
   against the same reads in-process (`FileSystem.read`, with its default loop path and
   forced into a thread) and raw `open().read()`; and the socket's own floor: a request
   the daemon answers without file work, against a bare aiohttp WebSocket echo.
3. Watcher latency, p50 and p99: a write on disk until its `change` event arrives at a
   WebSocket client (the default 100 ms debounce included).
4. Watch setup time and watches used on a generated tree of 20,000 directories, 18,000
   of them under node_modules, against watchdog's own recursive inotify observer.

The daemon runs in this process on 127.0.0.1; curl and cp run as child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from aetherd.services.fs import FileLimits, FileSystem
from aetherd.services.jail import Jail
from aetherd.services.watcher import Watcher
from bench.support import TOKEN, MiB, percentile, seconds, serve_in_process, settings_for


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def inotify_watches_in_process() -> int:
    """Every inotify watch this process holds (all inotify fds)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as handle:
                total += sum(1 for line in handle if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


async def bench_http(base: str, root: Path, scratch: Path, repeat: int, mib: int) -> list[tuple]:
    size = mib * MiB
    source = scratch / "src.bin"
    with open(source, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(os.urandom(MiB))
    url = f"{base}/files/content?token={TOKEN}&path="

    def cp() -> None:
        run(["cp", str(source), str(scratch / "cp.bin")])

    def cp_sync() -> None:
        run(["sh", "-c", f"cp {source} {scratch / 'cps.bin'} && sync {scratch / 'cps.bin'}"])

    def put() -> None:
        run(["curl", "-sf", "-T", str(source), url + "/up.bin"])

    def get() -> None:
        run(["curl", "-sf", "-o", str(scratch / "down.bin"), url + "/up.bin"])

    def get_null() -> None:
        run(["curl", "-sf", "-o", "/dev/null", url + "/up.bin"])

    def rounds() -> dict[str, float]:
        # Interleaved, so that a noisy neighbour hurts every figure alike; medians.
        funcs = {"cp": cp, "cp_sync": cp_sync, "put": put, "get": get, "get_null": get_null}
        times: dict[str, list[float]] = {name: [] for name in funcs}
        for _ in range(repeat):
            for name, func in funcs.items():
                times[name].append(seconds(func))
        return {name: statistics.median(values) for name, values in times.items()}

    t = await asyncio.get_running_loop().run_in_executor(None, rounds)
    t_cp, t_cps, t_put, t_get, t_null = t["cp"], t["cp_sync"], t["put"], t["get"], t["get_null"]
    assert (root / "up.bin").stat().st_size == size
    assert (scratch / "down.bin").stat().st_size == size
    mbps = lambda t: size / t / MiB  # noqa: E731
    return [
        (
            f"HTTP GET {mib} MiB (curl → /dev/null)",
            f"{mbps(t_null):.0f} MiB/s",
            "cp",
            f"{mbps(t_cp):.0f} MiB/s",
            f"{t_cp / t_null:.2f}x cp",
        ),
        (
            f"HTTP GET {mib} MiB (curl → file)",
            f"{mbps(t_get):.0f} MiB/s",
            "cp",
            f"{mbps(t_cp):.0f} MiB/s",
            f"{t_cp / t_get:.2f}x cp",
        ),
        (
            f"HTTP PUT {mib} MiB (file → curl, fsync)",
            f"{mbps(t_put):.0f} MiB/s",
            "cp",
            f"{mbps(t_cp):.0f} MiB/s",
            f"{t_cp / t_put:.2f}x cp",
        ),
        (
            f"HTTP PUT {mib} MiB (file → curl, fsync)",
            f"{mbps(t_put):.0f} MiB/s",
            "cp + sync",
            f"{mbps(t_cps):.0f} MiB/s",
            f"{t_cps / t_put:.2f}x cp+sync",
        ),
    ]


async def bare_echo_round_trip(count: int) -> float:
    """Seconds per round trip of a bare aiohttp WebSocket echo (server and client here)."""
    from aiohttp import web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    frame = json.dumps({"channel": "files", "type": "read", "requestId": "x", "path": "/f"})
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
            start = time.perf_counter()
            for _ in range(count):
                await ws.send_str(frame)
                json.loads((await ws.receive()).data)
            elapsed = time.perf_counter() - start
            await ws.close()
    finally:
        await runner.cleanup()
    return elapsed / count


async def bench_small_reads(base: str, root: Path, count: int) -> list[tuple]:
    small = root / "small"
    small.mkdir()
    for i in range(count):
        (small / f"f{i}.txt").write_bytes(b"a" * 4096)
    fs = FileSystem(Jail(root))  # the daemon's defaults: small cached reads on the loop
    threaded = FileSystem(Jail(root), FileLimits(loop_read_max=0))  # every read in a thread

    start = time.perf_counter()
    for i in range(count):
        with open(small / f"f{i}.txt", "rb") as handle:
            handle.read()
    t_raw = time.perf_counter() - start

    start = time.perf_counter()
    for i in range(count):
        await fs.read(f"/small/f{i}.txt")
    t_inproc = time.perf_counter() - start

    start = time.perf_counter()
    for i in range(count):
        await threaded.read(f"/small/f{i}.txt")
    t_thread = time.perf_counter() - start

    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?token={TOKEN}", max_msg_size=0)
        pending: dict[str, asyncio.Future] = {}

        async def reader() -> None:
            async for msg in ws:
                frame = json.loads(msg.data)
                future = pending.pop(frame.get("requestId", ""), None)
                if future is not None:
                    future.set_result(frame)

        task = asyncio.create_task(reader())

        async def one(i: int, type_: str = "read") -> None:
            rid = uuid.uuid4().hex
            future = asyncio.get_running_loop().create_future()
            pending[rid] = future
            await ws.send_str(
                json.dumps(
                    {
                        "channel": "files",
                        "type": type_,
                        "requestId": rid,
                        "path": f"/small/f{i}.txt",
                    }
                )
            )
            frame = await future
            if type_ == "read":
                assert frame["success"] and len(frame["data"]["content"]) == 4096
            else:
                assert frame["code"] == "UNKNOWN_TYPE"

        start = time.perf_counter()
        for i in range(count):
            await one(i)
        t_seq = time.perf_counter() - start

        slots = asyncio.Semaphore(32)

        async def limited(i: int) -> None:
            async with slots:
                await one(i)

        start = time.perf_counter()
        await asyncio.gather(*(limited(i) for i in range(count)))
        t_par = time.perf_counter() - start

        # The socket alone: a request the daemon answers without any file work.
        start = time.perf_counter()
        for i in range(count):
            await one(i, "no-such-type")
        t_floor = time.perf_counter() - start
        task.cancel()
        await ws.close()
    t_echo = await bare_echo_round_trip(count) * count
    rate = lambda t: f"{count / t:,.0f}/s ({t / count * 1e6:.0f} µs each)"  # noqa: E731
    return [
        (
            f"{count} x 4 KiB read over the socket, 1 in flight",
            rate(t_seq),
            "in-process FileSystem.read",
            rate(t_inproc),
            f"{t_inproc / t_seq:.2f}x",
        ),
        (
            f"{count} x 4 KiB read over the socket, 32 in flight",
            rate(t_par),
            "in-process FileSystem.read",
            rate(t_inproc),
            f"{t_inproc / t_par:.2f}x",
        ),
        (
            f"{count} x 4 KiB read over the socket, 1 in flight",
            rate(t_seq),
            "in-process read in a thread (loop_read_max 0)",
            rate(t_thread),
            f"{t_thread / t_seq:.2f}x",
        ),
        (
            f"{count} x unknown-type request over the socket (no file work)",
            rate(t_floor),
            "bare aiohttp WebSocket echo, same process",
            rate(t_echo),
            f"{t_echo / t_floor:.2f}x",
        ),
        ("", "", "raw open().read()", rate(t_raw), ""),
    ]


async def bench_latency(base: str, root: Path, samples: int) -> list[tuple]:
    (root / "lat").mkdir()
    latencies = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?token={TOKEN}", max_msg_size=0)
        await asyncio.sleep(0.2)  # let the new directory's watch settle before measuring
        for i in range(samples):
            path = root / "lat" / f"f{i}"
            start = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)
            while True:
                msg = await ws.receive(timeout=5)
                frame = json.loads(msg.data)
                if frame.get("type") == "change" and frame.get("path") == f"/lat/f{i}":
                    break
            latencies.append((time.perf_counter() - start) * 1000)
        await ws.close()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return [
        (
            f"watcher latency, write → client ({samples} samples)",
            f"p50 {p50:.0f} ms, p99 {p99:.0f} ms",
            "debounce setting",
            "100 ms",
            "target p99 < 250 ms",
        ),
    ]


def make_tree(root: Path, outside: int, inside: int) -> None:
    per = 10
    for i in range(outside // per):
        for j in range(per - 1):
            (root / "src" / f"m{i}" / f"d{j}").mkdir(parents=True, exist_ok=True)
    made = sum(1 for _ in root.rglob("*"))
    need = outside - made - 1  # + root
    for k in range(max(0, need)):
        (root / "extra" / f"e{k}").mkdir(parents=True, exist_ok=True)
    for i in range(inside // per):
        for j in range(per - 1):
            (root / "node_modules" / f"pkg{i}" / f"lib{j}").mkdir(parents=True, exist_ok=True)


async def bench_watch_setup(scratch: Path, quick: bool) -> list[tuple]:
    root = scratch / "tree"
    total_out, total_in = (200, 1800) if quick else (2000, 18000)
    make_tree(root, total_out, total_in)
    dirs = sum(1 for p in root.rglob("*") if p.is_dir()) + 1
    under = sum(1 for p in (root / "node_modules").rglob("*") if p.is_dir()) + 1

    watcher = Watcher(root)
    start = time.perf_counter()
    await watcher.start()
    t_ours = time.perf_counter() - start
    ours = watcher.kernel_watch_count()
    await watcher.stop()

    from watchdog.events import FileSystemEventHandler
    from watchdog.observers.inotify import InotifyObserver

    before = inotify_watches_in_process()
    observer = InotifyObserver()
    observer.schedule(FileSystemEventHandler(), str(root), recursive=True)
    start = time.perf_counter()
    observer.start()
    t_wd = time.perf_counter() - start
    theirs = inotify_watches_in_process() - before
    observer.stop()
    observer.join(10)
    return [
        (
            f"watch setup, {dirs:,} dirs ({under:,} under node_modules)",
            f"{t_ours * 1000:.0f} ms, {ours:,} watches",
            "watchdog recursive observer",
            f"{t_wd * 1000:.0f} ms, {theirs:,} watches",
            f"{theirs / max(ours, 1):.0f}x fewer watches",
        ),
    ]


def table(rows: list[tuple]) -> str:
    head = "| Measure | aetherd | Reference | Reference figure | Ratio |\n|---|---|---|---|---|\n"
    return head + "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--only",
        default="http,small,latency,watch",
        help="comma-separated parts to run (default: all): http, small, latency, watch",
    )
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="aetherd-bench-files-", dir=os.environ.get("BENCH_DIR")))
    root = scratch / "ws"
    root.mkdir()
    settings = settings_for(root, scratch / "data", log_level="warning", log_format="text")
    runner, base = await serve_in_process(settings)
    rows: list[tuple] = []
    try:
        if "http" in parts:
            rows += await bench_http(base, root, scratch, *((1, 8) if args.quick else (7, 50)))
        if "small" in parts:
            rows += await bench_small_reads(base, root, 100 if args.quick else 1000)
        if "latency" in parts:
            rows += await bench_latency(base, root, 10 if args.quick else 200)
    finally:
        await runner.cleanup()
    if "watch" in parts:
        rows += await bench_watch_setup(scratch, args.quick)
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
