"""Search benchmark: the daemon's `files/search` against `rg` run directly, same tree, same run.

    python -m bench.search [--tree DIR] [--rounds N] [--quick]

The tree is a real project: by default the installed site-packages of this Python
(about a million lines of Python, plus whatever else the packages ship). For each query:

- **rg, direct**: `rg --json QUERY` on the tree with the same rules the daemon applies
  (hidden files, `.gitignore` only, the watcher's ignored names as `-g !name`, the same
  size limit): the reference, what the daemon's ripgrep engine must stay within 1.5 times of;
- **rg, defaults**: `rg --json QUERY` with ripgrep's own defaults, for information;
- **daemon, WebSocket**: a `files/search` request over a real socket to a daemon
  serving the tree, until its reply has arrived (walk, search, parse, sort, JSON);
- **service, ripgrep** and **service, python**: `SearchService.search` called in this
  process, without the socket; the Python engine is the fallback's figure.

Medians of `--rounds` runs (the Python engine runs once per query: it is slow).
`--quick` searches a subdirectory (pip's package) once, for a smoke run.
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
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from aetherd.services.executors import BoundedExecutor
from aetherd.services.jail import Jail
from aetherd.services.search import (
    RG_WALK_FLAGS,
    SearchLimits,
    SearchQuery,
    SearchService,
    builtin_ignores,
    smart_case,
)
from aetherd.services.watcher import DEFAULT_IGNORED
from bench.support import TOKEN, serve_in_process, settings_for, step

QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("rare literal", {"query": "def __init_subclass__"}),
    ("common literal", {"query": "import"}),
    ("regex", {"query": r"def \w+_(?:test|check)\w*\(", "regex": True}),
    ("smart case", {"query": "typeerror"}),
]


def rg_reference(tree: Path, spec: dict[str, Any], same_rules: bool) -> list[str]:
    """The `rg` command line of a reference run."""
    argv = ["rg", "--json"]
    if same_rules:
        argv += [*RG_WALK_FLAGS, "--max-filesize", str(SearchLimits().max_file_size)]
        argv += ["--encoding", "none", "--no-mmap"]
        for glob in builtin_ignores(sorted(DEFAULT_IGNORED), (), ()):
            argv += ["--glob", "!" + glob]
        sensitive = smart_case(spec["query"], bool(spec.get("regex")))
        argv.append("--case-sensitive" if sensitive else "--ignore-case")
    if not spec.get("regex"):
        argv.append("--fixed-strings")
    argv += ["--regexp", spec["query"]]
    return argv


def run_rg(argv: list[str], tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    return time.perf_counter() - start


def count_lines(tree: Path) -> tuple[int, int]:
    """Files the daemon would search, and lines of the text ones (ripgrep skips binary)."""
    rules = [*RG_WALK_FLAGS, "--max-filesize", str(SearchLimits().max_file_size)]
    for glob in builtin_ignores(sorted(DEFAULT_IGNORED), (), ()):
        rules += ["--glob", "!" + glob]
    listed = subprocess.run(["rg", *rules, "--files"], cwd=tree, capture_output=True, check=False)
    counts = subprocess.run(
        ["rg", *rules, "--count", "--no-filename", "^"], cwd=tree, capture_output=True, check=False
    )
    lines = sum(int(n) for n in counts.stdout.split() if n.isdigit())
    return listed.stdout.count(b"\n"), lines


async def ws_search(url: str, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, params={"token": TOKEN}, max_msg_size=0) as ws:
            rid = uuid.uuid4().hex
            start = time.perf_counter()
            await ws.send_str(
                json.dumps({"channel": "files", "type": "search", "requestId": rid, **spec})
            )
            while True:
                msg = await ws.receive(timeout=300)
                frame = json.loads(msg.data)
                if frame.get("requestId") == rid:
                    elapsed = time.perf_counter() - start
                    assert frame["success"], frame
                    return elapsed, frame["data"]


async def bench(tree: Path, rounds: int, python_rounds: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        settings = settings_for(tree, Path(scratch) / "data", watcher_enabled=False)
        runner, base = await serve_in_process(settings)
        url = base.replace("http://", "ws://") + "/ws"
        service = SearchService(Jail(tree), BoundedExecutor("bench-search", 2))
        try:
            for name, spec in QUERIES:
                step(f"query: {name}")
                query = SearchQuery(**{k: v for k, v in spec.items()})
                same = rg_reference(tree, spec, True)
                plain = rg_reference(tree, spec, False)
                run_rg(same, tree)  # warm the page cache
                direct, defaults, over_ws, svc_rg, svc_py = [], [], [], [], []
                reply: dict[str, Any] = {}
                for _ in range(rounds):
                    direct.append(run_rg(same, tree))
                    defaults.append(run_rg(plain, tree))
                    elapsed, reply = await ws_search(url, spec)
                    over_ws.append(elapsed)
                    start = time.perf_counter()
                    await service.search(query, "ripgrep")
                    svc_rg.append(time.perf_counter() - start)
                py_reply: dict[str, Any] = {}
                for _ in range(python_rounds):
                    start = time.perf_counter()
                    py_reply = await service.search(query, "python")
                    svc_py.append(time.perf_counter() - start)
                same_answer = {k: v for k, v in reply.items() if k != "engine"} == {
                    k: v for k, v in py_reply.items() if k != "engine"
                }
                rows.append(
                    {
                        "name": name,
                        "query": spec["query"],
                        "matches": len(reply["matches"]),
                        "truncated": reply["truncated"],
                        "files": reply["filesSearched"],
                        "direct": statistics.median(direct),
                        "defaults": statistics.median(defaults),
                        "ws": statistics.median(over_ws),
                        "svc_rg": statistics.median(svc_rg),
                        "svc_py": statistics.median(svc_py),
                        "same": same_answer,
                    }
                )
        finally:
            await runner.cleanup()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    site = Path(sysconfig.get_paths()["purelib"])
    parser.add_argument("--tree", type=Path, default=site, help="the tree to search")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="pip's package, one round")
    args = parser.parse_args(argv)
    if shutil.which("rg") is None:
        sys.exit("ripgrep (rg) is not installed: it is the reference")
    tree = args.tree.resolve()
    python_rounds = 1
    if args.quick:
        args.rounds = 1
        pip = tree / "pip"
        tree = pip if pip.is_dir() else tree
    files, lines = count_lines(tree)
    step(f"tree: {tree} ({files} files, {lines} lines of text)")
    rows = asyncio.run(bench(tree, args.rounds, python_rounds))
    load = os.getloadavg()[0]
    print(f"## Search over {tree.name}/ ({files} files, {lines:,} lines; load {load:.1f})")
    print(f"medians of {args.rounds} runs (Python engine: {python_rounds}); seconds\n")
    print(
        "| query | matches (truncated) | rg direct, same rules | rg defaults | daemon over WebSocket | ratio to rg direct | service, ripgrep | service, python | engines agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["ws"] / row["direct"] if row["direct"] else float("nan")
        print(
            f"| {row['name']} `{row['query']}` | {row['matches']} ({'yes' if row['truncated'] else 'no'}) "
            f"| {row['direct']:.3f} | {row['defaults']:.3f} | {row['ws']:.3f} | {ratio:.2f}x "
            f"| {row['svc_rg']:.3f} | {row['svc_py']:.2f} | {'yes' if row['same'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
