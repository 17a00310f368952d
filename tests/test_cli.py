"""The installed command: `aetherd serve` as a real process, its errors, and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support import (
    aetherd_command,
    child_env,
    connect,
    read_port,
    run_cli,
    wait_ready,
)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve", "--root", "/no/such/dir"], "does not exist"),
        (["serve", "--port", "-1"], "invalid setting port"),
        (["serve", "--token-file", "/no/such/token"], "cannot read"),
        (["serve", "--preview-url-template", "http://{bad}"], "unknown placeholder"),
    ],
)
def test_bad_settings_exit_nonzero_with_one_line(tmp_path: Path, args, fragment):
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("aetherd: error:")


def test_port_in_use(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # A failed start leaves no token behind: the first start that works generates it
    # and shows the connect URL.
    assert not (tmp_path / "d" / "token").exists()
    _, stdout = _serve_until(tmp_path, "listening on", "--data-dir", str(tmp_path / "d"))
    token = (tmp_path / "d" / "token").read_text().strip()
    assert stdout.startswith("aetherd: connect with ws://127.0.0.1:") and token in stdout


def test_missing_terminal_shell_exits_2_with_one_line(tmp_path: Path):
    result = run_cli(
        tmp_path, "serve", "--port", "0", "--terminal-shell", "nosuchshell", "--data-dir", "d"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["aetherd: error: terminal shell 'nosuchshell' not found on PATH"]
    assert not (tmp_path / "d" / "token").exists()


def _serve_until(tmp_path: Path, marker: str, *args: str) -> tuple[list[str], str]:
    """Start `aetherd serve --port 0 ARGS`, read the log until `marker`, stop it."""
    proc = subprocess.Popen(
        [*aetherd_command(), "serve", "--port", "0", "--log-format", "json", *args],
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if marker in line:
                break
        proc.send_signal(signal.SIGTERM)
        stdout, rest = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    return lines + rest.splitlines(keepends=True), stdout


def test_jwt_only_does_not_point_at_a_token_file(tmp_path: Path):
    lines, _ = _serve_until(
        tmp_path,
        "authenticate with JWTs",
        "--jwt-secret",
        "a-long-enough-shared-secret-for-hs256",
        "--data-dir",
        str(tmp_path / "d"),
    )
    log = "".join(lines)
    assert "no static token: clients authenticate with JWTs" in log
    assert "token is in" not in log
    assert not (tmp_path / "d" / "token").exists()


def test_unreadable_token_file(tmp_path: Path):
    if os.geteuid() == 0:
        token_dir = tmp_path / "tok"
        token_dir.mkdir()
        result = run_cli(tmp_path, "serve", "--token-file", str(token_dir))  # a directory
    else:
        token_file = tmp_path / "tok"
        token_file.write_text("x")
        token_file.chmod(0)
        result = run_cli(tmp_path, "serve", "--token-file", str(token_file))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_version_and_help(tmp_path: Path):
    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.startswith("aetherd ")
    result = run_cli(tmp_path, "serve", "--help")
    for flag in (
        "--host",
        "--port",
        "--workspace-id",
        "--root",
        "--data-dir",
        "--token",
        "--token-file",
        "--preview-url-template",
        "--ping-interval",
        "--pong-timeout",
        "--write-timeout",
        "--port-scan-interval",
        "--log-format",
    ):
        assert flag in result.stdout


@pytest.mark.slow
async def test_serve_with_embedded_defaults_then_sigterm(tmp_path: Path):
    """`aetherd serve` from a bare directory: generated token, readyz, connect, SIGTERM → exit 0."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    proc = subprocess.Popen(
        [*aetherd_command(), "serve", "--port", "0"],
        cwd=workdir,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port, log_lines = await asyncio.to_thread(read_port, proc)
        connect_line = await asyncio.to_thread(proc.stdout.readline)
        assert connect_line.startswith("aetherd: connect with ws://127.0.0.1:")
        token_path = tmp_path / "xdg" / "aetherd" / "token"
        token = token_path.read_text().strip()
        assert f"/workspaces/local/ws?token={token}" in connect_line
        # The web console's URL beside it: the token in the fragment, never sent to a server.
        console_line = await asyncio.to_thread(proc.stdout.readline)
        assert console_line.strip() == (
            f"aetherd: console at http://127.0.0.1:{port}/workspaces/local/#token={token}"
        )
        await wait_ready(port, proc)
        client = await connect(f"http://127.0.0.1:{port}/workspaces/local/ws", token)
        try:
            reply = await client.request("activity", "user_activity")
            assert reply["success"] is True
            proc.send_signal(signal.SIGTERM)
            msg = await client.ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        finally:
            await client.close()
        code = await asyncio.to_thread(proc.wait, 10)  # the contract: down within 10 s
        assert code == 0
        rest = proc.stderr.read()
        everything = "".join(log_lines) + rest
        assert token not in everything  # the token went to stdout once, never to the log
        assert '"msg": "stopped"' in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
