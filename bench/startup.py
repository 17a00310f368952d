"""Start-up and idle footprint: a fresh `aetherd serve` until /readyz 200, and its memory.

Each round starts a fresh daemon (`python -m aetherd serve`, a new empty workspace and
data directory, an empty HOME) and measures:
- the wall time from spawning the process until `/readyz` answers 200 (polled every
  `--poll` seconds), and the CPU time (user + system) the process used until then: on a
  loaded machine the wall time mostly measures the neighbours, the CPU time much less;
- `--settle` seconds after that, with no client connected: RSS, PSS and USS
  (Private_Clean + Private_Dirty) from `/proc/<pid>/smaps_rollup`, anonymous memory,
  the number of threads, and the number of modules imported (`--modules`).

References measured in the same run, interleaved in the same rounds (their wall and CPU
times read when the child has done its imports, as the daemon's when it answers
/readyz; before 2026-12-03 10:00 UTC they were read at the child's exit, which added
its teardown, 80-100 ms of CPU for the aiohttp rows, to the references):
- `python -c pass`: the interpreter's own start-up and footprint (the floor);
- `python -c "import aiohttp"`: the floor of any aiohttp daemon (its memory is read the
  same way, from outside, once the child has imported aiohttp and says so);
- `aiohttp.web` and pydantic imported and one model built: the floor of any daemon on
  the two libraries aetherd is built on.

Bytecode: every child gets a private, warmed `PYTHONPYCACHEPREFIX` (one untimed round
first), so each measured start loads `.pyc` files as an installed daemon does (pip
compiles them at install). The development environment here sets
`PYTHONDONTWRITEBYTECODE=1`, which makes every start compile aetherd from source;
`--source` adds a row for that case. `--quick` (one round, a smoke run) skips the
private cache and the warm-up: it runs with the environment's bytecode settings.

Optional rows: `--baseline DIR` (another checkout, e.g. the code before a change,
measured in the same rounds) and `--env NAME=VALUE` (this checkout with one more
environment variable, e.g. MALLOC_ARENA_MAX=2). `--importtime N` runs each daemon once
more under `python -X importtime` and prints the N packages that take the most import
time (self time summed per package; aetherd per subpackage).

Prints medians and min-max over the rounds, and PASS/FAIL against the targets of
issue 18 (RSS ≤ 40 MiB, start to /readyz ≤ 0.3 s).

Usage: python -m bench.startup [--rounds 10] [--settle 1.0] [--baseline DIR] [--memory-profile N]
       [--env NAME=VALUE] [--source] [--importtime N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.support import REPO, Daemon, MiB, cpu_seconds, step

TARGET_RSS_MIB = 40.0
TARGET_READY_S = 0.3
AIOHTTP = 'python -c "import aiohttp"'
FLOORS = {
    "python -c pass": "",
    AIOHTTP: "import aiohttp",
    # What any daemon on these two libraries pays before a line of its own: both
    # imported, and one model built (which loads pydantic-core's validator code).
    "aiohttp.web + pydantic, one model built": (  # FLOOR_LABEL
        "import aiohttp.web, pydantic\npydantic.create_model('M', a=(int, 0))(a=1)"
    ),
}
# The child prints a line once its imports are done, then waits to be measured. (`sys`
# is imported by the interpreter's start already: the line costs nothing to import.)
HOLD = "{imports}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
# `aetherd serve` with every module's import wrapped: its RSS before and after, less
# what its own imports added (its *self* memory, as -X importtime gives self time).
# A thread polls /readyz, prints the table as JSON once it answers 200 (no client),
# and stops the daemon with SIGTERM.
MEMORY_PROFILE = r"""
import importlib.abc, json, os, signal, socket, sys, threading, time

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

rows, stack = [], []

class Wrap(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        stack.append(0)
        before = rss()
        try:
            self.loader.exec_module(module)
        finally:
            grown = rss() - before
            children = stack.pop()
            rows.append((module.__name__, grown - children))
            if stack:
                stack[-1] += grown
    def __getattr__(self, name):
        return getattr(self.loader, name)

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = Wrap(spec.loader)
                return spec
        return None

start = rss()
sys.meta_path.insert(0, Finder())
from aetherd.cli import main

port = int(sys.argv[1])

def probe():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((b"127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.02)
    time.sleep(float(sys.argv[2]))
    print("PROFILE " + json.dumps({"start": start, "ready": rss(), "rows": rows}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(main(sys.argv[3:]))
"""
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/<pid>/smaps_rollup, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def threads(pid: int) -> int:
    """The number of threads of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/task"))


def footprint(pid: int) -> dict[str, float]:
    """RSS, PSS, USS and anonymous memory in MiB, and the thread count, of `pid`."""
    rollup = smaps_rollup(pid)
    return {
        "rss": rollup["Rss"] / MiB,
        "pss": rollup["Pss"] / MiB,
        "uss": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / MiB,
        "anon": rollup["Anonymous"] / MiB,
        "threads": float(threads(pid)),
    }


@dataclass
class Row:
    """One measured process: how to start it, and what each round found."""

    label: str
    imports: str | None = None  # a floor: `python -c <imports>`
    repo: Path = REPO  # a daemon: the checkout on its PYTHONPATH
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset it
    results: list[dict[str, float]] = field(default_factory=list)


def floor_round(row: Row, env: dict[str, str], settle: float) -> dict[str, float]:
    """`python -c <imports>` until its imports are done, and its footprint then.

    The wall and CPU times are read when the child says its imports are done, as the
    daemon's are when it answers /readyz: not at its exit, whose teardown (finalising
    every module) would count against the reference and not against the daemon.
    """
    imports = row.imports or ""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(imports=imports)],
        env=child_env(env, row),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{row.label} did not start")
        result = {"ready": time.perf_counter() - started, "cpu": cpu_seconds(proc.pid)}
        time.sleep(settle)
        result.update(footprint(proc.pid))
    finally:
        proc.kill()
        proc.communicate()
    return result


def daemon_round(
    row: Row, env: dict[str, str], home: Path, settle: float, poll: float
) -> dict[str, float]:
    """A fresh daemon on a new empty workspace: spawn → /readyz 200, then its footprint."""
    with tempfile.TemporaryDirectory(prefix="aetherd-bench-startup-") as name:
        tmp = Path(name)
        (tmp / "root").mkdir()
        started = time.perf_counter()
        daemon = Daemon(
            tmp / "root", tmp / "data", home=home, env=child_env(env, row), code=row.repo
        )
        try:
            daemon.wait_ready(timeout=60, interval=poll)
            ready = time.perf_counter() - started
            cpu = cpu_seconds(daemon.pid)
            time.sleep(settle)
            result = {"ready": ready, "cpu": cpu, **footprint(daemon.pid)}
        finally:
            daemon.stop(30)
        if daemon.proc.returncode != 0:
            raise RuntimeError(f"the daemon exited with {daemon.proc.returncode}")
    return result


def import_profile(row: Row, env: dict[str, str], home: Path) -> list[tuple[str, float, int]]:
    """The daemon's imports until ready, from `-X importtime`: (package, self ms, modules),
    most time first. aetherd is split by subpackage (aetherd.services, ...)."""
    with tempfile.TemporaryDirectory(prefix="aetherd-bench-startup-") as name:
        tmp = Path(name)
        (tmp / "root").mkdir()
        log = tmp / "importtime.txt"
        # The shell only redirects stderr (where -X importtime writes), then execs python.
        python = ["sh", "-c", f'exec "$0" -X importtime -m aetherd "$@" 2>"{log}"', sys.executable]
        daemon = Daemon(
            tmp / "root", tmp / "data", home=home, env=child_env(env, row), code=row.repo,
            python=python,
        )  # fmt: skip
        try:
            daemon.wait_ready(timeout=60)
        finally:
            daemon.stop(30)
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for line in log.read_text().splitlines():
            match = IMPORT_LINE.match(line)
            if match is None:
                continue
            parts = match.group(4).split(".")
            key = ".".join(parts[:2]) if parts[0] == "aetherd" else parts[0]
            totals[key][0] += int(match.group(1)) / 1000
            totals[key][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [(key, ms, int(count)) for key, (ms, count) in ranked]


FLOOR_LABEL = "aiohttp.web + pydantic, one model built"


def floor_modules(env: dict[str, str]) -> set[str]:
    """The modules the aiohttp.web + pydantic reference loads."""
    code = FLOORS[FLOOR_LABEL] + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=True,
    ).stdout  # fmt: skip
    return set(json.loads(out.splitlines()[-1]))


def by_package(rows: list[tuple[str, float]]) -> list[tuple[str, float, int]]:
    """[(package, self MiB, modules)] largest first; aetherd split per subpackage."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for module, grown in rows:
        parts = module.split(".")
        key = ".".join(parts[:2]) if parts[0] == "aetherd" else parts[0]
        totals[key][0] += grown / MiB
        totals[key][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [(key, mib, int(count)) for key, (mib, count) in ranked]


def memory_profile(
    row: Row, env: dict[str, str], home: Path, settle: float
) -> tuple[dict[str, float], list[tuple[str, float, int]], list[tuple[str, float]]]:
    """The daemon's RSS split by the imports that grew it: ({start, imports, rest, ready}
    in MiB, [(package, self MiB, modules)] largest first, [(module, self bytes)]).
    `start` is the interpreter before aetherd, `rest` what grew outside any import
    (threads, arenas, runtime)."""
    from tests.support import free_port

    with tempfile.TemporaryDirectory(prefix="aetherd-bench-startup-") as name:
        tmp = Path(name)
        (tmp / "root").mkdir()
        port = free_port()
        argv = [
            "serve", "--host", "127.0.0.1", "--port", str(port), "--token", "bench-token",
            "--root", str(tmp / "root"), "--data-dir", str(tmp / "data"),
        ]  # fmt: skip
        run_env = {**child_env(env, row), "PYTHONPATH": str(row.repo), "HOME": str(home)}
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROFILE, str(port), str(settle), *argv],
            env=run_env, cwd=row.repo, capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    line = next(line for line in out.splitlines() if line.startswith("PROFILE "))
    data = json.loads(line.removeprefix("PROFILE "))
    imports = sum(grown for _, grown in data["rows"]) / MiB
    summary = {
        "start": data["start"] / MiB,
        "imports": imports,
        "rest": data["ready"] / MiB - data["start"] / MiB - imports,
        "ready": data["ready"] / MiB,
    }
    rows = [(str(module), float(grown)) for module, grown in data["rows"]]
    return summary, by_package(rows), rows


def child_env(env: dict[str, str], row: Row) -> dict[str, str]:
    """`env` with the row's changes (a None value removes the variable)."""
    merged: dict[str, str | None] = {**env, **row.env}
    return {k: v for k, v in merged.items() if v is not None}


def spread(values: list[float], fmt: str) -> str:
    """`median (min-max)` of `values`, each formatted with `fmt`."""
    med = format(statistics.median(values), fmt)
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after ready")
    parser.add_argument("--poll", type=float, default=0.005, help="seconds between polls")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured alike")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a row with this env"
    )
    parser.add_argument("--source", action="store_true", help="a row without .pyc files")
    parser.add_argument("--importtime", type=int, default=0, metavar="N", help="top N imports")
    parser.add_argument(
        "--memory-profile", type=int, default=0, metavar="N", help="top N packages by RSS"
    )
    parser.add_argument("--quick", action="store_true", help="one round, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.settle = 1, 0.1

    rows = [Row("aetherd serve")]
    if args.baseline is not None:
        rows.append(Row(f"aetherd serve, baseline {args.baseline.name}", repo=args.baseline))
    for pair in args.env:
        name, _, value = pair.partition("=")
        rows.append(Row(f"aetherd serve, {name}={value}", env={name: value}))
    if args.source:
        source: dict[str, str | None] = {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPYCACHEPREFIX": None,
        }
        rows.append(Row("aetherd serve, aetherd compiled at each start (no .pyc)", env=source))
    rows += [Row(label, imports=imports) for label, imports in FLOORS.items()]

    with tempfile.TemporaryDirectory(prefix="aetherd-bench-home-") as home_name:
        home = Path(home_name)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home)}
        if not args.quick:
            # A private bytecode cache, filled by the warm-up round. (It holds every
            # module, the standard library's too: filling it takes a while.)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(home / "pyc")

        def run(row: Row) -> dict[str, float]:
            if row.imports is not None:
                return floor_round(row, env, args.settle)
            return daemon_round(row, env, home, args.settle, args.poll)

        if not args.quick:
            step("warm-up round (fills the bytecode cache; not counted)")
            for row in rows:
                run(row)
        for n in range(args.rounds):
            step(f"round {n + 1}/{args.rounds}")
            # Interleaved, so that the machine's load drifts over every row alike.
            for row in rows:
                row.results.append(run(row))
        memory = []
        floor: set[str] = set()
        if args.memory_profile:
            floor = floor_modules({**env, "HOME": str(home)})
            for row in rows:
                if row.imports is None and not row.env:
                    step(f"memory profile: {row.label}")
                    memory.append((row.label, *memory_profile(row, env, home, args.settle)))
        profiles = []
        if args.importtime:
            for row in rows:
                if row.imports is None and not row.env:
                    step(f"-X importtime: {row.label}")
                    profiles.append((row.label, import_profile(row, env, home)))

    print(f"## Start-up and idle footprint ({args.rounds} rounds: median (min-max))")
    print(
        "| process | start → ready | CPU to ready | RSS MiB | PSS MiB | USS MiB | anon MiB "
        "| threads |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ready = [r["ready"] * 1000 for r in row.results]
        cells = [spread(ready, ".0f") + " ms"]
        cells.append(spread([r["cpu"] * 1000 for r in row.results], ".0f") + " ms")
        for key in ("rss", "pss", "uss", "anon"):
            cells.append(spread([r[key] for r in row.results], ".1f"))
        cells.append(spread([r["threads"] for r in row.results], ".0f"))
        print(f"| {row.label} | " + " | ".join(cells) + " |")
    daemon = rows[0].results
    aiohttp = next(row.results for row in rows if row.label == AIOHTTP)
    rss = statistics.median(r["rss"] for r in daemon)
    ready_s = statistics.median(r["ready"] for r in daemon)
    floor_s = statistics.median(r["ready"] for r in aiohttp)
    floor_rss = statistics.median(r["rss"] for r in aiohttp)
    print()
    print("| target | measured (median) | aiohttp floor, same run | verdict |")
    print("|---|---|---|---|")
    verdict = "PASS" if rss <= TARGET_RSS_MIB else "FAIL"
    print(f"| RSS ≤ {TARGET_RSS_MIB:.0f} MiB | {rss:.1f} MiB | {floor_rss:.1f} MiB | {verdict} |")
    verdict = "PASS" if ready_s <= TARGET_READY_S else "FAIL"
    print(
        f"| start → /readyz 200 ≤ {TARGET_READY_S} s | {ready_s:.3f} s | {floor_s:.3f} s "
        f"| {verdict} |"
    )
    for label, profile in profiles:
        print()
        print(f"## -X importtime, {label}: packages by import self time (one run)")
        total = sum(ms for _, ms, _ in profile)
        count = sum(n for _, _, n in profile)
        print(f"| package | self ms | modules |  (all: {total:.0f} ms, {count} modules)")
        print("|---|---|---|")
        for key, ms, n in profile[: args.importtime]:
            print(f"| {key} | {ms:.1f} | {n} |")
    for label, summary, packages, modules in memory:
        print()
        print(f"## RSS by import, {label} (one run, ready + {args.settle} s)")
        print(
            f"interpreter before aetherd {summary['start']:.1f} MiB + imports "
            f"{summary['imports']:.1f} MiB + outside imports {summary['rest']:.1f} MiB "
            f"= {summary['ready']:.1f} MiB"
        )
        print("| package | self RSS MiB | modules |")
        print("|---|---|---|")
        for key, mib, n in packages[: args.memory_profile]:
            print(f"| {key} | {mib:.2f} | {n} |")
        beyond = by_package([(m, grown) for m, grown in modules if m not in floor])
        total = sum(mib for _, mib, _ in beyond)
        count = sum(n for _, _, n in beyond)
        print()
        print(
            f"Beyond the floor ({FLOOR_LABEL}): {count} modules it does not load, "
            f"{total:.1f} MiB self RSS at import"
        )
        print("| package | self RSS MiB | modules |")
        print("|---|---|---|")
        for key, mib, n in beyond[: args.memory_profile]:
            print(f"| {key} | {mib:.2f} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
