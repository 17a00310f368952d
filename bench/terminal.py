"""Terminal benchmark: aetherd against a raw PTY read, a bare aiohttp WebSocket and terminado.

Every figure is printed beside its reference, measured in the same run. Servers run in
their own processes, so their CPU time can be read from /proc. Shells get an empty HOME
(no slow ~/.bashrc). The whole run is bounded (about two minutes).

    python bench/terminal.py [--mb 50] [--samples 300] [--profile]

`--profile` also runs the throughput case with the daemon under cProfile and prints its
top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"
MiB = 1024 * 1024

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
app = web.Application()
app.router.add_get("/echo", echo)
app.router.add_get("/blast", blast)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def step(text: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


class Server:
    """A server process, started and waited for, stopped at the end."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: str | None = None) -> None:
        # Only a server that announces readiness gets a pipe (it writes one line to it);
        # an unread pipe would fill and block the server.
        stdout = subprocess.PIPE if ready is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            argv, env=env, stdout=stdout, stderr=subprocess.DEVNULL, text=True
        )
        self.ps = psutil.Process(self.proc.pid)
        if ready is not None:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if ready not in line:
                raise RuntimeError(f"server did not start: {line!r}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


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


def raw_first_prompt(env: dict[str, str], runs: int) -> list[float]:
    """Fork bash on a PTY in-process; time to its first output byte."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover
            os.execve("/bin/bash", ["bash"], env)
        os.read(fd, 65536)
        times.append(time.perf_counter() - start)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return times


# -- aetherd client ---------------------------------------------------------------------------
class Aether:
    """A client socket to the daemon."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Aether:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def create(self, sid: str, **fields: Any) -> None:
        await self.send({"channel": "terminal", "type": "create", "sessionId": sid, **fields})

    async def input(self, sid: str, data: str) -> None:
        await self.send({"channel": "terminal", "type": "input", "sessionId": sid, "data": data})

    async def frame(self) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=60)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(msg)
        return json.loads(msg.data)

    async def output_until(self, sid: str, marker: str) -> int:
        """Read `sid`'s output until `marker`; returns the bytes of data seen."""
        tail = ""
        total = 0
        while True:
            frame = await self.frame()
            if frame.get("sessionId") != sid or frame.get("type") != "output":
                continue
            data = frame["data"]
            total += len(data)
            tail = (tail + data)[-200:]
            if marker in tail:
                return total


def marker_cmd(marker: str) -> str:
    return f"printf '%s%s\\n' __ {marker}"


async def aether_throughput(url: str, daemon: psutil.Process, env: dict, path: str) -> dict:
    async with Aether(url) as client:
        sid = "tp-" + uuid.uuid4().hex[:8]
        await client.create(sid, env=env)
        await client.output_until(sid, "#")
        marker = uuid.uuid4().hex[:8]
        cpu0 = cpu_seconds(daemon)
        start = time.perf_counter()
        await client.input(sid, f"cat {path}; {marker_cmd(marker)}\r")
        total = await client.output_until(sid, "__" + marker)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(daemon) - cpu0
        await client.send({"channel": "terminal", "type": "close", "sessionId": sid})
    return {"seconds": elapsed, "bytes": total, "cpu": cpu}


# -- terminado client -------------------------------------------------------------------------
class Terminado:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Terminado:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()

    async def stdin(self, data: str) -> None:
        await self.ws.send_str(json.dumps(["stdin", data]))

    async def until(self, marker: str) -> int:
        tail = ""
        total = 0
        while True:
            msg = await self.ws.receive(timeout=60)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(msg)
            kind, *rest = json.loads(msg.data)
            if kind != "stdout":
                continue
            total += len(rest[0])
            tail = (tail + rest[0])[-200:]
            if marker in tail:
                return total


async def terminado_throughput(url: str, server: psutil.Process, path: str) -> dict:
    async with Terminado(url) as term:
        await term.until("#")
        marker = uuid.uuid4().hex[:8]
        cpu0 = cpu_seconds(server)
        start = time.perf_counter()
        await term.stdin(f"cat {path}; {marker_cmd(marker)}\r")
        total = await term.until("__" + marker)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(server) - cpu0
        await term.stdin("exit\r")
    return {"seconds": elapsed, "bytes": total, "cpu": cpu}


async def bare_blast(url: str, server: psutil.Process, size: int) -> dict:
    async with aiohttp.ClientSession() as session:
        cpu0 = cpu_seconds(server)
        start = time.perf_counter()
        total = 0
        async with session.ws_connect(f"{url}/blast?bytes={size}", max_msg_size=0) as ws:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    total += len(json.loads(msg.data)["data"])
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "bytes": total, "cpu": cpu_seconds(server) - cpu0}


# -- latency ----------------------------------------------------------------------------------
async def aether_echo(client: Aether, sid: str, samples: int) -> list[float]:
    """Type 'x' then backspace, alternately; time each until its echo is seen."""
    prefix = '"sessionId":' + json.dumps(sid)
    times = []
    for index in range(samples):
        key = "x" if index % 2 == 0 else "\x7f"
        want = "x" if key == "x" else "\b"
        start = time.perf_counter()
        await client.input(sid, key)
        while True:
            msg = await client.ws.receive(timeout=30)
            text = msg.data
            if prefix not in text[:120] or '"type":"output"' not in text[:60]:
                continue  # a flood frame: not parsed
            if want in json.loads(text)["data"]:
                break
        times.append(time.perf_counter() - start)
    return times


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


async def terminado_echo(term: Terminado, samples: int) -> list[float]:
    times = []
    for index in range(samples):
        key = "x" if index % 2 == 0 else "\x7f"
        want = "x" if key == "x" else "\b"
        start = time.perf_counter()
        await term.stdin(key)
        while True:
            msg = await term.ws.receive(timeout=30)
            kind, *rest = json.loads(msg.data)
            if kind == "stdout" and want in rest[0]:
                break
        times.append(time.perf_counter() - start)
    return times


async def drain(ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> int:
    total = 0
    while not stop.is_set():
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        total += len(msg.data)
    return total


async def measure_memory(
    aurl: str, turl: str, daemon: Server, terminado: Server, env: dict, results: dict
) -> None:
    """RSS growth per idle session (each has printed its prompt), on fresh servers."""
    step("memory")
    count = 60
    async with Aether(aurl) as client:
        # Warm up: the first session pays for code paths and imports, not per session.
        await client.create("warm", env=env)
        await client.output_until("warm", "#")
        await client.send({"channel": "terminal", "type": "close", "sessionId": "warm"})
        while (await client.frame()).get("type") != "close":
            pass
        rss0 = daemon.ps.memory_info().rss
        for index in range(count):
            await client.create(f"idle{index}", env=env)
        seen = set()
        while len(seen) < count:
            frame = await client.frame()
            if frame.get("type") == "output":
                seen.add(frame["sessionId"])
            elif frame.get("channel") == "error":
                raise RuntimeError(frame)
        rss1 = daemon.ps.memory_info().rss
        for index in range(count):
            await client.send({"channel": "terminal", "type": "close", "sessionId": f"idle{index}"})
        closed = 0
        while closed < count:
            closed += (await client.frame()).get("type") == "close"
    results["aetherd_rss_per_session"] = (rss1 - rss0) / count
    trss0 = terminado.ps.memory_info().rss
    terms = []
    for _ in range(count):
        term = Terminado(turl)
        await term.__aenter__()
        await term.until("#")
        terms.append(term)
    results["terminado_rss_per_session"] = (terminado.ps.memory_info().rss - trss0) / count
    for term in terms:
        await term.__aexit__()


# -- main ----------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="aetherd-bench-"))
    home = tmp / "home"
    home.mkdir()
    root = tmp / "root"
    root.mkdir()
    data_file = tmp / "data.b64"
    await asyncio.to_thread(make_data, data_file, args.mb * MiB)
    shell_env = {"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "xterm-256color"}
    server_env = {**os.environ, "HOME": str(home)}
    results: dict[str, Any] = {}

    step("raw reference")
    # Raw reference.
    raw_runs = [raw_pty_read(f"cat {data_file}", shell_env) for _ in range(2)]
    raw = max(raw_runs, key=lambda r: r[1] / r[0])
    raw_mbs = raw[1] / raw[0] / 1e6
    results["raw_mbs"] = raw_mbs
    results["raw_cpu_ms_per_mb"] = raw[2] * 1000 / (raw[1] / 1e6)

    aport, tport, bport = free_port(), free_port(), free_port()
    daemon_argv = [sys.executable]
    if args.profile:
        # CPU time, not wall time: on a shared 2-core machine wall time mostly measures
        # waiting for a core.
        prof = str(tmp / "daemon.prof")
        daemon_argv += [
            "-c",
            "import cProfile, sys, time\n"
            "from aetherd.cli import main\n"
            "p = cProfile.Profile(time.process_time)\n"
            "p.enable()\n"
            "try:\n    main(sys.argv[1:])\n"
            f"finally:\n    p.disable()\n    p.dump_stats({prof!r})\n",
        ]
    else:
        daemon_argv += ["-m", "aetherd"]
    daemon_argv += [
        "serve", "--host", "127.0.0.1", "--port", str(aport),
        "--root", str(root), "--data-dir", str(tmp / "data"), "--token", TOKEN,
        "--log-level", "warning", "--log-format", "json",
    ]  # fmt: skip
    daemon = Server(daemon_argv, {**server_env, "PYTHONPATH": str(ROOT)})
    terminado = Server([sys.executable, "-c", TERMINADO_SERVER, str(tport)], server_env, "ready")
    bare = Server([sys.executable, "-c", BARE_SERVER, str(bport)], server_env, "ready")
    try:
        await wait_http(f"http://127.0.0.1:{aport}/readyz")
        aurl = f"ws://127.0.0.1:{aport}/workspaces/local/ws?token={TOKEN}"
        turl = f"ws://127.0.0.1:{tport}/websocket"
        burl = f"ws://127.0.0.1:{bport}"
        env = {"HOME": str(home)}
        await measure_memory(aurl, turl, daemon, terminado, env, results)

        step("throughput")
        # Throughput and CPU per MB.
        a = min(
            [await aether_throughput(aurl, daemon.ps, env, str(data_file)) for _ in range(2)],
            key=lambda r: r["seconds"],
        )
        t = min(
            [await terminado_throughput(turl, terminado.ps, str(data_file)) for _ in range(2)],
            key=lambda r: r["seconds"],
        )
        b = await bare_blast(burl, bare.ps, args.mb * MiB)
        for name, r in (("aetherd", a), ("terminado", t), ("bare", b)):
            results[f"{name}_mbs"] = r["bytes"] / r["seconds"] / 1e6
            results[f"{name}_cpu_ms_per_mb"] = r["cpu"] * 1000 / (r["bytes"] / 1e6)

        step("echo latency")
        # Echo latency, idle.
        async with Aether(aurl) as client:
            await client.create("echo", env=env)
            await client.output_until("echo", "#")
            await aether_echo(client, "echo", 20)  # warm up
            results["aetherd_idle"] = await aether_echo(client, "echo", args.samples)
            # With 10 floods on the same socket.
            for index in range(10):
                await client.create(f"flood{index}", env=env, command="exec yes")
            await asyncio.sleep(0.5)
            results["aetherd_flood"] = await aether_echo(client, "echo", args.samples)
            for index in range(10):
                await client.send(
                    {"channel": "terminal", "type": "close", "sessionId": f"flood{index}"}
                )
            await client.send({"channel": "terminal", "type": "close", "sessionId": "echo"})
        step("bare echo")
        results["bare_idle"] = await bare_echo(burl, args.samples)
        step("terminado echo")
        async with Terminado(turl) as term:
            await term.until("#")
            await terminado_echo(term, 20)
            results["terminado_idle"] = await terminado_echo(term, args.samples)
            floods = []
            stop = asyncio.Event()
            for _ in range(10):
                flood = Terminado(turl)
                await flood.__aenter__()
                await flood.until("#")
                await flood.stdin("exec yes\r")
                floods.append(flood)
            drains = [asyncio.create_task(drain(f.ws, stop)) for f in floods]
            await asyncio.sleep(0.5)
            results["terminado_flood"] = await terminado_echo(term, args.samples)
            stop.set()
            for flood in floods:
                await flood.__aexit__()
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)

        step("attach")
        # Attach with a full 1 MiB ring.
        async with Aether(aurl) as client:
            await client.create("replay", env=env)
            await client.output_until("replay", "#")
            marker = uuid.uuid4().hex[:8]
            await client.input("replay", f"head -c 2000000 {data_file}; {marker_cmd(marker)}\r")
            await client.output_until("replay", "__" + marker)
        attach_times = []
        for _ in range(20):
            start = time.perf_counter()
            async with Aether(aurl) as client:
                await client.create("replay")
                got = 0
                while got < MiB - 4096:
                    frame = await client.frame()
                    if frame.get("type") == "output":
                        got += len(frame["data"])
            attach_times.append(time.perf_counter() - start)
        results["attach"] = attach_times

        step("first prompt")
        # Create to first prompt.
        first = []
        async with Aether(aurl) as client:
            for index in range(30):
                start = time.perf_counter()
                await client.create(f"p{index}", env=env)
                while (await client.frame()).get("type") != "output":
                    pass
                first.append(time.perf_counter() - start)
                await client.send(
                    {"channel": "terminal", "type": "close", "sessionId": f"p{index}"}
                )
        results["aetherd_first"] = first
        results["raw_first"] = raw_first_prompt(shell_env, 30)
        tfirst = []
        for _ in range(15):
            start = time.perf_counter()
            async with Terminado(turl) as term:
                while True:
                    kind, *_ = json.loads((await term.ws.receive(timeout=30)).data)
                    if kind == "stdout":
                        break
                tfirst.append(time.perf_counter() - start)
        results["terminado_first"] = tfirst

    finally:
        daemon.stop()
        terminado.stop()
        bare.stop()
    report(results, args)
    if args.profile:
        import pstats

        pstats.Stats(str(tmp / "daemon.prof")).sort_stats("tottime").print_stats(25)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    ms = 1000.0

    def lat(key: str) -> str:
        return f"p50 {pct(r[key], 0.5) * ms:.2f} ms, p99 {pct(r[key], 0.99) * ms:.2f} ms"

    print(f"## Terminal benchmark ({args.mb} MB of base64, {args.samples} echo samples)\n")
    print("| Measure | aetherd | Reference | Ratio |")
    print("|---|---|---|---|")
    print(
        f"| Throughput | {r['aetherd_mbs']:.1f} MB/s | raw PTY os.read {r['raw_mbs']:.1f} MB/s"
        f" | {r['aetherd_mbs'] / r['raw_mbs']:.2f}x (target ≥ 0.8x) |"
    )
    print(
        f"| Throughput | {r['aetherd_mbs']:.1f} MB/s | terminado {r['terminado_mbs']:.1f} MB/s"
        f" | {r['aetherd_mbs'] / r['terminado_mbs']:.2f}x |"
    )
    print(
        f"| Server CPU per MB | {r['aetherd_cpu_ms_per_mb']:.1f} ms | terminado"
        f" {r['terminado_cpu_ms_per_mb']:.1f} ms; bare aiohttp JSON {r['bare_cpu_ms_per_mb']:.1f} ms;"
        f" the raw os.read loop alone {r['raw_cpu_ms_per_mb']:.1f} ms"
        f" | {r['aetherd_cpu_ms_per_mb'] / r['terminado_cpu_ms_per_mb']:.2f}x terminado"
        " (target ≤ 0.5x) |"
    )
    print(
        f"| Echo, idle | {lat('aetherd_idle')} | bare aiohttp echo {lat('bare_idle')}"
        f" | p99 {pct(r['aetherd_idle'], 0.99) / pct(r['bare_idle'], 0.99):.2f}x (target ≤ 2x) |"
    )
    print(
        f"| Echo, idle | {lat('aetherd_idle')} | terminado {lat('terminado_idle')}"
        f" | p99 {pct(r['aetherd_idle'], 0.99) / pct(r['terminado_idle'], 0.99):.2f}x |"
    )
    print(
        f"| Echo, 10 floods (aetherd: same socket) | {lat('aetherd_flood')} | terminado, floods on"
        f" separate sockets: {lat('terminado_flood')} | p99"
        f" {pct(r['aetherd_flood'], 0.99) / pct(r['terminado_flood'], 0.99):.2f}x (target ≤ 1x) |"
    )
    attach = statistics.median(r["attach"])
    raw_mib = MiB / (r["raw_mbs"] * 1e6)
    print(
        f"| Attach + 1 MiB replay (connect included) | p50 {attach * ms:.1f} ms | 1 MiB at the raw"
        f" PTY rate: {raw_mib * ms:.1f} ms | {attach / raw_mib:.2f}x |"
    )
    print(
        f"| Create to first prompt | p50 {statistics.median(r['aetherd_first']) * ms:.1f} ms |"
        f" in-process pty.fork {statistics.median(r['raw_first']) * ms:.1f} ms; terminado"
        f" {statistics.median(r['terminado_first']) * ms:.1f} ms | target ≤ 15 ms |"
    )
    print(
        f"| RSS per idle session | {r['aetherd_rss_per_session'] / 1024:.0f} KiB | terminado"
        f" {r['terminado_rss_per_session'] / 1024:.0f} KiB | target ≤ 100 KiB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="MB of base64 to print")
    parser.add_argument("--samples", type=int, default=300, help="echo samples per case")
    parser.add_argument("--profile", action="store_true", help="profile the daemon (cProfile)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
