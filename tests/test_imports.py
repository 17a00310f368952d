"""Every module of `aetherd` imports on its own, in a fresh interpreter (no import cycles).

The test suite imports `aetherd.app` early, which would hide a cycle that only bites
when a module is imported first. One child interpreter imports each module in turn,
clearing every `aetherd` module from `sys.modules` before each import.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import aetherd
from tests.support import child_env, free_port

CHILD = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "aetherd" or m.startswith("aetherd.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def all_modules() -> list[str]:
    """Every module and package under aetherd/, found on disk (not by importing)."""
    root = Path(aetherd.__file__).parent
    names = ["aetherd"]
    for info in pkgutil.walk_packages([str(root)], prefix="aetherd."):
        names.append(info.name)
    return sorted(names)


def test_module_list_is_complete() -> None:
    names = all_modules()
    assert "aetherd.agent.runner" in names
    assert "aetherd.transport.routes" in names
    assert len(names) > 30


def test_every_module_imports_on_its_own() -> None:
    names = all_modules()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,  # each module imported afresh: minutes on a loaded 2-core machine
        check=False,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{k}:\n{v}" for k, v in failures.items())


# -- what an idle daemon does not import ----------------------------------------------------

# Imported on first use only (docs/performance.md, "Start-up and idle footprint"): a
# daemon that has started, answered /readyz and seen no client must not have loaded any.
LAZY = (
    "jwt",  # PyJWT: only with jwt_secret / jwt_public_key_file, or a JWT-shaped token
    "cryptography",  # through PyJWT and the key-file parser
    "aetherd.client",  # the command-line client: not on the `serve` path
    "yaml",  # PyYAML: only with a settings file or a workspace config
    "aetherd.config_yaml",
    "prometheus_client",  # only at the first /metrics scrape
    "hypothesis",  # test-only
    "pytest",  # test-only
    "jsonschema",  # never at run time
    # Built on first use (aetherd/daemon.py, aetherd/channels/__init__.py): the agent
    # (at the first connection, or at boot with tasks to fail), git, search.
    "aetherd.agent",
    "aetherd.channels.agent",
    "aetherd.protocol.agent",
    "aetherd.services.transcript",
    "sqlite3",
    "_sqlite3",
    "aetherd.channels.git",
    "aetherd.protocol.git",
    "aetherd.services.git",
    "aetherd.services.search",
    "aetherd.services.gitignore",
    # The "idna" codec: the listening socket's ASCII host is resolved as bytes.
    "encodings.idna",
    "stringprep",
)

# `aetherd serve` as the console script runs it (aetherd.cli.main), plus one thread that
# polls /readyz over a raw socket (its host as bytes: a str would load the idna codec), prints the loaded modules once it answers 200, and
# stops the daemon with SIGTERM like a service manager would.
DAEMON = r"""
import json, os, signal, socket, sys, threading, time
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
        time.sleep(0.05)
    print("MODULES " + json.dumps(sorted(sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""


def idle_daemon_modules(tmp_path: Path) -> set[str]:
    """The modules of a real daemon once it is ready, with no client connected."""
    (tmp_path / "root").mkdir()
    port = free_port()
    argv = [
        "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--token", "imports-test-token",
        "--root", str(tmp_path / "root"),
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", DAEMON, str(port), *argv],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
        env=child_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return set(json.loads(lines[0].removeprefix("MODULES ")))


def test_an_idle_daemon_does_not_import_what_it_does_not_use(tmp_path: Path) -> None:
    modules = idle_daemon_modules(tmp_path)
    # The probe saw a serving daemon: the transport and the services are loaded.
    assert {"aiohttp.web", "aetherd.app", "aetherd.services.terminal"} <= modules
    loaded = sorted(
        name for name in modules if any(name == m or name.startswith(m + ".") for m in LAZY)
    )
    assert loaded == [], f"an idle daemon imported {loaded}"
