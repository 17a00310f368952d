"""Reload time: from SIGHUP until the re-executed daemon answers /readyz 200, against a cold start.

The daemon holds two live terminal sessions (one printing a counter every 50 ms), so
every reload hands something over. Each round: SIGHUP, then poll /readyz every 2 ms until
`daemon.json` shows the next generation (written once the new process is ready) and
/readyz answers 200. The old process keeps serving while the new code is checked, so
the round also reports the longest stretch during which /readyz did not answer 200
(the check is done; connections wait in the backlog).

References measured in the same run:
- a cold start: `aetherd serve` from exec until /readyz 200 (the same daemon, no handover);
- `python -c pass` (the interpreter's own start-up).

`--leaks N` then reloads N more times and prints the daemon's open fds, memory mappings
and children before and after (the measured form of the test's leak check).

Usage: python -m bench.reload [--rounds N] [--leaks N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.support import REPO, Daemon, seconds, step

COUNTER = 'i=0; while :; do echo "n=$i"; i=$((i+1)); sleep 0.05; done'


def generation(data: Path) -> int:
    try:
        return int(json.loads((data / "daemon.json").read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def footprint(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    kids = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += len(f.read().split())
    return fds, maps, kids


async def open_sessions(daemon: Daemon) -> None:
    from tests.support import connect

    ws = await connect(daemon.ws_url)
    for sid, command in (("counter", COUNTER), ("shell", "exec cat")):
        reply = await ws.request("terminal", "create", sessionId=sid, command=command)
        assert reply["success"], reply
    await ws.close()


def reload_once(daemon: Daemon, data: Path, timeout: float = 30) -> tuple[float, float]:
    """Seconds from SIGHUP to the next generation ready, and the longest /readyz gap."""
    before = generation(data)
    started = time.perf_counter()
    last_ok = started
    gap = 0.0
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        ok = daemon.ready()
        now = time.perf_counter()
        if ok:
            gap = max(gap, now - last_ok)
            last_ok = now
            if generation(data) > before:
                return now - started, gap
        if daemon.proc.poll() is not None:
            raise RuntimeError("the daemon exited during a reload")
        if time.monotonic() > deadline:
            raise TimeoutError("no reload")
        time.sleep(0.002)


def report(
    rounds: int, reloads: list[float], gaps: list[float], colds: list[float], interp: list[float]
) -> None:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms (max {max(values) * 1000:.1f})"

    print(f"rounds: {rounds} (medians), 2 live terminal sessions handed over each time")
    print(f"SIGHUP -> /readyz 200 (next generation)  {ms(reloads)}")
    print(f"  of which /readyz not answering 200     {ms(gaps)}")
    print(f"reference: cold start -> /readyz 200     {ms(colds)}")
    print(f"reference: python -c pass                {ms(interp)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--leaks", type=int, default=0, help="extra reloads for the leak check")
    parser.add_argument("--quick", action="store_true", help="one round, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.leaks = 1, 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reloads, gaps, colds, interp = [], [], [], []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "root").mkdir()
        home = tmp / "home"
        home.mkdir()
        for _ in range(args.rounds):
            cold = Daemon(tmp / "root", tmp / "cold", "--runtime-dir", str(tmp / "run"), home=home)
            started = time.perf_counter()
            try:
                cold.wait_ready()
                colds.append(time.perf_counter() - started)
            finally:
                cold.stop(30)
            interp.append(seconds(lambda: subprocess.run([sys.executable, "-c", "pass"], env=env)))
        data = tmp / "data"
        daemon = Daemon(tmp / "root", data, "--runtime-dir", str(tmp / "run"), home=home)
        try:
            daemon.wait_ready()
            asyncio.run(open_sessions(daemon))
            step(f"{args.rounds} reloads")
            for _ in range(args.rounds):
                total, gap = reload_once(daemon, data)
                reloads.append(total)
                gaps.append(gap)
            report(args.rounds, reloads, gaps, colds, interp)
            if args.leaks:
                before = footprint(daemon.pid)
                step(f"{args.leaks} reloads for the leak check")
                slow = 0
                for _ in range(args.leaks):
                    try:
                        reload_once(daemon, data, timeout=120)
                    except TimeoutError:
                        slow += 1  # refused (its check timed out on a loaded machine)
                time.sleep(1)  # probe connections close
                after = footprint(daemon.pid)
                print(
                    f"after {args.leaks} more reloads ({slow} not done within 120 s): "
                    f"fds {before[0]} -> {after[0]}, maps {before[1]} -> {after[1]}, "
                    f"children {before[2]} -> {after[2]}"
                )
        finally:
            daemon.stop(30)


if __name__ == "__main__":
    main()
