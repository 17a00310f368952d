"""The ports channel end to end: a real daemon on loopback, real listeners, a real client."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.services.test_ports import Child, spawn, start_http_server, start_listener
from tests.support import WsClient, wait_for


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Listener processes started by a test; all are killed at teardown."""
    started: list[Child] = []
    yield started
    for child in started:
        await child.stop()


def is_open(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("channel") == "ports" and f.get("type") == "open" and f["port"] == port


def is_close(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("channel") == "ports" and f.get("type") == "close" and f["port"] == port


async def test_open_and_close_events_with_every_field(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    running = await start_daemon(
        port_scan_interval=0.05,
        workspace_id="wsabcdef99",
        preview_url_template="https://{port}-{workspacePrefix}.preview.example.dev",
    )
    client: WsClient = await running.connect()
    server = await start_http_server("127.0.0.1")
    children.append(server)
    frame = await client.expect(is_open(server.port))
    assert frame["pid"] == server.pid
    assert frame["process"].startswith("python")
    assert "http.server" in frame["command"]
    assert frame["address"] == "127.0.0.1"
    assert frame["addresses"] == ["127.0.0.1"]
    assert frame["localOnly"] is True
    assert frame["url"] == f"https://{server.port}-wsabcdef.preview.example.dev"
    assert frame["label"] is None
    assert "requestId" not in frame
    await server.stop()
    assert await client.expect(is_close(server.port)) == {
        "channel": "ports",
        "type": "close",
        "port": server.port,
    }


@pytest.mark.parametrize(
    ("host", "family", "flags", "local_only"),
    [
        ("127.0.0.1", "4", "", True),
        ("0.0.0.0", "4", "", False),
        ("::1", "6", "v6only", True),
    ],
)
async def test_listeners_on_each_address(
    start_daemon: Callable[..., Any],
    children: list[Child],
    host: str,
    family: str,
    flags: str,
    local_only: bool,
) -> None:
    running = await start_daemon(port_scan_interval=0.05)
    client: WsClient = await running.connect()
    child = await start_listener(host, family=family, flags=flags)
    children.append(child)
    frame = await client.expect(is_open(child.port))
    assert (frame["address"], frame["localOnly"], frame["pid"]) == (host, local_only, child.pid)
    reply = await client.request("ports", "list")
    assert reply["success"] is True
    listed = [item for item in reply["data"] if item["port"] == child.port]
    assert listed == [{k: v for k, v in frame.items() if k not in ("channel", "type")}]
    await child.stop()
    await client.expect(is_close(child.port))
    reply = await client.request("ports", "list")
    assert child.port not in {item["port"] for item in reply["data"]}


async def test_announce_on_connect_and_reconnect(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    running = await start_daemon(port_scan_interval=0.05)
    scanner = running.daemon.services.ports
    child = await start_listener("127.0.0.1")
    children.append(child)
    # Nobody connected: no scanning at all.
    assert not scanner.active and scanner.scans == 0
    first: WsClient = await running.connect()
    frame = await first.expect(is_open(child.port))
    assert frame["pid"] == child.pid
    assert scanner.active
    await first.close()
    await wait_for(lambda: not scanner.active)
    second: WsClient = await running.connect()
    again = await second.expect(is_open(child.port))
    assert again == frame


async def test_daemon_port_and_documented_ports_are_never_reported(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    running = await start_daemon(port_scan_interval=0.05)
    client: WsClient = await running.connect()
    marker = await start_listener("127.0.0.1")
    children.append(marker)
    await client.expect(is_open(marker.port))
    reply = await client.request("ports", "list")
    ports = {item["port"] for item in reply["data"]}
    assert marker.port in ports
    assert running.server.port not in ports
    assert not ports & {22, 2222, 3001}
    assert not [f for f in client.backlog if f.get("port") == running.server.port]
    reply = await client.request("ports", "kill", port=running.server.port)
    assert (reply["success"], reply["code"]) == (False, "PERMISSION_DENIED")


async def test_ignore_setting_and_config_seam(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    ignored = await start_listener("127.0.0.1")
    children.append(ignored)
    running = await start_daemon(port_scan_interval=0.05, port_ignore=str(ignored.port))
    labelled = await start_listener("::1", family="6", flags="v6only")
    children.append(labelled)
    client: WsClient = await running.connect()
    # The scan that found `labelled` ran after `ignored` was listening.
    await client.expect(is_open(labelled.port))
    reply = await client.request("ports", "list")
    assert ignored.port not in {item["port"] for item in reply["data"]}
    assert not [f for f in client.backlog if f.get("port") == ignored.port]

    scanner = running.daemon.services.ports
    scanner.set_port_config({labelled.port: {"label": "API", "ignore": False}})
    frame = await client.expect(is_open(labelled.port))
    assert frame["label"] == "API"
    reply = await client.request("ports", "list")
    assert [i["label"] for i in reply["data"] if i["port"] == labelled.port] == ["API"]
    scanner.set_port_config({labelled.port: {"label": "API", "ignore": True}})
    await client.expect(is_close(labelled.port))
    reply = await client.request("ports", "kill", port=labelled.port)
    assert (reply["success"], reply["code"]) == (False, "NOT_FOUND")
    # A new connection is not told about the ignored port either.
    other: WsClient = await running.connect()
    reply = await other.request("ports", "list")
    assert labelled.port not in {item["port"] for item in reply["data"]}
    assert not [f for f in other.backlog if f.get("port") == labelled.port]


@pytest.mark.slow
async def test_kill_ends_the_process_and_close_follows(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    running = await start_daemon(port_scan_interval=0.05, port_kill_grace=0.5)
    client: WsClient = await running.connect()
    polite = await start_http_server("127.0.0.1")
    children.append(polite)
    stubborn = await start_listener("0.0.0.0", flags="ignore-term")
    children.append(stubborn)
    await client.expect(is_open(polite.port))
    await client.expect(is_open(stubborn.port))

    reply = await client.request("ports", "kill", port=polite.port)
    assert reply["success"] is True
    assert reply["data"] == {"port": polite.port, "pids": [polite.pid]}
    assert await asyncio.wait_for(polite.proc.wait(), 10) == -signal.SIGTERM
    await client.expect(is_close(polite.port))

    reply = await client.request("ports", "kill", port=stubborn.port)
    assert reply["data"] == {"port": stubborn.port, "pids": [stubborn.pid]}
    assert await asyncio.wait_for(stubborn.proc.wait(), 10) == -signal.SIGKILL
    await client.expect(is_close(stubborn.port))


async def test_kill_errors_keep_the_socket_open(start_daemon: Callable[..., Any]) -> None:
    running = await start_daemon(port_scan_interval=0.05)
    client: WsClient = await running.connect()
    reply = await client.request("ports", "kill", port=1)
    assert (reply["success"], reply["code"]) == (False, "NOT_FOUND")
    assert "1" in reply["error"]
    for bad in (0, 70000, "http", "8080", True, 8080.0, None, [8080]):
        reply = await client.request("ports", "kill", port=bad)
        assert (reply["success"], reply["code"]) == (False, "INVALID_MESSAGE")
    reply = await client.request("ports", "kill")
    assert reply["code"] == "INVALID_MESSAGE"
    reply = await client.request("ports", "list")
    assert reply["success"] is True and isinstance(reply["data"], list)


NAMED_LISTENER = r"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"bad\xff\xfename", 0, 0, 0)  # PR_SET_NAME: not UTF-8
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
sys.stdin.buffer.read()
"""


async def test_a_process_whose_name_is_not_utf8(
    start_daemon: Callable[..., Any], children: list[Child]
) -> None:
    """Before: /proc/<pid>/comm and stat were read strictly, so one such process on the
    machine made ports/list and ports/kill answer INTERNAL_ERROR."""
    proc = await spawn(sys.executable, "-c", NAMED_LISTENER)
    assert proc.stdout is not None
    child = Child(proc, int(await asyncio.wait_for(proc.stdout.readline(), 10)))
    children.append(child)
    running = await start_daemon(port_scan_interval=0.05)
    client: WsClient = await running.connect()
    frame = await client.expect(is_open(child.port))
    assert frame["pid"] == child.pid and frame["process"] == "bad\ufffd\ufffdname"
    reply = await client.request("ports", "list")
    assert reply["success"] is True
    assert child.port in [item["port"] for item in reply["data"]]
    reply = await client.request("ports", "kill", port=child.port)
    assert reply["success"] is True and reply["data"] == {"port": child.port, "pids": [child.pid]}
    await client.expect(is_close(child.port))
