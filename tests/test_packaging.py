"""The image's install steps (packaging/install.sh) in a fresh venv, then `aetherd init`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO

WAIT = 30.0


@pytest.mark.slow
def test_install_script_into_a_fresh_venv_then_run_the_entrypoint(tmp_path: Path):
    prefix = tmp_path / "opt-aetherd"
    result = subprocess.run(
        ["sh", str(REPO / "packaging" / "install.sh"), str(prefix), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("aetherd ")
    assert (prefix / "lib/systemd/system/aetherd.service").exists()
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AETHERD_ROOT": str(workspace),
        "AETHERD_PORT": "0",
        "AETHERD_LOG_FORMAT": "json",
    }
    # The image's ENTRYPOINT, with the venv's own interpreter and nothing from this checkout.
    proc = subprocess.Popen(
        [str(prefix / "bin" / "aetherd"), "init"],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + WAIT
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "daemon exited before listening"
            entry = json.loads(line)
            if entry["msg"].startswith("listening on"):
                port = entry["port"]
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=WAIT) as resp:
            assert resp.status == 200
        token = (tmp_path / ".local/share/aetherd/token").read_text().strip()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/workspaces/local/info?token={token}", timeout=WAIT
        ) as resp:
            info = json.load(resp)
        assert info["workspaceId"] == "local"
        import aetherd

        assert info["version"] == aetherd.__version__
        # The install built (or kept) the web console, and the installed package serves it.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=WAIT) as resp:
            assert resp.url.endswith("/workspaces/local/")
            assert "Content-Security-Policy" in resp.headers
            assert b'src="assets/app.js"' in resp.read()
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/workspaces/local/assets/app.js", timeout=WAIT
        ) as resp:
            assert len(resp.read()) > 100_000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
