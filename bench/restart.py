"""Restart time: from SIGTERM until /readyz answers 200 again, against its parts.

References measured in the same run:
- `python -c pass` (the interpreter's own start-up);
- `python -c "import aetherd.app"` (start-up plus importing the daemon).

Usage: python bench/restart.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def start(port: int, tmp: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aetherd",
            "serve",
            "--port",
            str(port),
            "--token",
            "bench-token-123",
            "--root",
            str(tmp),
            "--data-dir",
            str(tmp / "data"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready(port):
        if time.monotonic() > deadline:
            raise TimeoutError("not ready")
        time.sleep(0.002)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    restarts, stops, interp, imports = [], [], [], []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        port = free_port()
        proc = start(port, tmp, env)
        wait_ready(port)
        for _ in range(args.rounds):
            started = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            stopped = time.perf_counter()
            proc = start(port, tmp, env)
            wait_ready(port)
            restarts.append(time.perf_counter() - started)
            stops.append(stopped - started)
            interp.append(timed([sys.executable, "-c", "pass"], env))
            imports.append(timed([sys.executable, "-c", "import aetherd.app"], env))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms"

    print(f"rounds: {args.rounds} (medians)")
    print(f"SIGTERM -> /readyz 200 again   {ms(restarts)}")
    print(f"  of which SIGTERM -> exit     {ms(stops)}")
    print(f"reference: python -c pass      {ms(interp)}")
    print(f"reference: import aetherd.app  {ms(imports)}")


if __name__ == "__main__":
    main()
