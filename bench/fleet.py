"""A fleet on one machine: N daemons behind the Kubernetes gateway's nginx, on loopback.

Each daemon serves its own workspace (own root, data dir and loopback address 127.0.0.2,
.3, ...; one port for all, as in a cluster), with the fleet's auth: no static token,
ES256 JWTs with a `wid` claim, verified with one public key. The gateway runs the
nginx.conf of packaging/kubernetes/gateway.yaml (one worker), resolving
ws-{id}.aetherd.svc.cluster.local through a DNS server in this process.

Measured, each beside a reference from the same run:
- memory of each idle daemon (RSS, and USS: the pages no other process shares), and in
  total; again while a client holds a streaming terminal on every workspace;
- CPU of an idle daemon (the port scanner, the keepalive);
- connect-to-first-frame p50/p99 through the gateway, for C clients spread over the
  workspaces (held open), against direct connections to the same daemons;
- the gateway's CPU per connection: per handshake, and per held streaming terminal,
  against the daemons' own CPU over the same interval;
- a rolling reload of every daemon (SIGHUP: issue 13, when this checkout has it; else a
  rolling restart, SIGTERM and start, which is what a Kubernetes rollout does) while
  every workspace's client holds a terminal printing a counter: client-visible failures
  (failed HTTP requests, lost terminals, gaps or repeats in the counter) and how long
  each workspace was unreachable.

Every wait is bounded, everything listens on loopback, every process started here is
stopped at the end.

Usage: python -m bench.fleet [--daemons N] [--clients C] [--hold SECONDS] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench.support import MiB, cpu_seconds, free_port, percentile, step
from tests.fleet_support import (
    CLUSTER_SUFFIX,
    DnsStub,
    FleetDaemon,
    Gateway,
    Signer,
    common_port,
    wait_all_ready,
)

GiB = 1024 * MiB
WAIT = 120.0
ROLL_WAIT = 60.0  # one workspace's update, signal to reattached
COUNTER = (
    "exec python3 -u -c 'import time\n"
    "for i in range(1000000):\n"
    '    print("n=%d" % i)\n'
    "    time.sleep(0.5)'"
)
COUNTER_LINE = re.compile(r"n=(\d+)\r?\n")


def reload_available() -> bool:
    """Whether this checkout's daemon re-executes itself on SIGHUP (issue 13)."""
    return importlib.util.find_spec("aetherd.reload") is not None


@dataclass
class Holder:
    """A client holding a terminal on one workspace through the gateway, reattaching
    (with `resumeFrom`) whenever its socket closes, and checking that the counter the
    terminal prints has no gap and no repeat."""

    daemon: FleetDaemon
    url: str
    token: str
    end: int = 0
    expected: int | None = None
    buffer: str = ""
    bytes: int = 0
    frames: int = 0
    closes: list[int] = field(default_factory=list)
    closed_at: float | None = None
    reattached_at: float | None = None
    reattach_seconds: list[float] = field(default_factory=list)
    connect_failures: int = 0
    lost_sessions: int = 0
    gaps: int = 0
    repeats: int = 0
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    task_done: str = ""

    def consume(self, data: str) -> None:
        self.buffer += data
        last = 0
        for match in COUNTER_LINE.finditer(self.buffer):
            value = int(match.group(1))
            if self.expected is not None:
                if value > self.expected:
                    self.gaps += 1
                elif value < self.expected:
                    self.repeats += 1
            self.expected = value + 1
            last = match.end()
        self.buffer = self.buffer[last:][-256:]

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        try:
            await self._run(session, stop)
        except BaseException as exc:
            self.task_done = repr(exc)
            raise
        self.task_done = "returned"

    async def _run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        deadline_total = time.monotonic() + 3600
        while not stop.is_set() and time.monotonic() < deadline_total:
            ws = await self._connect(session, stop)
            if ws is None:
                return
            try:
                create: dict[str, object] = {
                    "channel": "terminal", "type": "create", "requestId": "hold",
                    "sessionId": "hold", "command": COUNTER,
                }  # fmt: skip
                if self.end:
                    create["resumeFrom"] = self.end
                await ws.send_str(json.dumps(create))
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    frame = json.loads(msg.data)
                    if frame.get("requestId") == "hold":
                        if self.end and not (frame.get("data") or {}).get("attached"):
                            # The session did not survive: a new shell, a new counter.
                            self.lost_sessions += 1
                            self.end = 0
                            self.expected = None
                            self.buffer = ""
                        if self.closed_at is not None:
                            self.reattach_seconds.append(time.monotonic() - self.closed_at)
                            self.closed_at = None
                        self.attached.set()
                    elif frame.get("type") == "output" and frame.get("sessionId") == "hold":
                        data = frame["data"]
                        self.end = frame["offset"] + len(data.encode())
                        self.bytes += len(data)
                        self.frames += 1
                        self.consume(data)
                    if stop.is_set():
                        break
            finally:
                await ws.close()
            if not stop.is_set():
                self.closes.append(ws.close_code or 0)
                self.closed_at = time.monotonic()
                self.attached.clear()

    async def _connect(
        self, session: aiohttp.ClientSession, stop: asyncio.Event
    ) -> aiohttp.ClientWebSocketResponse | None:
        deadline = time.monotonic() + WAIT
        while not stop.is_set():
            try:
                return await session.ws_connect(
                    self.url, protocols=("Bearer", self.token), heartbeat=None
                )
            except (aiohttp.ClientError, OSError):
                self.connect_failures += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        return None


async def first_frame_seconds(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    keep: list[aiohttp.ClientWebSocketResponse],
) -> float:
    """Open a socket and wait for its first frame (the pushes every connect gets)."""
    started = time.perf_counter()
    ws = await session.ws_connect(url, protocols=("Bearer", token), heartbeat=None)
    msg = await ws.receive(timeout=WAIT)
    elapsed = time.perf_counter() - started
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise RuntimeError(f"no first frame from {url}: {msg.type}")
    keep.append(ws)
    return elapsed


def memory(daemons: list[FleetDaemon]) -> tuple[list[int], list[int]]:
    """RSS and USS of each daemon process (its shells and their children excluded)."""
    rss, uss = [], []
    for daemon in daemons:
        assert daemon.proc is not None
        info = psutil.Process(daemon.proc.pid).memory_full_info()
        rss.append(info.rss)
        uss.append(info.uss)
    return rss, uss


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


async def run(args: argparse.Namespace) -> None:
    # SIGTERM (a test's timeout, an impatient user) cancels the run, so the `finally`
    # below still stops every daemon and nginx.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    signer = Signer()
    ids = [f"w{i:03d}" for i in range(args.daemons)]
    addresses = [f"127.0.0.{2 + i}" for i in range(args.daemons)]
    reload = reload_available()
    with tempfile.TemporaryDirectory(prefix="aetherd-fleet-") as name:
        tmp = Path(name)
        key_file = tmp / "keys.json"
        key_file.write_text(signer.jwks())
        port = common_port(addresses)
        daemons = [
            FleetDaemon(wid, address, port, tmp / wid, key_file)
            for wid, address in zip(ids, addresses, strict=True)
        ]
        dns = await DnsStub(
            {f"ws-{d.workspace_id}.{CLUSTER_SUFFIX}": d.address for d in daemons}
        ).start()
        gateway: Gateway | None = None
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        try:
            step(f"starting {len(daemons)} daemons and the gateway")
            started = time.perf_counter()
            for daemon in daemons:
                daemon.start()
            gateway = Gateway(tmp / "nginx", free_port(), dns.port, port, workers=1)
            await wait_all_ready(daemons, WAIT * 3)
            await gateway.wait_listening(WAIT)
            cold_start = time.perf_counter() - started
            tokens = {d.workspace_id: signer.token(d.workspace_id, 3600) for d in daemons}
            gateway_pids = gateway.pids()
            daemon_pids = [d.proc.pid for d in daemons if d.proc is not None]

            step(f"idle: {args.settle:.0f} s")
            await asyncio.sleep(args.settle)
            idle_rss, idle_uss = memory(daemons)
            cpu_before = [cpu_seconds(pid) for pid in daemon_pids]
            await asyncio.sleep(args.idle)
            idle_cpu = [
                (cpu_seconds(pid) - before) / args.idle
                for pid, before in zip(daemon_pids, cpu_before, strict=True)
            ]

            step(f"{args.clients} clients through the gateway, {args.clients} direct")
            direct_times: list[float] = []
            gateway_times: list[float] = []
            failures: list[str] = []
            limit = asyncio.Semaphore(args.concurrency)
            # No connector limit: held WebSockets count against it (100 by default).
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                gateway_cpu0 = cpu_of(gateway_pids)
                daemons_cpu0 = cpu_of(daemon_pids)

                async def one(index: int) -> None:
                    daemon = daemons[index % len(daemons)]
                    wid = daemon.workspace_id
                    path = f"/workspaces/{wid}/ws"
                    async with limit:
                        # Alternate which goes first, so neither always meets a warmer cache.
                        pair = [
                            (gateway_times, gateway.url(path, "ws") if gateway else ""),
                            (direct_times, f"ws://{daemon.address}:{port}{path}"),
                        ]
                        if index % 2:
                            pair.reverse()
                        for times, url in pair:
                            try:
                                times.append(
                                    await first_frame_seconds(session, url, tokens[wid], sockets)
                                )
                            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                                failures.append(
                                    f"{'gateway' if times is gateway_times else 'direct'}: {exc}"
                                )
                        if len(sockets) % 200 == 0:
                            step(f"{len(sockets)} sockets open")

                await asyncio.gather(*(one(i) for i in range(args.clients)))
                gateway_cpu_connect = cpu_of(gateway_pids) - gateway_cpu0
                daemons_cpu_connect = cpu_of(daemon_pids) - daemons_cpu0
                open_connections = len(sockets)
                gateway_rss_held = sum(psutil.Process(p).memory_info().rss for p in gateway_pids)
                for ws in sockets:
                    await ws.close()
                sockets.clear()

                step(f"a client holding a terminal on every workspace: {args.hold:.0f} s")
                stop = asyncio.Event()
                holders = [
                    Holder(d, gateway.url(f"/workspaces/{d.workspace_id}/ws", "ws"),
                           tokens[d.workspace_id])
                    for d in daemons
                ]  # fmt: skip
                tasks = [asyncio.create_task(h.run(session, stop)) for h in holders]
                await asyncio.wait_for(asyncio.gather(*(h.attached.wait() for h in holders)), WAIT)
                await asyncio.sleep(1)
                bytes0 = sum(h.bytes for h in holders)
                frames0 = sum(h.frames for h in holders)
                gateway_cpu0 = cpu_of(gateway_pids)
                daemons_cpu0 = cpu_of(daemon_pids)
                await asyncio.sleep(args.hold)
                gateway_cpu_hold = (cpu_of(gateway_pids) - gateway_cpu0) / args.hold
                daemons_cpu_hold = (cpu_of(daemon_pids) - daemons_cpu0) / args.hold
                hold_bytes = (sum(h.bytes for h in holders) - bytes0) / args.hold
                hold_frames = (sum(h.frames for h in holders) - frames0) / args.hold
                busy_rss, busy_uss = memory(daemons)

                mode = "reload (SIGHUP)" if reload else "restart (SIGTERM, start)"
                step(f"rolling {mode} of {len(daemons)} daemons while clients hold terminals")
                rolling = await rolling_update(
                    session, gateway, daemons, holders, tokens, reload, args.roll_seconds
                )
                # Let every counter run on a little after the last one came back.
                await asyncio.sleep(1)
                stop.set()  # each holder sees it at its next frame (one per 0.5 s)
                await asyncio.wait(tasks, timeout=WAIT)
                for task in tasks:
                    if not task.done():
                        task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                holder_errors = [r for r in results if isinstance(r, BaseException)]
        finally:
            for ws in sockets:
                await ws.close()
            if gateway is not None:
                gateway.stop()
            for daemon in daemons:
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.proc.send_signal(signal.SIGTERM)
            for daemon in daemons:
                daemon.stop()
            dns.close()

    n = len(daemons)
    print(f"\n# Fleet: {n} daemons behind one nginx (1 worker), {args.clients} clients\n")
    print(f"cold start of {n} daemons and the gateway: {cold_start:.1f} s")
    print(f"rolling update mode: {mode}\n")
    print("## Memory per daemon\n")
    print("| | median | max | total |")
    print("|---|---|---|---|")
    for label, values in (
        ("RSS, idle", idle_rss),
        ("USS, idle", idle_uss),
        ("RSS, a client holding a streaming terminal", busy_rss),
        ("USS, a client holding a streaming terminal", busy_uss),
    ):
        print(
            f"| {label} | {mib(statistics.median(values))} | {mib(max(values))} "
            f"| {mib(sum(values))} |"
        )
    print(
        f"\nworkspaces per GiB, daemon alone: {GiB / statistics.median(idle_rss):.1f} "
        f"(by RSS), {GiB / statistics.median(idle_uss):.1f} (by USS)"
    )
    print(
        f"idle CPU per daemon: median {statistics.median(idle_cpu) * 100:.2f} % of a core, "
        f"all {n}: {sum(idle_cpu) * 100:.1f} % of a core"
    )
    print("\n## Connect to first frame\n")
    print("| path | p50 | p99 | max |")
    print("|---|---|---|---|")
    for label, values in (
        ("through the gateway", gateway_times),
        ("direct (reference)", direct_times),
    ):
        print(
            f"| {label} | {ms(percentile(values, 0.5))} | {ms(percentile(values, 0.99))} "
            f"| {ms(max(values))} |"
        )
    print(f"\nfailed connects: {len(failures)} {failures[:3]}")
    print("\n## Gateway CPU\n")
    print("| | gateway | daemons (reference) |")
    print("|---|---|---|")
    print(
        f"| per connection made (upgrade, JWT, first frames), {open_connections} "
        f"connections | {ms(gateway_cpu_connect / max(1, args.clients))} "
        f"| {ms(daemons_cpu_connect / max(1, open_connections))} |"
    )
    print(
        f"| per held streaming terminal ({hold_frames / n:.0f} frames/s, "
        f"{hold_bytes / n:.0f} B/s each), CPU share | "
        f"{gateway_cpu_hold / n * 100:.3f} % | {daemons_cpu_hold / n * 100:.3f} % |"
    )
    print(f"\ngateway RSS with {open_connections} open sockets: {mib(gateway_rss_held)}")
    print(f"\n## Rolling {mode}\n")
    print("| | value |")
    print("|---|---|")
    print(f"| workspaces updated | {rolling['updated']} of {n} (not back: {rolling['stuck']}) |")
    print(f"| HTTP requests during the updates | {rolling['requests']} |")
    print(f"| ... failed (non-200 or error) | {rolling['failed_requests']} |")
    print(f"| longest HTTP request during an update | {ms(rolling['longest_request'])} |")
    unreachable = rolling["unreachable"]
    print(
        f"| unreachable per workspace (first failure to last), median / max | "
        f"{ms(statistics.median(unreachable))} / {ms(max(unreachable))} |"
    )
    reattach = [s for h in holders for s in h.reattach_seconds]
    if reattach:
        print(
            f"| terminal client: socket closed to reattached, median / max | "
            f"{ms(statistics.median(reattach))} / {ms(max(reattach))} |"
        )
    print(
        f"| sockets closed by the daemons (codes) | {sorted(set(c for h in holders for c in h.closes))} |"
    )
    print(f"| terminals lost | {sum(h.lost_sessions for h in holders)} |")
    print(
        f"| counter gaps / repeats | {sum(h.gaps for h in holders)} / {sum(h.repeats for h in holders)} |"
    )
    print(f"| failed reconnect attempts | {sum(h.connect_failures for h in holders)} |")
    print(f"| holder errors | {len(holder_errors)} {holder_errors[:1]} |")
    if not reload:
        print(
            "\nreload: not in this checkout (issue 13); the rolling figure above is a "
            "restart. With aetherd/reload.py present the same run sends SIGHUP instead."
        )
    cores = psutil.cpu_count() or 1
    total = psutil.virtual_memory().total
    by_memory = total / statistics.median(idle_rss)
    idle_share = max(statistics.median(idle_cpu), 1e-6)
    by_idle_cpu = cores / idle_share
    busy_share = max(daemons_cpu_hold / n, 1e-6)
    by_busy_cpu = cores / busy_share
    print(f"\n## Limits on this host ({cores} cores, {mib(total)})\n")
    print("| resource | daemons it holds |")
    print("|---|---|")
    print(f"| memory, idle daemons (RSS) | {by_memory:.0f} |")
    print(f"| CPU, idle daemons | {by_idle_cpu:.0f} |")
    print(f"| CPU, a streaming terminal held on each | {by_busy_cpu:.0f} |")
    print(
        f"| gateway CPU, streaming terminals (one worker) | {1 / max(gateway_cpu_hold / n, 1e-6):.0f} |"
    )


async def rolling_update(
    session: aiohttp.ClientSession,
    gateway: Gateway,
    daemons: list[FleetDaemon],
    holders: list[Holder],
    tokens: dict[str, str],
    reload: bool,
    roll_seconds: float,
) -> dict[str, object]:
    """One workspace at a time (maxUnavailable 1): signal it, probe its /info through the
    gateway every 20 ms until it answers and its terminal client has reattached."""
    requests = failed = updated = 0
    longest = 0.0
    unreachable: list[float] = []
    stuck: list[str] = []
    timeout = aiohttp.ClientTimeout(total=30)
    phase_deadline = time.monotonic() + roll_seconds
    for daemon, holder in zip(daemons, holders, strict=True):
        if time.monotonic() > phase_deadline:
            break  # bounded: the rest are reported as not updated
        wid = daemon.workspace_id
        url = gateway.url(f"/workspaces/{wid}/info")
        headers = {"Authorization": f"Bearer {tokens[wid]}"}
        assert daemon.proc is not None
        closes_before = len(holder.closes)
        signalled = time.monotonic()
        if reload:
            daemon.proc.send_signal(signal.SIGHUP)
        else:
            await asyncio.to_thread(daemon.stop)
            daemon.start()
        first_failure: float | None = None
        last_failure: float | None = None
        deadline = signalled + ROLL_WAIT
        # Probe until the workspace answers and its holder is back (after it noticed).
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                async with session.get(url, headers=headers, timeout=timeout) as resp:
                    ok = resp.status == 200
                    await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            now = time.monotonic()
            requests += 1
            longest = max(longest, now - sent)
            if not ok:
                failed += 1
                first_failure = first_failure if first_failure is not None else sent
                last_failure = now
            elif holder.attached.is_set() and (
                len(holder.closes) > closes_before or now - signalled > 10
            ):
                break
            await asyncio.sleep(0.02)
        else:
            # Reported, not fatal: the run goes on to the next workspace.
            stuck.append(wid)
            step(
                f"{wid} did not come back within {ROLL_WAIT:.0f} s: holder attached="
                f"{holder.attached.is_set()} closes={holder.closes} "
                f"failures={holder.connect_failures} task_done={holder.task_done}; "
                f"daemon log: {daemon.log.read_text()[-1500:]}"
            )
            continue
        updated += 1
        unreachable.append(
            (last_failure - first_failure) if first_failure is not None and last_failure else 0.0
        )
    return {
        "updated": updated,
        "requests": requests,
        "failed_requests": failed,
        "longest_request": longest,
        "unreachable": unreachable or [0.0],
        "stuck": stuck,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=50)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16, help="connects in flight")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring idle")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    parser.add_argument(
        "--hold", type=float, default=10.0, help="seconds of held terminals measured"
    )
    parser.add_argument(
        "--roll-seconds", type=float, default=900, help="bound of the rolling update phase"
    )
    parser.add_argument("--quick", action="store_true", help="3 daemons, 30 clients: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.daemons, args.clients, args.settle, args.idle, args.hold = 3, 30, 1.0, 1.0, 2.0
        args.roll_seconds = 1.0  # the update of one workspace: the phase runs, briefly
    if not 1 <= args.daemons <= 250:
        parser.error("--daemons must be 1-250 (one loopback address each, 127.0.0.2-251)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
