"""What the benchmarks share: the daemon in a child process or in this one, percentiles,
CPU time and memory of a process read from /proc, and progress lines.

Nothing here imports pytest; `free_port` is the test suite's own (tests/support.py
imports only the standard library and aiohttp).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support import free_port

if TYPE_CHECKING:
    from aiohttp import web

    from aetherd.settings import Settings

__all__ = [
    "REPO",
    "TOKEN",
    "Child",
    "Daemon",
    "MiB",
    "cpu_seconds",
    "free_port",
    "percentile",
    "rss_bytes",
    "seconds",
    "serve_in_process",
    "settings_for",
    "step",
]

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789"
MiB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def step(text: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0 ≤ q ≤ 1) of `values`: the sorted value at index round(q * (n - 1)).

    This is a measured sample, never an interpolation (numpy's "nearest" method): with
    fewer than 100 samples, p99 is the largest.
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def seconds(func: Callable[[], Any]) -> float:
    """Wall-clock seconds that one call of `func` takes."""
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid`, in bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


class Child:
    """A server in a child process, stopped with SIGTERM (then SIGKILL) at the end.

    With `ready`, the child writes a line holding that word to its stdout once it
    listens, and the constructor waits for it; without, stdout is discarded (an unread
    pipe would fill and block the child).
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        ready: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready is not None else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.pid = self.proc.pid
        if ready is not None:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if ready not in line:
                self.stop()
                raise RuntimeError(f"{argv[:3]} did not start: {line!r}")

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Daemon(Child):
    """`python -m aetherd serve` on 127.0.0.1, with the benchmark token.

    `port` defaults to a free one; `home` becomes the daemon's HOME; `python` replaces
    `[python, "-m", "aetherd"]` (to run the daemon under a profiler, for example);
    `env` replaces this process's environment. The checkout this module belongs to is
    on the child's PYTHONPATH, or `code` (a directory holding another version's
    `aetherd` package, to compare two versions), then `path`.
    """

    def __init__(
        self,
        root: Path,
        data_dir: Path,
        *extra: str,
        port: int | None = None,
        home: Path | None = None,
        python: list[str] | None = None,
        code: Path | None = None,
        env: dict[str, str] | None = None,
        path: list[Path] | None = None,
    ) -> None:
        self.port = port or free_port()
        env = {
            **(os.environ if env is None else env),
            "PYTHONPATH": os.pathsep.join(map(str, [code or REPO, *(path or [])])),
        }
        if home is not None:
            env["HOME"] = str(home)
        argv = [
            *(python or [sys.executable, "-m", "aetherd"]),
            "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--token", TOKEN,
            "--root", str(root),
            "--data-dir", str(data_dir),
            *extra,
        ]  # fmt: skip
        # `python -m` puts the working directory first on sys.path: start in `code`, so
        # that a checkout run from elsewhere does not shadow it.
        super().__init__(argv, env, cwd=code)

    @property
    def ws_url(self) -> str:
        """The default workspace's WebSocket, with the token."""
        return f"ws://127.0.0.1:{self.port}/workspaces/local/ws?token={TOKEN}"

    def ready(self) -> bool:
        """Whether `/readyz` answers 200 now."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30, interval: float = 0.002) -> None:
        """Poll `/readyz` every `interval` seconds until it answers 200."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon was not ready within {timeout} s")
            time.sleep(interval)


def settings_for(root: Path, data_dir: Path, **extra: Any) -> Settings:
    """Settings of a daemon in this process: workspace `bench`, any free port."""
    from aetherd.settings import Settings

    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "workspace_id": "bench",
        "root": root,
        "data_dir": data_dir,
        "token": TOKEN,
        **extra,
    }
    return Settings(**fields)


async def serve_in_process(settings: Settings) -> tuple[web.AppRunner, str]:
    """Start the daemon's app in this process; its runner and the workspace's base URL
    (`http://127.0.0.1:<port>/workspaces/<id>`). Stop it with `runner.cleanup()`."""
    from aiohttp import web

    from aetherd.app import create_app

    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    port = runner.addresses[0][1]
    return runner, f"http://{settings.host}:{port}/workspaces/{settings.workspace_id}"
