"""The token never reaches the log: not as given, not percent-encoded in a raw request line."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from aetherd.logs import SecretRedactor
from tests.support import aetherd_command, child_env, free_port, healthz

# Characters that a URL must encode, so the encoded form differs from the literal one.
SECRET = "tok/en+with=odd chars-0123456789"


def test_redactor_scrubs_encoded_forms_in_either_case():
    redactor = SecretRedactor()
    redactor.add(SECRET)
    upper = quote(SECRET, safe="")
    lower = upper.replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d")
    plus = SECRET.replace(" ", "+")
    mixed = quote(SECRET, safe="/")  # `/` left as is, the rest encoded
    for form in (SECRET, upper, lower, plus, mixed):
        assert redactor._scrub(f"GET /ws?token={form}&x=1") == "GET /ws?token=***&x=1", form


def _send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(200)


@pytest.mark.slow
def test_malformed_requests_with_the_encoded_token_leave_no_trace(tmp_path: Path):
    port = free_port()
    root = tmp_path / "ws"
    root.mkdir()
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                *aetherd_command(),
                "serve",
                "--port",
                str(port),
                "--root",
                str(root),
                "--data-dir",
                str(tmp_path / "data"),
                "--token",
                SECRET,
                "--watcher-enabled",
                "false",
                "--log-format",
                "json",
                "--log-level",
                "debug",
            ],
            env=child_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    upper = quote(SECRET, safe="")
    lower = upper.replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d")
    try:
        assert healthz(port, 20, proc) == 200
        requests = [
            # LineTooLong: aiohttp quotes the start of the line.
            f"GET /workspaces/local/ws?token={upper}&pad={'a' * 9000} HTTP/1.1\r\n\r\n",
            # BadStatusLine: aiohttp quotes the whole line.
            f"GET /workspaces/local/ws?token={lower} HTTP/1.1 junk\r\nHost: x\r\n\r\n",
            f"GET /workspaces/local/ws?token={upper} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        ]
        for request in requests:
            assert _send_raw(port, request.encode()).startswith(b"HTTP/1.0 400")
        # An ordinary request after them, so the log is known to be written up to here.
        assert healthz(port, 20, proc) == 200
    finally:
        proc.terminate()
        proc.wait(15)
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r["msg"].startswith("bad request from") for r in records)
    for form in (SECRET, upper, lower, quote(SECRET, safe="/")):
        assert form not in text, form
    assert "with=odd" not in text and "with%3Dodd" not in text.replace("%3d", "%3D")
    # A client's malformed request is not the daemon's error: no ERROR, no traceback.
    assert not any(r["level"] == "error" or "exc" in r for r in records)
