"""Reload time: from SIGHUP until the re-executed daemon answers /readyz 200, against a cold start.

The daemon holds two live terminal sessions (one printing a counter every 50 ms) and
two processes of the process channel (one printing on stdout and stderr every 50 ms), so
every reload hands something over. Each round: SIGHUP, then poll /readyz every 2 ms until
`daemon.json` shows the next generation (written once the new process is ready) and
/readyz answers 200. The old process keeps serving while the new code is checked, so
the round also reports the longest stretch during which /readyz did not answer 200.

Two kinds of reload, alternating:
- **same code** (a config change, `systemctl reload` with nothing installed): the
  daemon sees that no file of its code changed and checks only the settings, in-process;
- **new code** (an upgrade): before SIGHUP a file is added to a directory on the
  daemon's `sys.path`, which changes the code's fingerprint, so the new code is
  checked in a child (`AETHERD_RELOAD_CHECK=1`: imports everything) before the exec.

References measured in the same run:
- a cold start: `aetherd serve` from exec until /readyz 200 (the same daemon, no handover);
- `python -c pass` (the interpreter's own start-up).

`--leaks N` then reloads N more times (same code) and prints the daemon's open fds,
threads, RSS, memory mappings, PTYs, pipes and children before and after.

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
BOTH = 'i=0; while :; do echo "n=$i"; echo "e=$i" >&2; i=$((i+1)); sleep 0.05; done'


def generation(data: Path) -> int:
    try:
        return int(json.loads((data / "daemon.json").read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def footprint(pid: int) -> dict[str, int]:
    """fds, threads, RSS (KiB), mappings, PTY masters, pipes and children of `pid`."""
    fds = os.listdir(f"/proc/{pid}/fd")
    kinds: dict[str, int] = {"ptmx": 0, "pipe": 0}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/ptmx":
            kinds["ptmx"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    kids = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += len(f.read().split())
    return {
        "fds": len(fds),
        "threads": int(status["Threads"]),
        "rss_kib": int(status["VmRSS"].split()[0]),
        "maps": maps,
        "ptys": kinds["ptmx"],
        "pipes": kinds["pipe"],
        "children": kids,
    }


async def open_sessions(daemon: Daemon) -> None:
    from tests.support import connect

    ws = await connect(daemon.ws_url)
    for sid, command in (("counter", COUNTER), ("shell", "exec cat")):
        reply = await ws.request("terminal", "create", sessionId=sid, command=command)
        assert reply["success"], reply
    for pid, fields in (
        ("printer", {"command": BOTH}),
        ("stdin", {"argv": ["cat"], "stdin": True}),
    ):
        reply = await ws.request("process", "start", processId=pid, **fields)
        assert reply["success"], reply
    await ws.close()


def last_check(data: Path) -> str:
    """How the last reload was checked ("settings": in-process; "child")."""
    try:
        return str(json.loads((data / "daemon.json").read_text()).get("lastCheck"))
    except (OSError, ValueError):
        return "?"


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


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms (max {max(values) * 1000:.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="reloads of each kind")
    parser.add_argument("--leaks", type=int, default=0, help="extra reloads for the leak check")
    parser.add_argument("--quick", action="store_true", help="one round, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.leaks = 1, 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    same: list[float] = []
    new: list[float] = []
    same_gaps: list[float] = []
    new_gaps: list[float] = []
    colds: list[float] = []
    interp: list[float] = []
    checks: list[str] = []  # how each "new code" reload was checked (a child, by design)
    same_checks: list[str] = []  # and each "same code" one ("settings": in-process)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "root").mkdir()
        home = tmp / "home"
        home.mkdir()
        installed = tmp / "installed"  # on the daemon's sys.path: "installing" touches it
        installed.mkdir()
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
        daemon = Daemon(
            tmp / "root", data, "--runtime-dir", str(tmp / "run"), home=home, path=[installed]
        )
        try:
            daemon.wait_ready()
            asyncio.run(open_sessions(daemon))
            step(f"{args.rounds} reloads of each kind")
            for index in range(args.rounds):
                total, gap = reload_once(daemon, data)
                same_checks.append(last_check(data))
                same.append(total)
                same_gaps.append(gap)
                (installed / f"release-{index}.txt").write_text("a new version\n")
                total, gap = reload_once(daemon, data)
                new.append(total)
                new_gaps.append(gap)
                checks.append(last_check(data))
            print(
                f"rounds: {args.rounds} of each (medians); 2 terminal sessions and 2 processes "
                "handed over each time"
            )
            print(
                f"SIGHUP -> /readyz 200, same code        {ms(same)}  checked: {set(same_checks)}"
            )
            print(f"  of which /readyz not answering 200     {ms(same_gaps)}")
            print(f"SIGHUP -> /readyz 200, new code         {ms(new)}  checked: {set(checks)}")
            print(f"  of which /readyz not answering 200     {ms(new_gaps)}")
            print(f"reference: cold start -> /readyz 200     {ms(colds)}")
            print(f"reference: python -c pass                {ms(interp)}", flush=True)
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
                print(f"after {args.leaks} more reloads ({slow} not done within 120 s):")
                for key, value in before.items():
                    print(f"  {key:9} {value:8} -> {after[key]}")
        finally:
            daemon.stop(30)


if __name__ == "__main__":
    main()
