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

The daemon runs in this process on 127.0.0.1; curl and cp run as child processes. The
small reads are medians over `--rounds` rounds, every kind measured in turn in each
round; the HTTP figures medians of interleaved rounds. Floors measured in the same
rounds: a bare aiohttp WebSocket echo (for a request), a bare aiohttp PUT handler that
drops the body (for an upload).

`--baseline DIR` adds two daemons as child processes, this checkout's (`new`) and the
one in DIR (`base`, e.g. `git archive main aetherd | tar -x -C DIR`), whose small reads,
no-work requests and PUT are measured in the same rounds: an A/B of two versions.
`--profile N` prints cProfile's top functions for N reads and N no-work requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from aetherd.services.fs import FileLimits, FileSystem
from aetherd.services.jail import Jail
from aetherd.services.watcher import Watcher
from bench.support import (
    TOKEN,
    Daemon,
    MiB,
    cpu_seconds,
    percentile,
    seconds,
    serve_in_process,
    settings_for,
    step,
)


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


async def upload_sink() -> tuple[web.AppRunner, str]:
    """A bare aiohttp PUT handler that reads the body and drops it: the floor of an
    upload through aiohttp's request parser. Its runner and URL."""

    async def sink(request: web.Request) -> web.Response:
        total = 0
        while chunk := await request.content.readany():
            total += len(chunk)
        return web.json_response({"size": total})

    app = web.Application(client_max_size=1 << 40)
    app.router.add_put("/sink", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/sink"


async def bench_http(
    base: str,
    root: Path,
    scratch: Path,
    repeat: int,
    mib: int,
    others: dict[str, tuple[str, int]] | None = None,
) -> list[tuple]:
    """GET and PUT against cp and cp + sync, interleaved rounds, medians; `others`:
    name → (workspace base URL, pid) of more daemons whose PUT (time, and the daemon's
    CPU time) is measured in the same rounds."""
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

    sink_runner, sink_url = await upload_sink()

    def sink() -> None:
        run(["curl", "-sf", "-o", "/dev/null", "-T", str(source), sink_url])

    def put_to(other: str, name: str) -> Callable[[], None]:
        return lambda: run(
            ["curl", "-sf", "-T", str(source), f"{other}/files/content?token={TOKEN}&path=/{name}"]
        )

    def rounds() -> dict[str, float]:
        # Interleaved, so that a noisy neighbour hurts every figure alike; medians.
        funcs = {"cp": cp, "cp_sync": cp_sync, "put": put, "get": get, "get_null": get_null}
        funcs["sink"] = sink
        # GET after PUT: the file must exist (the first round runs them in this order).
        for name in ("put", "get", "get_null"):
            funcs[name]()
        pids = {}
        for label, (other, pid) in (others or {}).items():
            funcs[f"put {label}"] = put_to(other, f"up-{label}.bin")
            pids[f"put {label}"] = pid
        times: dict[str, list[float]] = {name: [] for name in funcs}
        order = list(funcs)
        shuffle = random.Random(18).shuffle
        for _ in range(repeat):
            # A new order each round: each step's writeback lands on the next one.
            shuffle(order)
            for name in order:
                pid = pids.get(name)
                cpu = cpu_seconds(pid) if pid else 0.0
                times[name].append(seconds(funcs[name]))
                if pid:
                    cpu_times.setdefault(name, []).append(cpu_seconds(pid) - cpu)
        return {name: statistics.median(values) for name, values in times.items()}

    cpu_times: dict[str, list[float]] = {}

    try:
        t = await asyncio.get_running_loop().run_in_executor(None, rounds)
    finally:
        await sink_runner.cleanup()
    t_cp, t_cps, t_put, t_get, t_null = t["cp"], t["cp_sync"], t["put"], t["get"], t["get_null"]
    assert (root / "up.bin").stat().st_size == size
    assert (scratch / "down.bin").stat().st_size == size
    mbps = lambda t: size / t / MiB  # noqa: E731
    extra = [
        (
            f"bare aiohttp PUT sink {mib} MiB (reads the body, drops it)",
            f"{mbps(t['sink']):.0f} MiB/s",
            "cp + sync",
            f"{mbps(t_cps):.0f} MiB/s",
            f"{t_cps / t['sink']:.2f}x cp+sync",
        ),
    ]
    for label in others or {}:
        assert (root / f"up-{label}.bin").stat().st_size == size
        cpu_ms = statistics.mean(cpu_times[f"put {label}"]) * 1000  # 10 ms ticks: the mean
        extra.append(
            (
                f"child daemon {label}: HTTP PUT {mib} MiB (daemon CPU {cpu_ms:.0f} ms)",
                f"{mbps(t[f'put {label}']):.0f} MiB/s",
                "cp + sync",
                f"{mbps(t_cps):.0f} MiB/s",
                f"{t_cps / t[f'put {label}']:.2f}x cp+sync",
            )
        )
    return [
        *extra,
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


async def bare_echo_server() -> tuple[web.AppRunner, str]:
    """A bare aiohttp WebSocket echo in this process: the floor of any request over a
    socket served by aiohttp. Its runner and URL."""

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
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/ws"


class Requester:
    """One WebSocket client: sends a frame and waits for the reply with its requestId."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, echo: bool = False) -> None:
        self.ws = ws
        self.echo = echo
        self.pending: dict[str, asyncio.Future[dict]] = {}
        self.task = asyncio.create_task(self._reader())
        self.serial = 0

    async def _reader(self) -> None:
        async for msg in self.ws:
            frame = json.loads(msg.data)
            future = self.pending.pop(frame.get("requestId", ""), None)
            if future is not None:
                future.set_result(frame)

    async def one(self, path: str, type_: str = "read") -> None:
        self.serial += 1
        rid = f"r{self.serial}-{uuid.uuid4().hex[:8]}"
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        frame = {"channel": "files", "type": type_, "requestId": rid, "path": path}
        await self.ws.send_str(json.dumps(frame))
        reply = await future
        if self.echo:
            return
        if type_ == "read":
            assert reply["success"] and len(reply["data"]["content"]) == 4096, reply
        else:
            assert reply["code"] == "UNKNOWN_TYPE", reply

    async def close(self) -> None:
        self.task.cancel()
        await self.ws.close()


async def bench_small_reads(
    base: str,
    root: Path,
    count: int,
    rounds: int,
    others: dict[str, tuple[str, int]] | None = None,
) -> list[tuple]:
    """Per-request times, each the median over `rounds` rounds of `count // rounds`
    requests, every kind measured in turn within each round, in a new order each round
    (so that a noisy minute hurts all alike, and no kind always follows the same one).
    `others`: name → (workspace base URL, pid) of more daemons (child processes: this
    checkout's and a baseline's) measured in the same rounds, with their CPU time."""
    small = root / "small"
    small.mkdir()
    for i in range(count):
        (small / f"f{i}.txt").write_bytes(b"a" * 4096)
    fs = FileSystem(Jail(root))  # the daemon's defaults: small cached reads on the loop
    threaded = FileSystem(Jail(root), FileLimits(loop_read_max=0))  # every read in a thread
    per = max(1, count // rounds)
    echo_runner, echo_url = await bare_echo_server()
    times: dict[str, list[float]] = {}
    cpu_per: dict[str, list[float]] = {}  # a child daemon's CPU seconds per request

    def record(name: str, start: float) -> None:
        times.setdefault(name, []).append((time.perf_counter() - start) / per)

    async with aiohttp.ClientSession() as http:

        async def client(url: str, echo: bool = False) -> Requester:
            return Requester(await http.ws_connect(url, max_msg_size=0), echo)

        echo = await client(echo_url, echo=True)
        ours = await client(f"{base}/ws?token={TOKEN}")
        children = {
            name: await client(f"{url}/ws?token={TOKEN}")
            for name, (url, _) in (others or {}).items()
        }
        slots = asyncio.Semaphore(32)

        async def limited(name: str) -> None:
            async with slots:
                await ours.one(name)

        # Warm-up: pydantic's deferred schemas, the page cache, the first connections.
        for i in range(min(count, 100)):
            await ours.one(f"/small/f{i}.txt")
            await ours.one(f"/small/f{i}.txt", "no-such-type")
            for child in children.values():
                await child.one(f"/small/f{i}.txt")
                await child.one(f"/small/f{i}.txt", "no-such-type")
            await echo.one("/x")

        async def raw(names: list[str]) -> None:
            for name in names:
                with open(root / name.lstrip("/"), "rb") as handle:
                    handle.read()

        def each(func: Callable[[str], Awaitable[Any]]) -> Callable[[list[str]], Awaitable[None]]:
            async def run(names: list[str]) -> None:
                for name in names:
                    await func(name)

            return run

        async def in_flight(names: list[str]) -> None:
            await asyncio.gather(*(limited(name) for name in names))

        steps: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "raw": raw,
            "inproc": each(fs.read),
            "thread": each(threaded.read),
            "echo": each(echo.one),
            "nowork": each(lambda name: ours.one(name, "no-such-type")),
            "read1": each(ours.one),
            "read32": in_flight,
        }
        pids: dict[str, int] = {}
        for label, child in children.items():
            steps[f"{label} nowork"] = each(lambda name, c=child: c.one(name, "no-such-type"))
            steps[f"{label} read1"] = each(child.one)
            pids[f"{label} nowork"] = pids[f"{label} read1"] = (others or {})[label][1]
        order = list(steps)
        shuffle = random.Random(18).shuffle
        for r in range(rounds):
            names = [f"/small/f{(r * per + i) % count}.txt" for i in range(per)]
            shuffle(order)  # a new order each round: no step always follows the same one
            for name in order:
                pid = pids.get(name)
                cpu = cpu_seconds(pid) if pid else 0.0
                start = time.perf_counter()
                await steps[name](names)
                record(name, start)
                if pid:
                    cpu_per.setdefault(name, []).append((cpu_seconds(pid) - cpu) / per)
        for each in (echo, ours, *children.values()):
            await each.close()
    await echo_runner.cleanup()
    t = {name: statistics.median(values) for name, values in times.items()}
    spread = {name: (min(values), max(values)) for name, values in times.items()}

    def us(name: str) -> str:
        low, high = spread[name]
        return f"{t[name] * 1e6:.0f} µs ({low * 1e6:.0f}-{high * 1e6:.0f})"

    n = per * rounds
    rows = [
        (f"{n} x 4 KiB read over the socket, 1 in flight", us("read1"), "in-process FileSystem.read", us("inproc"), f"{t['inproc'] / t['read1']:.2f}x"),
        (f"{n} x 4 KiB read over the socket, 32 in flight", us("read32"), "in-process FileSystem.read", us("inproc"), f"{t['inproc'] / t['read32']:.2f}x"),
        (f"{n} x 4 KiB read over the socket, 1 in flight", us("read1"), "in-process read in a thread (loop_read_max 0)", us("thread"), f"{t['thread'] / t['read1']:.2f}x"),
        (f"{n} x request answered without file work (unknown type)", us("nowork"), "bare aiohttp WebSocket echo, same process", us("echo"), f"{t['echo'] / t['nowork']:.2f}x"),
        ("socket read minus in-process read (the socket's share)", f"{(t['read1'] - t['inproc']) * 1e6:.0f} µs", "no-work request minus bare echo (the daemon's own overhead)", f"{(t['nowork'] - t['echo']) * 1e6:.0f} µs", ""),
        ("", "", "raw open().read()", us("raw"), ""),
    ]  # fmt: skip
    if others:
        names = list(others)
        for kind, label in (("read1", "4 KiB read, 1 in flight"), ("nowork", "no-work request")):
            first, second = (f"{name} {kind}" for name in names[:2])
            rows.append(
                (f"child daemons: {label}, {names[0]}", us(first), names[1], us(second), f"{t[second] / t[first]:.2f}x")
            )  # fmt: skip
            # Clock ticks (10 ms) are coarse: the total over all rounds, per request.
            c1, c2 = (sum(cpu_per[name]) / len(cpu_per[name]) * 1e6 for name in (first, second))
            rows.append(
                (f"child daemons' CPU per request: {label}, {names[0]}", f"{c1:.0f} µs", names[1], f"{c2:.0f} µs", f"{c2 / c1:.2f}x")
            )  # fmt: skip
    return rows


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


async def profile_reads(base: str, count: int, type_: str) -> str:
    """cProfile of `count` sequential requests over the socket, daemon and client both
    in this thread (so all of a request's Python is visible); the top functions."""
    import cProfile
    import io
    import pstats

    async with aiohttp.ClientSession() as http:
        client = Requester(await http.ws_connect(f"{base}/ws?token={TOKEN}", max_msg_size=0))
        for i in range(100):
            await client.one(f"/small/f{i % 100}.txt", type_)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for i in range(count):
            await client.one(f"/small/f{i % 100}.txt", type_)
        profiler.disable()
        elapsed = time.perf_counter() - start
        await client.close()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    head = f"profile of {count} x {type_}: {elapsed / count * 1e6:.0f} µs per request (profiled)"
    return head + "\n" + out.getvalue()


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
    parser.add_argument(
        "--rounds", type=int, default=10, help="rounds of the small reads (medians over them)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (a directory holding its `aetherd` package): this checkout's"
        " daemon and the baseline's run as child processes, their small reads and HTTP PUT"
        " measured in the same rounds",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the small reads, cProfile N sequential reads and N no-work requests",
    )
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="aetherd-bench-files-", dir=os.environ.get("BENCH_DIR")))
    root = scratch / "ws"
    root.mkdir()
    settings = settings_for(root, scratch / "data", log_level="warning", log_format="text")
    runner, base = await serve_in_process(settings)
    rows: list[tuple] = []
    profiles: list[str] = []
    children: dict[str, Daemon] = {}
    if args.baseline is not None:
        for label, code in (("new", None), ("base", args.baseline.resolve())):
            children[label] = Daemon(
                root, scratch / f"data-{label}", "--log-level", "warning", code=code
            )
        for child in children.values():
            await asyncio.to_thread(child.wait_ready, 30, 0.05)
    others = {
        label: (f"http://127.0.0.1:{child.port}/workspaces/local", child.pid)
        for label, child in children.items()
    }
    try:
        if "http" in parts:
            step("http")
            rows += await bench_http(
                base, root, scratch, *((1, 8) if args.quick else (7, 50)), others=others
            )
        if "small" in parts:
            step("small reads")
            rows += await bench_small_reads(
                base, root, 100 if args.quick else 1000, 2 if args.quick else args.rounds, others
            )
            if args.profile:
                for type_ in ("read", "no-such-type"):
                    profiles.append(await profile_reads(base, args.profile, type_))
        if "latency" in parts:
            step("latency")
            rows += await bench_latency(base, root, 10 if args.quick else 200)
    finally:
        await runner.cleanup()
        for child in children.values():
            child.stop()
    if "watch" in parts:
        rows += await bench_watch_setup(scratch, args.quick)
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(table(rows))
    for text in profiles:
        print()
        print(text)


if __name__ == "__main__":
    asyncio.run(main())
