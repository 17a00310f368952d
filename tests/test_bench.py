"""The benchmarks still import and run: each in its `--quick` mode, as `python -m bench.<name>`.

Nothing here times anything; a benchmark's figures are not checked, only that it ran
to its table. The quick runs start together (they wait on sleeps and child processes
more than on CPU), so the whole module takes about as long as the slowest one.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench import support
from bench.terminal import BARE_SERVER, Aether, aether_echo, aether_throughput, pty_floor
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")
WAIT = 150.0

# What each quick run must print: the last table's heading or row. The terminal benchmark
# needs terminado (the `bench` extra, not installed for tests): it is only asked for its
# usage here, and its aetherd client is run against a real daemon below.
QUICK = {
    "acp": (["--quick"], "| reference: SIGKILL and reap a plain child |"),
    "agent": (["--quick"], "## Per-token overhead (50 tokens"),
    "files": (["--quick"], "| watch setup, "),
    "fleet": (["--quick"], "| gateway CPU, streaming terminals (one worker) |"),
    "ports": (["--quick"], "| inode → pid lookup, full walk of /proc/*/fd |"),
    "proxy": (["--quick"], "| 64 in flight |"),
    "reload": (["--quick"], "reference: python -c pass"),
    "restart": (["--quick"], "reference: import aetherd.app"),
    "search": (["--quick"], "| smart case `typeerror` |"),
    "startup": (["--quick"], "| start → /readyz 200 ≤"),
    "support": None,
    "terminal": (["--help"], "--quick"),
}


def test_every_benchmark_is_covered() -> None:
    assert sorted(QUICK) == MODULES


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py has no docstring"
    if name != "support":
        assert callable(module.main)


@pytest.fixture(scope="module", autouse=True)
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen]]:
    """Every benchmark's quick run, started at once when the module begins (the other
    tests run meanwhile); killed at the end if still running."""
    home = tmp_path_factory.mktemp("bench-home")
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("ANTHROPIC_API_KEY", None)
    env.pop("OPENAI_API_KEY", None)
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", *spec[0]],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, spec in QUICK.items()
        if spec is not None
    }
    try:
        yield runs
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                _kill_tree(proc)
            proc.communicate()


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a benchmark still running and everything it started: its daemons, nginx.

    Killing only the benchmark left the fleet run's daemons and nginx listening, parented
    to init, whenever the suite stopped early (`-x`, a timeout).
    """
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, spec in QUICK.items() if spec is not None])
def test_benchmark_quick_run(name: str, quick_runs: dict[str, subprocess.Popen]) -> None:
    proc = quick_runs[name]
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{err[-3000:]}"
    spec = QUICK[name]
    assert spec is not None
    assert spec[1] in out, f"bench.{name} printed no {spec[1]!r}:\n{out[-3000:]}"


@pytest.mark.slow
async def test_terminal_benchmark_client_against_a_daemon(tmp_path: Path) -> None:
    """The terminal benchmark's aetherd side (throughput and echo), on a real daemon."""
    data = tmp_path / "data.txt"
    lines = [uuid.uuid4().hex for _ in range(2000)]
    data.write_text("\n".join(lines) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    daemon = support.Daemon(tmp_path, tmp_path / "state", home=home)
    try:
        daemon.wait_ready(timeout=30, interval=0.05)
        env = {"HOME": str(home)}
        result = await aether_throughput(daemon.ws_url, daemon.pid, env, str(data))
        # The PTY turns each \n into \r\n, and the typed command line is echoed too.
        assert result["bytes"] >= data.stat().st_size + len(lines)
        assert result["seconds"] > 0 and result["cpu"] >= 0
        async with Aether(daemon.ws_url) as client:
            await client.create("echo", env=env)
            await client.output_until("echo", "#")
            times = await aether_echo(client, "echo", 4)
            await client.close_session("echo")
        assert len(times) == 4
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0


@pytest.mark.slow
async def test_terminal_benchmark_floor_reads_a_pty_to_the_same_client(tmp_path: Path) -> None:
    """The throughput floor (a bare server: PTY read, output frames) delivers the whole file."""
    data = tmp_path / "data.txt"
    lines = [uuid.uuid4().hex for _ in range(2000)]
    data.write_text("\n".join(lines) + "\n")
    port = support.free_port()
    server = support.Child(
        [sys.executable, "-c", BARE_SERVER, str(port)], dict(os.environ), "ready"
    )

    def listening() -> bool:
        # The bare server says "ready" just before aiohttp binds its port.
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        await wait_for(listening, timeout=60)
        result = await pty_floor(f"ws://127.0.0.1:{port}", server.pid, str(data))
    finally:
        server.stop(10)
    # cat on a PTY: each \n becomes \r\n; the marker line comes last.
    assert result["bytes"] >= data.stat().st_size + len(lines)
    assert result["seconds"] > 0 and result["cpu"] >= 0 and result["client_cpu"] > 0


def test_percentile_is_a_measured_sample() -> None:
    values = [float(v) for v in range(10, -1, -1)]  # 10 … 0, unsorted on purpose
    assert support.percentile(values, 0.0) == 0.0
    assert support.percentile(values, 0.5) == 5.0
    assert support.percentile(values, 0.9) == 9.0
    assert support.percentile(values, 0.99) == 10.0  # index round(9.9): the largest
    assert support.percentile([2.5], 0.99) == 2.5


def test_cpu_and_memory_of_a_process_agree_with_psutil() -> None:
    """The benchmarks read /proc themselves; psutil reads the same fields."""
    proc = psutil.Process()
    times = proc.cpu_times()
    assert abs(support.cpu_seconds(proc.pid) - (times.user + times.system)) < 0.5
    assert abs(support.rss_bytes(proc.pid) - proc.memory_info().rss) < 8 * 1024 * 1024
