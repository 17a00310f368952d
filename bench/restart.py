"""Restart time: from SIGTERM until /readyz answers 200 again, against its parts.

References measured in the same run:
- `python -c pass` (the interpreter's own start-up);
- `python -c "import aetherd.app"` (start-up plus importing the daemon).

Usage: python -m bench.restart [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.support import REPO, Daemon, free_port, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one round, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def timed(cmd: list[str]) -> float:
        return seconds(lambda: subprocess.run(cmd, env=env, check=True))

    restarts, stops, interp, imports = [], [], [], []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        port = free_port()
        daemon = Daemon(tmp, tmp / "data", port=port)
        try:
            daemon.wait_ready()
            for _ in range(args.rounds):
                started = time.perf_counter()
                daemon.stop(30)
                stopped = time.perf_counter()
                daemon = Daemon(tmp, tmp / "data", port=port)
                daemon.wait_ready()
                restarts.append(time.perf_counter() - started)
                stops.append(stopped - started)
                interp.append(timed([sys.executable, "-c", "pass"]))
                imports.append(timed([sys.executable, "-c", "import aetherd.app"]))
        finally:
            daemon.stop(30)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms"

    print(f"rounds: {args.rounds} (medians)")
    print(f"SIGTERM -> /readyz 200 again   {ms(restarts)}")
    print(f"  of which SIGTERM -> exit     {ms(stops)}")
    print(f"reference: python -c pass      {ms(interp)}")
    print(f"reference: import aetherd.app  {ms(imports)}")


if __name__ == "__main__":
    main()
