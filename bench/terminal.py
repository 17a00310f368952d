"""Terminal benchmark: aetherd against a raw PTY read, a bare aiohttp WebSocket and terminado.

Every figure is printed beside its reference, measured in the same run. Servers run in
their own processes, so their CPU time can be read from /proc. Shells get an empty HOME
(no slow ~/.bashrc). The whole run is bounded (about two minutes).

    python -m bench.terminal [--mb 50] [--samples 300] [--runs 3] [--only CASES]
                             [--daemon-arg=--event-loop=asyncio ...] [--profile] [--quick]

Throughput has two references, measured in the same rounds: the raw PTY read (the
issue's target) and a floor (the bare server reads `cat` from a PTY with the loop's
readiness callbacks and sends each batch as an output frame to the same client).

`--profile` also runs the throughput case with the daemon under cProfile and prints its
top functions. `--quick` is a smoke run (2 MB, 30 samples, fewer sessions: a few seconds).
`--runs N` repeats the whole run (fresh servers each time) and ends with the min-max of
every ratio; `--only throughput,flood` runs some cases (memory, throughput, echo, flood,
attach, prompt), each still beside its references. `--daemon-arg` passes a flag to the
daemon (for example `--daemon-arg=--event-loop=asyncio`). `--baseline DIR` runs a second
daemon from another checkout's `aetherd` package (`--baseline-arg` flags for it alone)
in the same throughput rounds and flood echo: before and after under the same load.
`--trace` times each flood echo's path through the daemon (input written, echo read from
the PTY, frame pulled, sent), its loop callbacks and socket queues, and a raw PTY echo
under the same floods.
Needs terminado (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench.support import (
    Child,
    Daemon,
    MiB,
    cpu_seconds,
    free_port,
    percentile,
    rss_bytes,
    step,
)


@dataclass
class Sizes:
    """How much each case does; the defaults give the figures of docs/performance.md."""

    mb: int = 50  # of base64 for throughput (at least 2: the attach case replays 1 MiB)
    samples: int = 300  # echo samples per case
    idle_sessions: int = 60  # for RSS per session
    floods: int = 10
    attaches: int = 20
    prompts: int = 30  # aetherd and in-process pty.fork; terminado gets half
    rounds: int = 3  # throughput rounds (raw, aetherd, floor, terminado, bare in turn)


TERMINADO_SERVER = r"""
import sys, tornado.ioloop, tornado.web, terminado
port = int(sys.argv[1])
mgr = terminado.UniqueTermManager(shell_command=["bash"], max_terminals=200)
app = tornado.web.Application([(r"/websocket", terminado.TermSocket, {"term_manager": mgr})])
app.listen(port, "127.0.0.1")
print("ready", flush=True)
tornado.ioloop.IOLoop.current().start()
"""

BARE_SERVER = r"""
import sys, json, base64, os
from aiohttp import web
port = int(sys.argv[1])
async def echo(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws
async def blast(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    total = int(request.query["bytes"])
    text = base64.b64encode(os.urandom(49152)).decode()
    sent = 0
    while sent < total:
        await ws.send_str(json.dumps({"channel": "terminal", "type": "output", "sessionId": "s",
                                      "offset": sent, "data": text}))
        sent += len(text)
    await ws.close()
    return ws
async def pty_floor(request):
    # The pipeline's floor: `cat` on a PTY read by the loop's readiness callback (reads
    # gathered up to 64 KiB, as the daemon does), each batch sent as an output frame
    # (orjson, send_frame) to the same client. No ring, no mirror, no sessions.
    import asyncio, orjson
    from aiohttp import WSMsgType
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    command = f"cat {request.query['path']}; printf '%s%s\\n' __ {request.query['marker']}"
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    os.set_blocking(master, False)
    ready = asyncio.Event()
    loop.add_reader(master, ready.set)
    offset, eof = 0, False
    try:
        while not eof:
            await ready.wait()
            ready.clear()
            chunks, got = [], 0
            while got < 65536:
                try:
                    data = os.read(master, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    eof = True
                    break
                chunks.append(data)
                got += len(data)
            if chunks:
                text = b"".join(chunks).decode("utf-8", "replace")
                frame = {"channel": "terminal", "type": "output", "sessionId": "s",
                         "offset": offset, "data": text}
                await ws.send_frame(orjson.dumps(frame), WSMsgType.TEXT)
                offset += got
    finally:
        loop.remove_reader(master)
        os.close(master)
        await proc.wait()
    await ws.close()
    return ws
app = web.Application()
app.router.add_get("/echo", echo)
app.router.add_get("/blast", blast)
app.router.add_get("/pty", pty_floor)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def make_data(path: Path, size: int) -> None:
    """`size` bytes of base64 (76-column lines) in `path`."""
    with path.open("wb") as handle:
        subprocess.run(["base64"], input=os.urandom(size * 3 // 4), stdout=handle, check=True)


# -- the raw reference ----------------------------------------------------------------------
def raw_pty_read(command: str, env: dict[str, str]) -> tuple[float, int, float]:
    """Seconds, bytes and reader CPU seconds to read `command`'s output from a PTY with os.read."""
    start = time.perf_counter()
    cpu0 = time.process_time()
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve("/bin/bash", ["bash", "-c", command], env)
    total = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        total += len(data)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    os.waitpid(pid, 0)
    os.close(fd)
    return elapsed, total, cpu


def _first_byte_times(runs: int, start_shell: Callable[[], tuple[int, int]]) -> list[float]:
    """Time from starting a shell (`start_shell` returns its pid and PTY master) to its
    first output byte, `runs` times; each shell is killed and reaped."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pid, fd = start_shell()
        os.read(fd, 65536)
        times.append(time.perf_counter() - start)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return times


def raw_first_prompt(env: dict[str, str], runs: int) -> list[float]:
    """Fork bash on a PTY in-process; time to its first output byte."""

    def fork() -> tuple[int, int]:
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover
            os.execve("/bin/bash", ["bash"], env)
        return pid, fd

    return _first_byte_times(runs, fork)


def raw_spawn_first_prompt(env: dict[str, str], runs: int) -> list[float]:
    """posix_spawn bash on a new PTY in-process (the daemon's way); time to its first byte."""

    def spawn() -> tuple[int, int]:
        master, slave = os.openpty()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        pid = os.posix_spawn("/bin/bash", ["bash"], env, file_actions=actions, setsid=True)
        os.close(slave)
        return pid, master

    return _first_byte_times(runs, spawn)


# -- clients ----------------------------------------------------------------------------------
P = TypeVar("P", bound="Peer")


class Peer:
    """One WebSocket to a server (aetherd or terminado), as an async context manager."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self: P) -> P:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()

    received = 0  # characters of text frames received

    async def text(self, timeout: float = 60) -> str:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(msg)
        self.received += len(msg.data)
        return str(msg.data)


async def read_until(output: Callable[[], Awaitable[str | None]], marker: str) -> int:
    """Read `output()` (None: not output) until `marker`; returns the characters of data seen."""
    tail = ""
    total = 0
    while True:
        data = await output()
        if data is None:
            continue
        total += len(data)
        tail = (tail + data)[-200:]
        if marker in tail:
            return total


class Aether(Peer):
    """A client socket to the daemon."""

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def create(self, sid: str, **fields: Any) -> None:
        await self.send({"channel": "terminal", "type": "create", "sessionId": sid, **fields})

    async def input(self, sid: str, data: str) -> None:
        await self.send({"channel": "terminal", "type": "input", "sessionId": sid, "data": data})

    async def close_session(self, sid: str) -> None:
        await self.send({"channel": "terminal", "type": "close", "sessionId": sid})

    frames = 0  # frames received

    async def frame(self) -> dict[str, Any]:
        self.frames += 1
        return dict(json.loads(await self.text()))

    async def output(self, sid: str) -> str | None:
        frame = await self.frame()
        if frame.get("sessionId") != sid or frame.get("type") != "output":
            return None
        return str(frame["data"])

    async def output_until(self, sid: str, marker: str) -> int:
        """Read `sid`'s output until `marker`; returns the bytes of data seen."""
        return await read_until(lambda: self.output(sid), marker)


class Terminado(Peer):
    """A client socket to terminado, in its `["stdin", …]`/`["stdout", …]` protocol."""

    async def stdin(self, data: str) -> None:
        await self.ws.send_str(json.dumps(["stdin", data]))

    async def output(self) -> str | None:
        kind, *rest = json.loads(await self.text())
        return str(rest[0]) if kind == "stdout" else None

    async def until(self, marker: str) -> int:
        return await read_until(self.output, marker)


def marker_cmd(marker: str) -> str:
    return f"printf '%s%s\\n' __ {marker}"


async def timed_cat(
    type_: Callable[[str], Awaitable[None]],
    until: Callable[[str], Awaitable[int]],
    pid: int,
    path: str,
) -> dict[str, float]:
    """Type `cat path` and a marker into a shell; seconds, characters, server `pid`'s
    CPU seconds and this client's until the marker comes back."""
    marker = uuid.uuid4().hex[:8]
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    start = time.perf_counter()
    await type_(f"cat {path}; {marker_cmd(marker)}\r")
    total = await until("__" + marker)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "bytes": total,
        "cpu": cpu_seconds(pid) - cpu0,
        "client_cpu": time.process_time() - client0,
    }


async def aether_throughput(url: str, pid: int, env: dict, path: str) -> dict[str, float]:
    async with Aether(url) as client:
        sid = "tp-" + uuid.uuid4().hex[:8]
        await client.create(sid, env=env)
        await client.output_until(sid, "#")
        frames0 = client.frames
        result = await timed_cat(
            lambda text: client.input(sid, text),
            lambda marker: client.output_until(sid, marker),
            pid,
            path,
        )
        result["frames"] = client.frames - frames0
        await client.close_session(sid)
    return result


async def terminado_throughput(url: str, pid: int, path: str) -> dict[str, float]:
    async with Terminado(url) as term:
        await term.until("#")
        result = await timed_cat(term.stdin, term.until, pid, path)
        await term.stdin("exit\r")
    return result


async def pty_floor(url: str, pid: int, path: str) -> dict[str, float]:
    """The bare server's PTY-to-WebSocket floor: `cat path` read from a PTY and sent as
    output frames to the same client as the daemon's (seconds, characters, server CPU)."""
    marker = uuid.uuid4().hex[:8]
    async with Aether(f"{url}/pty?path={path}&marker={marker}") as client:
        cpu0, client0 = cpu_seconds(pid), time.process_time()
        start = time.perf_counter()
        total = await client.output_until("s", "__" + marker)
        elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "bytes": total,
        "cpu": cpu_seconds(pid) - cpu0,
        "client_cpu": time.process_time() - client0,
    }


async def bare_blast(url: str, pid: int, size: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        cpu0 = cpu_seconds(pid)
        start = time.perf_counter()
        total = 0
        async with session.ws_connect(f"{url}/blast?bytes={size}", max_msg_size=0) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    total += len(json.loads(msg.data)["data"])
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "bytes": total, "cpu": cpu_seconds(pid) - cpu0}


# -- latency ----------------------------------------------------------------------------------
async def echo_times(
    samples: int,
    type_: Callable[[str], Awaitable[None]],
    seen: Callable[[str], Awaitable[None]],
    marks: list[tuple[float, float, int]] | None = None,
    ahead: Callable[[], int] | None = None,
) -> list[float]:
    """Type 'x' then backspace, alternately; time each until `seen` returns on its echo.

    `marks` gets each sample's (start, end, bytes waiting to be read on the client's
    side when the key was typed, from `ahead()`)."""
    times = []
    for index in range(samples):
        key = "x" if index % 2 == 0 else "\x7f"
        want = "x" if key == "x" else "\b"
        waiting = ahead() if ahead is not None else 0
        start = time.perf_counter()
        await type_(key)
        await seen(want)
        end = time.perf_counter()
        times.append(end - start)
        if marks is not None:
            marks.append((start, end, waiting))
    return times


def unread_bytes(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Bytes that arrived for `ws` but were not read yet: in the kernel's receive queue
    (FIONREAD) and in aiohttp's queue of parsed frames."""
    import fcntl
    import struct
    import termios

    sock = ws.get_extra_info("socket")
    queued = 0
    if sock is not None:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        queued = struct.unpack("i", buf)[0]
    return queued + int(getattr(getattr(ws, "_reader", None), "_size", 0) or 0)


async def aether_echo(
    client: Aether,
    sid: str,
    samples: int,
    marks: list[tuple[float, float, int]] | None = None,
) -> list[float]:
    prefix = '"sessionId":' + json.dumps(sid)

    async def seen(want: str) -> None:
        while True:
            text = await client.text(30)
            if prefix not in text[:120] or '"type":"output"' not in text[:60]:
                continue  # a flood frame: not parsed
            if want in json.loads(text)["data"]:
                return

    ahead = (lambda: unread_bytes(client.ws)) if marks is not None else None
    return await echo_times(samples, lambda key: client.input(sid, key), seen, marks, ahead)


async def terminado_echo(term: Terminado, samples: int) -> list[float]:
    async def seen(want: str) -> None:
        while True:
            kind, *rest = json.loads(await term.text(30))
            if kind == "stdout" and want in rest[0]:
                return

    return await echo_times(samples, term.stdin, seen)


async def bare_echo(url: str, samples: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/echo") as ws:
            frame = json.dumps(
                {"channel": "terminal", "type": "input", "sessionId": "s", "data": "x"}
            )
            for _ in range(samples):
                start = time.perf_counter()
                await ws.send_str(frame)
                await ws.receive(timeout=30)
                times.append(time.perf_counter() - start)
    return times


async def drain(ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event, total: list[int]) -> None:
    """Read a flooding socket until `stop`, adding the characters received to `total[0]`."""
    while not stop.is_set():
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        total[0] += len(msg.data)


async def measure_memory(
    aurl: str, turl: str, daemon: Child, terminado: Child, env: dict, count: int, results: dict
) -> None:
    """RSS growth per idle session (each has printed its prompt), on fresh servers."""
    step("memory")
    async with Aether(aurl) as client:
        # Warm up: the first session pays for code paths and imports, not per session.
        await client.create("warm", env=env)
        await client.output_until("warm", "#")
        await client.close_session("warm")
        while (await client.frame()).get("type") != "close":
            pass
        rss0 = rss_bytes(daemon.pid)
        for index in range(count):
            await client.create(f"idle{index}", env=env)
        seen: set[str] = set()
        while len(seen) < count:
            frame = await client.frame()
            if frame.get("type") == "output":
                seen.add(frame["sessionId"])
            elif frame.get("channel") == "error":
                raise RuntimeError(frame)
        rss1 = rss_bytes(daemon.pid)
        for index in range(count):
            await client.close_session(f"idle{index}")
        closed = 0
        while closed < count:
            closed += (await client.frame()).get("type") == "close"
    results["aetherd_rss_per_session"] = (rss1 - rss0) / count
    trss0 = rss_bytes(terminado.pid)
    terms = []
    for _ in range(count):
        term = Terminado(turl)
        await term.__aenter__()
        await term.until("#")
        terms.append(term)
    results["terminado_rss_per_session"] = (rss_bytes(terminado.pid) - trss0) / count
    for term in terms:
        await term.__aexit__()


# -- main ----------------------------------------------------------------------------------------
def profiled(prof: str) -> list[str]:
    """The interpreter's argv that runs the daemon's CLI under a CPU-time cProfile.

    CPU time, not wall time: on a shared 2-core machine wall time mostly measures
    waiting for a core."""
    return [
        sys.executable,
        "-c",
        "import cProfile, sys, time\n"
        "from aetherd.cli import main\n"
        "p = cProfile.Profile(time.process_time)\n"
        "p.enable()\n"
        "try:\n    main(sys.argv[1:])\n"
        f"finally:\n    p.disable()\n    p.dump_stats({prof!r})\n",
    ]


CASES = ("memory", "throughput", "echo", "flood", "attach", "prompt")


async def run(args: argparse.Namespace, sizes: Sizes, cases: set[str]) -> dict[str, Any]:
    """One full run with fresh servers; the measured figures by name."""
    tmp = Path(tempfile.mkdtemp(prefix="aetherd-bench-"))
    home = tmp / "home"
    home.mkdir()
    root = tmp / "root"
    root.mkdir()
    data_file = tmp / "data.b64"
    await asyncio.to_thread(make_data, data_file, sizes.mb * MiB)
    shell_env = {"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "xterm-256color"}
    server_env = {**os.environ, "HOME": str(home)}
    results: dict[str, Any] = {}

    if "attach" in cases and "throughput" not in cases:
        step("raw reference")
        raw = raw_pty_read(f"cat {data_file}", shell_env)
        results["raw_mbs"] = raw[1] / raw[0] / 1e6

    tport, bport = free_port(), free_port()
    prof = str(tmp / "daemon.prof")
    trace = str(tmp / "echo-trace.json")
    daemon = Daemon(
        root,
        tmp / "data",
        "--log-level", "warning",
        "--log-format", "json",
        *args.daemon_arg,
        home=home,
        python=profiled(prof) if args.profile else traced(trace) if args.trace else None,
    )  # fmt: skip
    base = None  # another version's daemon, for before/after in the same run
    if args.baseline or args.baseline_arg:
        base = Daemon(
            root,
            tmp / "base-data",
            "--log-level", "warning",
            "--log-format", "json",
            *args.baseline_arg,
            home=home,
            code=Path(args.baseline) if args.baseline else None,
        )  # fmt: skip
    servers: list[Child] = []  # started inside the try: one failing stops the daemons too
    try:
        terminado = Child([sys.executable, "-c", TERMINADO_SERVER, str(tport)], server_env, "ready")
        servers.append(terminado)
        bare = Child([sys.executable, "-c", BARE_SERVER, str(bport)], server_env, "ready")
        servers.append(bare)
        await asyncio.to_thread(daemon.wait_ready, 15, 0.05)
        if base is not None:
            await asyncio.to_thread(base.wait_ready, 15, 0.05)
        aurl = daemon.ws_url
        turl = f"ws://127.0.0.1:{tport}/websocket"
        burl = f"ws://127.0.0.1:{bport}"
        env = {"HOME": str(home)}
        if "memory" in cases:
            await measure_memory(aurl, turl, daemon, terminado, env, sizes.idle_sessions, results)

        if "throughput" in cases:
            step("throughput")
            await measure_throughput(
                aurl, turl, burl, daemon.pid, terminado.pid, bare.pid, env, shell_env,
                str(data_file), sizes, results, base,
            )  # fmt: skip

        if "echo" in cases or "flood" in cases:
            await measure_echo(
                aurl, turl, burl, env, sizes, cases, results, base,
                raw_env=shell_env if args.trace else None,
                pids={"aetherd": daemon.pid, "terminado": terminado.pid},
            )  # fmt: skip

        if "attach" in cases:
            step("attach")
            results["attach"] = await measure_attach(aurl, env, str(data_file), sizes.attaches)

        if "prompt" in cases:
            step("first prompt")
            await measure_first_prompt(aurl, turl, env, shell_env, sizes.prompts, results, base)
    finally:
        daemon.stop(10)
        if base is not None:
            base.stop(10)
        for server in servers:
            server.stop(10)
    if args.trace and "aetherd_flood_marks" in results:
        with open(trace) as traced_times:
            traced_data = json.load(traced_times)
        results["breakdown"] = echo_breakdown(results["aetherd_flood_marks"], traced_data)
        results["callbacks"] = traced_data.get("callbacks", {})
        results["outq"] = traced_data.get("outq", [])
    if args.profile:
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return results


async def measure_throughput(
    aurl: str,
    turl: str,
    burl: str,
    apid: int,
    tpid: int,
    bpid: int,
    env: dict,
    shell_env: dict,
    path: str,
    sizes: Sizes,
    results: dict,
    base: Daemon | None = None,
) -> None:
    """`sizes.rounds` rounds of the raw read, aetherd, terminado and the bare server in
    turn, so each sees the same load; the best rate and the least CPU per MB of each.
    With `base` (another version's daemon), it takes its turn too."""
    names = ["raw", "aetherd", "floor", "terminado", "bare"] + (
        ["base"] if base is not None else []
    )
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(sizes.rounds):
        seconds, size, cpu = raw_pty_read(f"cat {path}", shell_env)  # nothing else runs
        runs["raw"].append({"seconds": seconds, "bytes": size, "cpu": cpu})
        runs["aetherd"].append(await aether_throughput(aurl, apid, env, path))
        if base is not None:
            runs["base"].append(await aether_throughput(base.ws_url, base.pid, env, path))
        runs["floor"].append(await pty_floor(burl, bpid, path))
        runs["terminado"].append(await terminado_throughput(turl, tpid, path))
        runs["bare"].append(await bare_blast(burl, bpid, sizes.mb * MiB))
    for name, rounds in runs.items():
        results[f"{name}_mbs"] = max(r["bytes"] / r["seconds"] / 1e6 for r in rounds)
        results[f"{name}_cpu_ms_per_mb"] = min(r["cpu"] * 1000 / (r["bytes"] / 1e6) for r in rounds)
    for name in ("aetherd", "floor"):  # the client decodes every frame on the same cores
        results[f"{name}_client_ms_per_mb"] = min(
            r["client_cpu"] * 1000 / (r["bytes"] / 1e6) for r in runs[name]
        )
    best = min(runs["aetherd"], key=lambda r: r["seconds"])
    results["aetherd_frames"] = best["frames"]
    results["aetherd_kib_per_frame"] = best["bytes"] / max(1, best["frames"]) / 1024


async def measure_echo(
    aurl: str,
    turl: str,
    burl: str,
    env: dict,
    sizes: Sizes,
    cases: set[str],
    results: dict,
    base: Daemon | None = None,
    raw_env: dict | None = None,
    pids: dict[str, int] | None = None,
) -> None:
    """Echo latency, idle and behind floods: aetherd, the bare echo and terminado (and
    the baseline daemon behind floods, when there is one). With `raw_env`, also a bash
    on a raw PTY, typed to by a process of its own while aetherd's floods run: what the
    echo costs before any server can read it. `pids` (aetherd, terminado): their loop
    threads' CPU and run-queue time during the flood echo."""
    pids = pids or {}
    step("echo latency")
    async with Aether(aurl) as client:
        await client.create("echo", env=env)
        await client.output_until("echo", "#")
        await aether_echo(client, "echo", 20)  # warm up
        if "echo" in cases:
            results["aetherd_idle"] = await aether_echo(client, "echo", sizes.samples)
        if "flood" in cases:
            marks: list[tuple[float, float, int]] = []
            flood = await aether_flood(client, env, sizes, marks, raw_env, pids.get("aetherd"))
            results["aetherd_flood"], results["aetherd_flood_mbs"] = flood["times"], flood["mbs"]
            results["aetherd_flood_marks"] = marks
            if flood["raw"] is not None:
                results["raw_flood"] = flood["raw"]
            if "sched" in flood:
                results["aetherd_flood_sched"] = flood["sched"]
        await client.close_session("echo")
    if "flood" in cases and base is not None:
        step("baseline flood echo")
        async with Aether(base.ws_url) as client:
            await client.create("echo", env=env)
            await client.output_until("echo", "#")
            await aether_echo(client, "echo", 20)
            flood = await aether_flood(client, env, sizes, pid=base.pid)
            results["base_flood"], results["base_flood_mbs"] = flood["times"], flood["mbs"]
            results["base_flood_sched"] = flood["sched"]
            await client.close_session("echo")
    if "echo" in cases:
        step("bare echo")
        results["bare_idle"] = await bare_echo(burl, sizes.samples)
    step("terminado echo")
    async with Terminado(turl) as term:
        await term.until("#")
        await terminado_echo(term, 20)
        if "echo" in cases:
            results["terminado_idle"] = await terminado_echo(term, sizes.samples)
        if "flood" not in cases:
            return
        floods = []
        stop = asyncio.Event()
        for _ in range(sizes.floods):
            flood_term = Terminado(turl)
            await flood_term.__aenter__()
            await flood_term.until("#")
            await flood_term.stdin("exec yes\r")
            floods.append(flood_term)
        total = [0]
        drains = [asyncio.create_task(drain(f.ws, stop, total)) for f in floods]
        await asyncio.sleep(0.5)
        received, start = total[0], time.perf_counter()
        tpid = pids.get("terminado")
        sched0 = schedstat(tpid) if tpid else (0.0, 0.0)
        results["terminado_flood"] = await terminado_echo(term, sizes.samples)
        elapsed = time.perf_counter() - start
        if tpid:
            sched1 = schedstat(tpid)
            results["terminado_flood_sched"] = (
                (sched1[0] - sched0[0]) / elapsed,
                (sched1[1] - sched0[1]) / elapsed,
            )
        results["terminado_flood_mbs"] = (total[0] - received) / elapsed / 1e6
        stop.set()
        for flood_term in floods:
            await flood_term.__aexit__()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the event loop) ran on a CPU, and waited
    runnable for one (/proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as stat:
        ran, waited = stat.read().split()[:2]
    return int(ran) / 1e9, int(waited) / 1e9


async def aether_flood(
    client: Aether,
    env: dict,
    sizes: Sizes,
    marks: list[tuple[float, float, int]] | None = None,
    raw_env: dict | None = None,
    pid: int | None = None,
) -> dict[str, Any]:
    """Echo times (`times`) of the session `echo` while `sizes.floods` sessions run `yes`
    on the same socket; the MB/s of flood drained meanwhile (`mbs`); the share of that
    time the daemon's loop thread ran and waited for a CPU (`sched`, with `pid`); with
    `raw_env`, the raw PTY echo measured while the floods still run (`raw`)."""
    for index in range(sizes.floods):
        await client.create(f"flood{index}", env=env, command="exec yes")
    await asyncio.sleep(0.5)
    received, start = client.received, time.perf_counter()
    sched0 = schedstat(pid) if pid else (0.0, 0.0)
    times = await aether_echo(client, "echo", sizes.samples, marks)
    elapsed = time.perf_counter() - start
    sched1 = schedstat(pid) if pid else (0.0, 0.0)
    mbs = (client.received - received) / elapsed / 1e6
    out: dict[str, Any] = {"times": times, "mbs": mbs, "raw": None}
    if pid:
        out["sched"] = ((sched1[0] - sched0[0]) / elapsed, (sched1[1] - sched0[1]) / elapsed)
    if raw_env is not None:
        stop = asyncio.Event()
        total = [0]
        draining = asyncio.create_task(drain(client.ws, stop, total))
        try:
            out["raw"] = await raw_echo(raw_env, sizes.samples)
        finally:
            stop.set()
            await asyncio.wait_for(draining, 30)  # floods still run: the next frame ends it
    for index in range(sizes.floods):
        await client.close_session(f"flood{index}")
    return out


RAW_ECHO = r"""
import json, os, pty, select, sys, time
samples = int(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash"])

def read_until(want):
    buf, deadline = b"", time.monotonic() + 30
    while want not in buf:
        if not select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            raise SystemExit("no echo within 30 s")
        buf += os.read(fd, 65536)

read_until(b"#")
times = []
for index in range(samples + 20):  # 20 to warm up
    key = b"x" if index % 2 == 0 else b""
    start = time.perf_counter()
    os.write(fd, key)
    read_until(b"x" if key == b"x" else b"")
    if index >= 20:
        times.append(time.perf_counter() - start)
print(json.dumps(times), flush=True)
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


async def raw_echo(shell_env: dict, samples: int) -> list[float]:
    """Echo times of a bash on a raw PTY, typed to and read by a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RAW_ECHO, str(samples), env=shell_env, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return list(json.loads(out))


TRACER = r"""
import json, sys, time
from aiohttp import web_ws
from aetherd.channels import terminal as channel
from aetherd.cli import main
from aetherd.services import terminal as service
path, sid = sys.argv[1], sys.argv[2]
now = time.perf_counter  # CLOCK_MONOTONIC: the same clock as the benchmark's
trace = {"write": [], "read": [], "pull": [], "sent": []}
key = b'"sessionId":' + json.dumps(sid).encode()

write = service.TerminalSession.write
def traced_write(self, data):
    if self.id == sid:
        trace["write"].append(now())
    return write(self, data)
service.TerminalSession.write = traced_write

read = service.TerminalSession._read_into_ring
def traced_read(self, budget):
    got = read(self, budget)
    if got and self.id == sid:
        trace["read"].append(now())
    return got
service.TerminalSession._read_into_ring = traced_read

pull = channel.TerminalStream.pull
def traced_pull(self):
    frame = pull(self)
    if frame is not None and self.session_id == sid:
        trace["pull"].append(now())
    return frame
channel.TerminalStream.pull = traced_pull

import fcntl, struct, termios
SIOCOUTQNSD = 0x894B  # bytes not yet sent (TIOCOUTQ: not yet acknowledged)
trace["outq"] = []
def queued(ws):
    sock = ws._writer.transport.get_extra_info("socket")
    counts = []
    for request in (termios.TIOCOUTQ, SIOCOUTQNSD):
        counts.append(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])
    return counts

send_frame = web_ws.WebSocketResponse.send_frame
async def traced_send_frame(self, message, opcode, compress=None):
    mine = key in message[:120]
    if mine:
        trace["outq"].append(queued(self))  # what the kernel holds ahead of the echo
    await send_frame(self, message, opcode, compress)
    if mine:
        trace["sent"].append(now())
web_ws.WebSocketResponse.send_frame = traced_send_frame

# Every callback the loop runs, timed: which ones hold the loop (and the echo) longest.
import asyncio.events
callbacks = trace["callbacks"] = {}
run = asyncio.events.Handle._run
def traced_run(self):
    target = self._callback  # read first: a handle that cancels itself clears it
    start = now()
    run(self)
    took = now() - start
    owner = getattr(target, "__self__", None)
    coro = getattr(owner, "get_coro", None)
    name = coro().__qualname__ if coro is not None else getattr(target, "__qualname__", None)
    if not isinstance(name, str):
        name = repr(target).split(" at 0x")[0] + " " + repr(getattr(target, "__self__", None))[:60]
    entry = callbacks.setdefault(name, [0, 0.0, 0.0, 0])
    entry[0] += 1
    entry[1] += took
    entry[2] = max(entry[2], took)
    entry[3] += took > 0.005
asyncio.events.Handle._run = traced_run

sys.argv[1:3] = []
try:
    main(sys.argv[1:])
finally:
    with open(path, "w") as out:
        json.dump(trace, out)
"""


def traced(path: str, sid: str = "echo") -> list[str]:
    """The interpreter's argv that runs the daemon's CLI with the echo path timed:
    `sid`'s input written to the PTY, its output read from the PTY, its frame pulled by
    the writer, the frame's send returned (perf_counter, which the benchmark shares)."""
    return [sys.executable, "-c", TRACER, path, sid]


SEGMENTS = {
    "in": "frame sent → input written to the PTY",
    "shell": "input written → echo read from the PTY",
    "wait": "echo read → frame pulled by the writer",
    "send": "frame pulled → its send returned",
    "out": "send returned → the client has parsed it",
}


def echo_breakdown(
    marks: list[tuple[float, float, int]], trace: dict[str, list[float]]
) -> list[dict[str, float]]:
    """Each traced echo sample's time split into SEGMENTS (seconds), with `total` and
    `ahead` (bytes unread on the client's side when the key was typed)."""
    import bisect

    def after(name: str, when: float) -> float | None:
        times = trace[name]
        index = bisect.bisect_left(times, when)
        return times[index] if index < len(times) else None

    out = []
    for start, end, ahead in marks:
        write = after("write", start)
        read = write and after("read", write)
        pulled = read and after("pull", read)
        sent = pulled and after("sent", pulled)
        if not (write and read and pulled and sent) or sent > end:
            continue
        out.append(
            {
                "in": write - start,
                "shell": read - write,
                "wait": pulled - read,
                "send": sent - pulled,
                "out": end - sent,
                "total": end - start,
                "ahead": float(ahead),
            }
        )
    return out


async def measure_attach(aurl: str, env: dict, data_file: str, attaches: int) -> list[float]:
    """Seconds from connecting to holding a full 1 MiB replay, `attaches` times."""
    async with Aether(aurl) as client:
        await client.create("replay", env=env)
        await client.output_until("replay", "#")
        marker = uuid.uuid4().hex[:8]
        await client.input("replay", f"head -c 2000000 {data_file}; {marker_cmd(marker)}\r")
        await client.output_until("replay", "__" + marker)
    attach_times = []
    for _ in range(attaches):
        start = time.perf_counter()
        async with Aether(aurl) as client:
            await client.create("replay")
            got = 0
            while got < MiB - 4096:
                frame = await client.frame()
                if frame.get("type") == "output":
                    got += len(frame["data"])
        attach_times.append(time.perf_counter() - start)
    return attach_times


async def first_prompt(client: Aether, sid: str, env: dict) -> float:
    """Seconds from `create` to the session's first output (then closed, and waited for)."""
    start = time.perf_counter()
    await client.create(sid, env=env)
    while True:
        frame = await client.frame()
        if frame.get("type") == "output" and frame.get("sessionId") == sid:
            break
    elapsed = time.perf_counter() - start
    await client.close_session(sid)
    while not (frame.get("type") == "close" and frame.get("sessionId") == sid):
        frame = await client.frame()
    return elapsed


async def measure_first_prompt(
    aurl: str,
    turl: str,
    env: dict,
    shell_env: dict,
    prompts: int,
    results: dict,
    base: Daemon | None = None,
) -> None:
    """Create to first output: aetherd, in-process pty.fork + exec, terminado (rounds of
    aetherd, the baseline daemon if any, and pty.fork, so all see the same load)."""
    first: list[float] = []
    base_first: list[float] = []
    raw: list[float] = []
    spawned: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(Aether(aurl))
        other = await stack.enter_async_context(Aether(base.ws_url)) if base else None
        for index in range(prompts):
            first.append(await first_prompt(client, f"p{index}", env))
            if other is not None:
                base_first.append(await first_prompt(other, f"p{index}", env))
            raw += raw_first_prompt(shell_env, 1)
            spawned += raw_spawn_first_prompt(shell_env, 1)
    results["aetherd_first"] = first
    results["raw_first"] = raw
    results["raw_spawn_first"] = spawned
    if base_first:
        results["base_first"] = base_first
    tfirst = []
    for _ in range(max(1, prompts // 2)):
        start = time.perf_counter()
        async with Terminado(turl) as term:
            while await term.output() is None:
                pass
            tfirst.append(time.perf_counter() - start)
    results["terminado_first"] = tfirst


@dataclass(frozen=True)
class Target:
    """A ratio the issue sets a bound on (`at_least` or at most `bound`)."""

    name: str
    bound: float
    at_least: bool

    def verdict(self, ratio: float) -> str:
        met = ratio >= self.bound if self.at_least else ratio <= self.bound
        return "PASS" if met else "FAIL"

    def text(self) -> str:
        return f"target {'≥' if self.at_least else '≤'} {self.bound:g}x"


TARGETS = {
    "throughput": Target("Throughput / raw PTY read", 0.8, True),
    "cpu": Target("Server CPU per MB / terminado", 0.5, False),
    "echo": Target("Echo idle p99 / bare aiohttp", 2.0, False),
    "flood": Target("Echo p99 behind 10 floods / terminado", 1.0, False),
    "prompt": Target("Create to first prompt p50 / raw PTY", 1.2, False),
}


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """The targeted ratios that this run measured."""
    out: dict[str, float] = {}
    if "aetherd_mbs" in r:
        out["throughput"] = r["aetherd_mbs"] / r["raw_mbs"]
        out["floor"] = r["aetherd_mbs"] / r["floor_mbs"]
        out["cpu"] = r["aetherd_cpu_ms_per_mb"] / r["terminado_cpu_ms_per_mb"]
    if "aetherd_idle" in r:
        out["echo"] = percentile(r["aetherd_idle"], 0.99) / percentile(r["bare_idle"], 0.99)
    if "aetherd_flood" in r:
        out["flood"] = percentile(r["aetherd_flood"], 0.99) / percentile(r["terminado_flood"], 0.99)
    if "aetherd_first" in r:
        out["prompt"] = statistics.median(r["aetherd_first"]) / statistics.median(r["raw_first"])
    return out


def report(r: dict[str, Any], sizes: Sizes) -> None:
    ms = 1000.0
    ratio = ratios(r)

    def lat(key: str) -> str:
        return (
            f"p50 {percentile(r[key], 0.5) * ms:.2f} ms, p99 {percentile(r[key], 0.99) * ms:.2f} ms"
        )

    def judged(key: str) -> str:
        target = TARGETS[key]
        return f"{ratio[key]:.2f}x ({target.text()}: {target.verdict(ratio[key])})"

    print(f"## Terminal benchmark ({sizes.mb} MB of base64, {sizes.samples} echo samples)\n")
    print("| Measure | aetherd | Reference | Ratio |")
    print("|---|---|---|---|")
    if "throughput" in ratio:
        print(
            f"| Throughput | {r['aetherd_mbs']:.1f} MB/s | raw PTY os.read {r['raw_mbs']:.1f} MB/s"
            f" | {judged('throughput')} |"
        )
        print(
            f"| Throughput | {r['aetherd_mbs']:.1f} MB/s, {r['aetherd_cpu_ms_per_mb']:.1f} ms/MB |"
            f" floor: a bare aiohttp server reading the PTY and sending frames to the same"
            f" client {r['floor_mbs']:.1f} MB/s, {r['floor_cpu_ms_per_mb']:.1f} ms/MB"
            f" ({r['floor_mbs'] / r['raw_mbs']:.2f}x the raw read)"
            f" | {r['aetherd_mbs'] / r['floor_mbs']:.2f}x |"
        )
        print(
            f"| Client CPU per MB (JSON of every frame, on the same cores) |"
            f" {r['aetherd_client_ms_per_mb']:.1f} ms | floor {r['floor_client_ms_per_mb']:.1f} ms;"
            f" the raw read has no client | |"
        )
        if "base_mbs" in r:
            print(
                f"| Throughput, CPU per MB | this tree {r['aetherd_mbs']:.1f} MB/s,"
                f" {r['aetherd_cpu_ms_per_mb']:.2f} ms | baseline {r['base_mbs']:.1f} MB/s,"
                f" {r['base_cpu_ms_per_mb']:.2f} ms | {r['aetherd_mbs'] / r['base_mbs']:.2f}x,"
                f" CPU {r['aetherd_cpu_ms_per_mb'] / r['base_cpu_ms_per_mb']:.2f}x |"
            )
        print(
            f"| Output frames | {r['aetherd_frames']:.0f}, {r['aetherd_kib_per_frame']:.1f} KiB each"
            " on average | | |"
        )
        print(
            f"| Throughput | {r['aetherd_mbs']:.1f} MB/s | terminado {r['terminado_mbs']:.1f} MB/s"
            f" | {r['aetherd_mbs'] / r['terminado_mbs']:.2f}x |"
        )
        print(
            f"| Server CPU per MB | {r['aetherd_cpu_ms_per_mb']:.1f} ms | terminado"
            f" {r['terminado_cpu_ms_per_mb']:.1f} ms; bare aiohttp JSON {r['bare_cpu_ms_per_mb']:.1f} ms;"
            f" the raw os.read loop alone {r['raw_cpu_ms_per_mb']:.1f} ms"
            f" | {judged('cpu')} terminado |"
        )
    if "echo" in ratio:
        print(
            f"| Echo, idle | {lat('aetherd_idle')} | bare aiohttp echo {lat('bare_idle')}"
            f" | p99 {judged('echo')} |"
        )
        print(
            f"| Echo, idle | {lat('aetherd_idle')} | terminado {lat('terminado_idle')}"
            f" | p99 {percentile(r['aetherd_idle'], 0.99) / percentile(r['terminado_idle'], 0.99):.2f}x |"
        )
    if "flood" in ratio:
        print(
            f"| Echo, {sizes.floods} floods (aetherd: same socket) | {lat('aetherd_flood')} | terminado,"
            f" floods on separate sockets: {lat('terminado_flood')} | p99 {judged('flood')} |"
        )
        print(
            f"| Floods drained during that echo | {r['aetherd_flood_mbs']:.1f} MB/s | terminado"
            f" {r['terminado_flood_mbs']:.1f} MB/s | {r['aetherd_flood_mbs'] / r['terminado_flood_mbs']:.2f}x |"
        )
    if "base_flood" in r:
        print(
            f"| Echo, {sizes.floods} floods, this tree | {lat('aetherd_flood')} | baseline daemon,"
            f" same run: {lat('base_flood')} ({r['base_flood_mbs']:.1f} MB/s drained) | p99"
            f" {percentile(r['aetherd_flood'], 0.99) / percentile(r['base_flood'], 0.99):.2f}x;"
            f" baseline / terminado"
            f" {percentile(r['base_flood'], 0.99) / percentile(r['terminado_flood'], 0.99):.2f}x |"
        )
    if "aetherd_flood_sched" in r:
        run_a, wait_a = r["aetherd_flood_sched"]
        run_t, wait_t = r.get("terminado_flood_sched", (0.0, 0.0))
        base_part = ""
        if "base_flood_sched" in r:
            run_b, wait_b = r["base_flood_sched"]
            base_part = f"; baseline daemon ran {run_b:.0%}, waited {wait_b:.0%}"
        print(
            f"| Loop thread during that echo: on a CPU, waiting for one | aetherd ran {run_a:.0%},"
            f" waited {wait_a:.0%} | terminado ran {run_t:.0%}, waited {wait_t:.0%}{base_part} | |"
        )
    if "raw_flood" in r:
        print(
            f"| Echo of a bash on a raw PTY, under aetherd's floods (no server) |"
            f" {lat('raw_flood')} | | p99 / aetherd's"
            f" {percentile(r['raw_flood'], 0.99) / percentile(r['aetherd_flood'], 0.99):.2f}x |"
        )
    if "attach" in r:
        attach = statistics.median(r["attach"])
        raw_mib = MiB / (r["raw_mbs"] * 1e6)
        print(
            f"| Attach + 1 MiB replay (connect included) | p50 {attach * ms:.1f} ms | 1 MiB at the raw"
            f" PTY rate: {raw_mib * ms:.1f} ms | {attach / raw_mib:.2f}x |"
        )
    if "prompt" in ratio:
        print(
            f"| Create to first prompt | p50 {statistics.median(r['aetherd_first']) * ms:.1f} ms |"
            f" in-process pty.fork + exec {statistics.median(r['raw_first']) * ms:.1f} ms; terminado"
            f" {statistics.median(r['terminado_first']) * ms:.1f} ms | {judged('prompt')} |"
        )
    if "raw_spawn_first" in r:
        print(
            f"| Create to first prompt | p50 {statistics.median(r['aetherd_first']) * ms:.1f} ms |"
            f" in-process posix_spawn on a PTY {statistics.median(r['raw_spawn_first']) * ms:.1f} ms"
            f" | {statistics.median(r['aetherd_first']) / statistics.median(r['raw_spawn_first']):.2f}x |"
        )
    if "base_first" in r:
        print(
            f"| Create to first prompt, p50 | this tree {statistics.median(r['aetherd_first']) * ms:.1f}"
            f" ms | baseline {statistics.median(r['base_first']) * ms:.1f} ms |"
            f" {statistics.median(r['aetherd_first']) / statistics.median(r['base_first']):.2f}x |"
        )
    if "aetherd_rss_per_session" in r:
        print(
            f"| RSS per idle session | {r['aetherd_rss_per_session'] / 1024:.0f} KiB | terminado"
            f" {r['terminado_rss_per_session'] / 1024:.0f} KiB | target ≤ 100 KiB |"
        )


def report_breakdown(rows: list[dict[str, float]]) -> None:
    """Where the flood echo's time goes: each segment's p50 and p99, and its mean over
    the slowest 3 % of samples (the p99's neighbourhood)."""
    if not rows:
        return
    ms = 1000.0
    slow = sorted(rows, key=lambda row: row["total"])[-max(1, len(rows) * 3 // 100) :]
    print(f"\n### Flood echo, traced ({len(rows)} samples; slowest {len(slow)} averaged)\n")
    print("| Segment | p50 | p99 | mean of the slowest 3 % |")
    print("|---|---|---|---|")
    for name, label in [*SEGMENTS.items(), ("total", "total"), ("ahead", "")]:
        values = [row[name] for row in rows]
        mean = statistics.fmean(row[name] for row in slow)
        if name == "ahead":
            print(
                f"| bytes unread on the client's side at the keystroke | {percentile(values, 0.5):.0f}"
                f" | {percentile(values, 0.99):.0f} | {mean:.0f} |"
            )
        else:
            print(
                f"| {label} | {percentile(values, 0.5) * ms:.2f} ms |"
                f" {percentile(values, 0.99) * ms:.2f} ms | {mean * ms:.2f} ms |"
            )


def report_outq(outq: list[list[int]]) -> None:
    """What the daemon's socket held in the kernel when each echo frame was sent."""
    if not outq:
        return
    unacked = [float(q[0]) for q in outq]
    unsent = [float(q[1]) for q in outq]
    print(
        f"\nDaemon socket at each echo frame's send ({len(outq)} frames): not yet acknowledged"
        f" p50 {percentile(unacked, 0.5):.0f} B, p99 {percentile(unacked, 0.99):.0f} B;"
        f" not yet sent p50 {percentile(unsent, 0.5):.0f} B, p99 {percentile(unsent, 0.99):.0f} B"
    )


def report_callbacks(callbacks: dict[str, list[float]]) -> None:
    """The daemon's loop callbacks that held it longest (traced run, whole daemon life)."""
    if not callbacks:
        return
    print("\n### Daemon loop callbacks, by total time (traced run)\n")
    print("| Callback | count | total | mean | max | > 5 ms |")
    print("|---|---|---|---|---|---|")
    top = sorted(callbacks.items(), key=lambda item: -item[1][1])[:10]
    for name, (count, total, longest, slow) in top:
        print(
            f"| {name} | {count:.0f} | {total * 1000:.0f} ms | {total / count * 1e6:.0f} µs |"
            f" {longest * 1000:.1f} ms | {slow:.0f} |"
        )


def summary(runs: list[dict[str, float]]) -> None:
    """Each targeted ratio's min-max over the runs, and whether every run met the target."""
    print(f"\n## Targets over {len(runs)} runs (min-max of the ratio)\n")
    print("| Ratio | min-max | Target | Verdict |")
    print("|---|---|---|---|")
    floors = [run["floor"] for run in runs if "floor" in run]
    if floors:
        print(
            f"| Throughput / the PTY-to-WebSocket floor (no target) |"
            f" {min(floors):.2f}-{max(floors):.2f}x | | |"
        )
    for key, target in TARGETS.items():
        values = [run[key] for run in runs if key in run]
        if not values:
            continue
        verdicts = {target.verdict(v) for v in values}
        verdict = verdicts.pop() if len(verdicts) == 1 else "MIXED"
        print(
            f"| {target.name} | {min(values):.2f}-{max(values):.2f}x |"
            f" {target.text()} | {verdict} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, help="MB of base64 to print (default 50)")
    parser.add_argument("--samples", type=int, help="echo samples per case (default 300)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole run (default 1)")
    parser.add_argument("--only", help=f"comma-separated cases among {', '.join(CASES)}")
    parser.add_argument(
        "--daemon-arg", action="append", default=[], help="a flag for the daemon (repeatable)"
    )
    parser.add_argument(
        "--baseline",
        help="a directory holding another version's aetherd package: its daemon takes"
        " turns in the throughput, flood-echo and first-prompt rounds (before/after in the same run)",
    )
    parser.add_argument(
        "--baseline-arg",
        action="append",
        default=[],
        help="a flag for the baseline daemon (repeatable; without --baseline, the baseline"
        " runs this tree's code: --daemon-arg=--event-loop=uvloop"
        " --baseline-arg=--event-loop=asyncio compares the loops)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the daemon (cProfile)")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="flood case: time each echo's path through the daemon (input written, echo"
        " read from the PTY, frame pulled, sent) and measure a raw PTY echo under the floods",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    sizes = (
        Sizes(mb=2, samples=30, idle_sessions=10, attaches=5, prompts=6, rounds=1)
        if args.quick
        else Sizes()
    )
    sizes.mb = args.mb or sizes.mb
    sizes.samples = args.samples or sizes.samples
    cases = set(args.only.split(",")) if args.only else set(CASES)
    unknown = cases - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    all_ratios = []
    for index in range(max(1, args.runs)):
        if args.runs > 1:
            step(f"run {index + 1} of {args.runs}")
        results = asyncio.run(run(args, sizes, cases))
        report(results, sizes)
        report_breakdown(results.get("breakdown", []))
        report_outq(results.get("outq", []))
        report_callbacks(results.get("callbacks", {}))
        all_ratios.append(ratios(results))
        print()
    summary(all_ratios)


if __name__ == "__main__":
    main()
