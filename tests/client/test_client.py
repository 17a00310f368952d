"""aetherd.client against a real daemon on loopback: typed requests, errors with their
code, push streams, and streams that stay continuous across dropped connections."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from aetherd.client import AetherdError, Client, Target, resolve
from aetherd.protocol.agent import AgentDone, AgentStatus, AgentText
from aetherd.protocol.config import ConfigChanged
from aetherd.protocol.files import FileEntry, FilesChange
from aetherd.protocol.ports import PortsClose, PortsOpen
from tests.client.relay import Relay
from tests.conftest import TOKEN
from tests.fake_providers import FakeProvider, Turn
from tests.support import wait_for

COUNTER = "for i in $(seq 1 {n}); do echo line-$i; sleep {pause}; done; exit 7"


class Collected:
    """The text of a terminal's output stream, read up to markers."""

    def __init__(self, term: Any) -> None:
        self.term = term
        self.text = ""

    async def until(self, marker: str, timeout: float = 30) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while marker not in self.text:
            item = await self.term.output.get(max(0.0, deadline - loop.time()))
            assert not item.truncated
            self.text += item.data
        return self.text

    def lines(self) -> list[str]:
        return [line for line in self.text.split("\r\n") if line.startswith("line-")]


async def lines_until(term: Any, last: str, timeout: float = 30) -> list[str]:
    """Every output line of `term` up to and including `last` (bounded by `timeout`)."""
    collected = Collected(term)
    await collected.until(f"{last}\r\n", timeout)
    return collected.lines()


def assert_counter(lines: list[str], n: int) -> None:
    assert lines == [f"line-{i}" for i in range(1, n + 1)], (
        f"not continuous: {len(lines)} lines, "
        f"duplicates {sorted({x for x in lines if lines.count(x) > 1})[:5]}"
    )


# -- where the client connects ----------------------------------------------------------


def test_the_connect_url_keeps_its_token_out_of_the_socket_url() -> None:
    target = Target.parse("ws://127.0.0.1:3001/workspaces/ws-1/ws?token=a%2Fb")
    assert target.token == "a/b"
    assert target.ws_url == "ws://127.0.0.1:3001/workspaces/ws-1/ws"
    assert target.http_base == "http://127.0.0.1:3001/workspaces/ws-1"
    assert (
        Target.parse("https://gw.example/x", "t").ws_url == "wss://gw.example/x/workspaces/local/ws"
    )
    assert Target.parse("127.0.0.1:9", workspace="w").ws_url == "ws://127.0.0.1:9/workspaces/w/ws"
    with pytest.raises(AetherdError) as err:
        Target.parse("ftp://x")
    assert err.value.code == "INVALID_URL"


def test_resolve_reads_flags_then_environment_then_the_local_data_dir(tmp_path) -> None:
    data = tmp_path / "xdg" / "aetherd"
    data.mkdir(parents=True)
    (data / "token").write_text("from-file\n")
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "AETHERD_PORT": "4444"}
    local = resolve(environ=env)
    assert (local.ws_url, local.token) == ("ws://127.0.0.1:4444/workspaces/local/ws", "from-file")
    env["AETHERD_TOKEN"] = "from-env"
    env["AETHERD_URL"] = "ws://h:1/workspaces/w/ws"
    assert resolve(environ=env) == Target(
        "ws://h:1/workspaces/w/ws", "http://h:1/workspaces/w", "w", "from-env"
    )
    assert resolve("ws://h:2/workspaces/v/ws?token=url", environ=env).token == "url"
    assert resolve("ws://h:2", "flag", environ=env).token == "flag"


def test_importing_the_client_loads_no_daemon_code() -> None:
    code = (
        "import sys, json, aetherd.client, aetherd.client.cli;"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout)
    banned = (
        "ptyprocess",
        "watchdog",
        "psutil",
        "jwt",
        "aetherd.services",
        "aetherd.agent",
        "aetherd.transport",
        "aetherd.channels",
        "aetherd.daemon",
        "aetherd.app",
    )
    loaded = [m for m in modules if m.split(".")[0] in banned or m.startswith(banned)]
    assert loaded == []
    assert "aetherd.protocol.terminal" in modules


# -- connecting and authenticating -------------------------------------------------------


@pytest.mark.parametrize("auth", ["header", "subprotocol"])
async def test_connects_with_the_token_in_a_header_or_the_subprotocol(start_daemon, auth) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN, auth=auth) as client:
        assert client.state == "connected"
        assert isinstance(await client.terminal.list(), list)
        info = await client.info()
        assert info["workspaceId"] == "ws-test" and info["connections"] == 1


async def test_a_bad_token_or_workspace_fails_with_a_code(start_daemon) -> None:
    running = await start_daemon()
    with pytest.raises(AetherdError) as err:
        await Client(running.ws_url, "wrong").connect()
    assert err.value.code == "UNAUTHORIZED"
    with pytest.raises(AetherdError) as err:
        await Client(running.url("/workspaces/other/ws"), TOKEN).connect()
    assert err.value.code == "WORKSPACE_NOT_FOUND"
    closed = Client(running.ws_url, TOKEN)
    with pytest.raises(AetherdError) as err:
        await closed.terminal.list()
    assert err.value.code == "CLOSED"


# -- typed requests ----------------------------------------------------------------------


async def test_files_requests_are_typed_and_errors_carry_the_code(start_daemon, workspace) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        written = await client.files.write("/src/a.txt", "héllo\n")
        assert (written.path, written.size) == ("/src/a.txt", 7)
        await client.files.write("/src/a.txt", "more\n", append=True)
        assert (await client.files.read("/src/a.txt")).content == "héllo\nmore\n"
        await client.files.write("/bin.dat", bytes(range(256)))
        assert await client.files.read_bytes("/bin.dat") == bytes(range(256))
        await client.files.mkdir("/d/e")
        entries = await client.files.list("/")
        assert all(isinstance(e, FileEntry) for e in entries)
        assert [e.name for e in entries] == ["d", "src", "bin.dat"]
        stat = await client.files.stat("/src/a.txt")
        assert (stat.type, stat.size) == ("file", 12)
        renamed = await client.files.rename("/src/a.txt", "/src/b.txt")
        assert renamed.new_path == "/src/b.txt"
        assert (await client.files.delete("/src")).path == "/src"
        assert not (workspace / "src").exists()
        with pytest.raises(AetherdError) as err:
            await client.files.read("/../etc/passwd")
        assert err.value.code == "INVALID_PATH"
        with pytest.raises(AetherdError) as err:
            await client.files.read("/missing")
        assert err.value.code == "NOT_FOUND"
        # the socket stays usable after an error
        assert (await client.files.stat("/")).type == "directory"


async def test_terminal_ports_config_and_agent_requests(start_daemon, monkeypatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        with pytest.raises(AetherdError) as err:
            await client.terminal.attach("nope")
        assert err.value.code == "SESSION_NOT_FOUND"
        with pytest.raises(AetherdError) as err:
            await client.terminal.close("nope")
        assert err.value.code == "SESSION_NOT_FOUND"
        assert all(isinstance(entry.port, int) for entry in await client.ports.list())
        with pytest.raises(AetherdError) as err:
            await client.ports.kill(1)
        assert err.value.code in {"NOT_FOUND", "PERMISSION_DENIED"}
        snapshot = await client.config.get()
        assert snapshot.valid is True
        assert (await client.config.validate("terminals: 3\n")).valid is False
        with pytest.raises(AetherdError) as err:
            await client.config.set(raw="terminals: 3\n")
        assert err.value.code == "INVALID_CONFIG" and err.value.frame["errors"]
        updated = await client.config.set(raw="env:\n  A: b\n", version=snapshot.version)
        assert updated.config.env == {"A": "b"}
        with pytest.raises(AetherdError) as err:
            await client.config.set(raw="env: {}\n", version=snapshot.version)
        assert err.value.code == "CONFLICT"
        settings = await client.agent.settings(permission_mode="ask")
        assert settings.permission_mode == "ask"
        events = client.agent.events()
        with pytest.raises(AetherdError) as err:
            await client.agent.prompt("hi", task_id="t-nokey")
        assert err.value.code == "PROVIDER_NOT_CONFIGURED"
        kinds = []
        for _ in range(10):
            event = await events.get(10)
            kinds.append(event.type)
            if isinstance(event, AgentDone):
                assert event.code == "PROVIDER_NOT_CONFIGURED"
                break
        assert kinds == ["status", "status", "done"]
        with pytest.raises(AetherdError) as err:
            await client.agent.approve("no-such-request")
        assert err.value.code == "NOT_FOUND"
        page = await client.agent.history_page(limit=10)
        assert [e.type for e in page.events] == ["status", "status", "done"]
        with pytest.raises(AetherdError) as err:
            await client.request("terminal", "resize", {"sessionId": "x", "cols": 0, "rows": 1})
        assert err.value.code == "INVALID_MESSAGE"


async def test_a_request_without_a_reply_times_out_with_a_code(start_daemon) -> None:
    running = await start_daemon()
    relay = await Relay(running.server.port).start()
    url = f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws"
    try:
        async with Client(url, TOKEN, request_timeout=0.5, heartbeat=None) as client:
            relay.frozen = True  # the request leaves; no reply comes back
            with pytest.raises(AetherdError) as err:
                await client.terminal.list()
            assert err.value.code == "TIMEOUT"
            relay.frozen = False
            assert isinstance(await client.terminal.list(), list)  # late reply ignored
    finally:
        await relay.close()


LISTENER = (
    "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
    "print(s.getsockname()[1], flush=True); time.sleep(60)"
)


async def next_port_event(stream: Any, kind: type, port: int) -> Any:
    """The next event of `kind` for `port` (other processes open ports too)."""
    for _ in range(1000):
        event = await stream.get(10)
        if isinstance(event, kind) and event.port == port:
            return event
    raise AssertionError(f"no {kind.__name__} for {port}")


# -- push streams ------------------------------------------------------------------------


async def test_terminal_output_stream_and_exit(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        term = await client.terminal.create(command=COUNTER.format(n=20, pause=0))
        lines = await lines_until(term, "line-20")
        assert_counter(lines, 20)
        close = await term.wait(10)
        assert close is not None and close.exit_code == 7
        assert [item async for item in term] == []  # the iteration ended
        # attach replays the scrollback of a live session from an offset
        shell = await client.terminal.create("s1", command="echo ready; cat")
        await shell.read_until("ready")
        await shell.write("typed\n")
        await shell.read_until("typed")
        await shell.detach()
        again = await client.terminal.attach("s1", resume_from=0)
        assert "ready" in await again.read_until("typed")
        await again.resize(100, 30)
        result = await again.close()
        assert result.session_id == "s1"


async def test_file_and_config_and_port_streams(start_daemon, workspace) -> None:
    running = await start_daemon(port_scan_interval=0.1)
    async with Client(running.ws_url, TOKEN) as client:
        changes = client.files.changes()
        config = client.config.changes()
        ports = client.ports.watch()
        (workspace / "new.txt").write_text("x")
        event = await changes.get(10)
        assert isinstance(event, FilesChange) and event.path == "/new.txt"
        await client.config.set(raw="env:\n  X: y\n")
        changed = await config.get(10)
        assert isinstance(changed, ConfigChanged) and changed.config.env == {"X": "y"}
        # A listener in another process (the daemon does not report its own ports).
        listener = subprocess.Popen(
            [sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(listener.stdout.readline())
            await next_port_event(ports, PortsOpen, port)
            assert client.ports.known[port].pid == listener.pid
        finally:
            listener.kill()
            listener.wait()
        await next_port_event(ports, PortsClose, port)
        assert port not in client.ports.known


# -- reconnection ------------------------------------------------------------------------


async def test_terminal_stream_survives_cut_connections_without_gap_or_duplicate(
    start_daemon,
) -> None:
    running = await start_daemon()
    relay = await Relay(running.server.port).start()
    states: list[str] = []
    client = Client(f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws", TOKEN)
    client.on_state = states.append
    try:
        await client.connect()
        n = 400
        term = await client.terminal.create(command=COUNTER.format(n=n, pause=0.005))
        out = Collected(term)
        for cut in range(3):
            await out.until(f"line-{(cut + 1) * 60}\r\n")
            relay.blocked = True
            relay.cut()
            await wait_for(lambda: client.state == "reconnecting")
            refused = relay.accepted
            await wait_for(lambda r=refused: relay.accepted > r)  # a reconnect attempt failed
            relay.blocked = False
            await wait_for(lambda: client.state == "connected", timeout=15)
        await out.until(f"line-{n}\r\n")
        assert_counter(out.lines(), n)
        close = await term.wait(10)
        assert close is not None and close.exit_code == 7
        assert states.count("reconnecting") == 3 and states[-1] == "connected"
    finally:
        await client.close()
        await relay.close()


async def test_the_stream_survives_aborting_the_client_transport(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        n = 300
        term = await client.terminal.create(command=COUNTER.format(n=n, pause=0.002))
        out = Collected(term)
        for cut in range(1, 4):
            await out.until(f"line-{cut * 50}\r\n")
            generation = client.generation
            client.drop()  # transport.abort(): no close handshake
            await wait_for(lambda g=generation: client.generation > g and client.connected)
        await out.until(f"line-{n}\r\n")
        assert_counter(out.lines(), n)


async def test_a_slow_reader_loses_nothing_and_holds_a_bounded_queue(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN, stream_limit=4) as client:
        n = 3000
        term = await client.terminal.create(command=COUNTER.format(n=n, pause=0))
        text = ""
        for _ in range(100_000):
            assert len(term.output) <= 4
            item = await term.output.get(20)
            assert not item.truncated
            text += item.data
            if f"line-{n}\r\n" in text:
                break
            if len(text) % 7 == 0:
                await asyncio.sleep(0.001)  # read slower than the shell writes
        lines = [x for x in text.split("\r\n") if x.startswith("line-")]
        assert_counter(lines, n)


async def test_a_daemon_restart_between_two_calls(start_daemon, make_settings) -> None:
    first = await start_daemon()
    relay = await Relay(first.server.port).start()
    try:
        async with Client(f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws", TOKEN) as client:
            await client.files.write("/before.txt", "1")
            await first.server.close()  # the daemon goes away
            await wait_for(lambda: client.state == "reconnecting")
            second = await start_daemon()  # a new daemon, same workspace and data dir
            relay.target = second.server.port
            # the next call waits for the reconnection, then succeeds
            assert (await client.files.read("/before.txt")).content == "1"
            assert client.generation == 2
    finally:
        await relay.close()


@pytest.mark.parametrize("page", [10_000, 3])  # 3: the catch-up takes several pages
async def test_agent_events_continue_across_a_cut_without_gap_or_duplicate(
    start_daemon, monkeypatch, page
) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    provider = await FakeProvider("anthropic").start()
    gate = asyncio.Event()
    pieces = [f"piece-{i} " for i in range(12)]
    provider.add(Turn(text=pieces, pause_after=6, gate=gate))
    running = await start_daemon(
        anthropic_api_key="sk-ant-test",
        anthropic_base_url=provider.base_url,
        agent_history_events=page,
    )
    relay = await Relay(running.server.port).start()
    try:
        async with Client(f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws", TOKEN) as client:
            events = client.agent.events()
            await client.agent.prompt("go", task_id="t1")
            seen: list[Any] = []
            while sum(isinstance(e, AgentText) for e in seen) < 2:
                seen.append(await events.get(20))
            relay.blocked = True
            relay.cut()  # mid-answer; the rest is streamed while the client is away
            await wait_for(lambda: client.state == "reconnecting")
            gate.set()
            await wait_for(lambda: running.daemon.services.running_tasks() == 0, timeout=20)
            relay.blocked = False
            await wait_for(lambda: client.connected, timeout=15)
            while not isinstance(seen[-1], AgentDone):
                seen.append(await events.get(20))
            seqs = [e.seq for e in seen]
            assert seqs == sorted(set(seqs))  # no duplicate, in order
            assert "".join(e.content for e in seen if isinstance(e, AgentText)) == "".join(pieces)
            statuses = [e.status for e in seen if isinstance(e, AgentStatus)]
            assert statuses == ["queued", "running", "completed"]
    finally:
        await relay.close()
        await provider.close()


# -- processes ---------------------------------------------------------------------------


async def read_process(process: Any, timeout: float = 30) -> dict[str, str]:
    out = {"stdout": "", "stderr": ""}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            item = await process.output.get(max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return out
        assert not item.truncated
        out[item.stream] += item.data


async def test_process_streams_stdin_exit_and_signals(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        process = await client.process.start(
            argv=["sh", "-c", "cat; echo err-$((1+1)) >&2; exit 3"], stdin=True
        )
        assert process.pid is not None
        await process.write("héllo\n")
        await process.write("", eof=True)
        assert await read_process(process) == {"stdout": "héllo\n", "stderr": "err-2\n"}
        assert process.exit is not None and process.exit.exit_code == 3
        sleeper = await client.process.start("sleep 30")
        assert any(p.process_id == sleeper.process_id for p in await client.process.list())
        await sleeper.signal("SIGTERM")
        exit_ = await sleeper.wait(10)
        assert exit_ is not None and (exit_.exit_code, exit_.signal) == (None, 15)
        result = await client.process.run("echo hi; echo there >&2; exit 4")
        assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "there\n", 4)
        with pytest.raises(AetherdError) as err:
            await client.process.attach("nope")
        assert err.value.code == "NOT_FOUND"
        with pytest.raises(AetherdError) as err:
            await client.process.start(argv=["/no/such/program"])
        assert err.value.code == "NOT_FOUND"


async def test_process_bytes_are_exact_with_base64(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN) as client:
        process = await client.process.start(
            argv=["printf", "\\377\\000\\376 ok"], encoding="base64"
        )
        chunks = [chunk async for chunk in process.chunks()]
        assert b"".join(data for _, data in chunks) == b"\xff\x00\xfe ok"


PROCESS_COUNTER = (
    "for i in $(seq 1 {n}); do echo out-$i; echo err-$i >&2; sleep {pause}; done; exit 5"
)


async def test_process_streams_survive_cut_connections(start_daemon) -> None:
    running = await start_daemon()
    relay = await Relay(running.server.port).start()
    try:
        url = f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws"
        async with Client(url, TOKEN) as client:
            n = 200
            process = await client.process.start(PROCESS_COUNTER.format(n=n, pause=0.005))
            text = {"stdout": "", "stderr": ""}
            for cut in range(1, 3):
                while f"out-{cut * 60}\n" not in text["stdout"]:
                    item = await process.output.get(20)
                    text[item.stream] += item.data
                relay.blocked = True
                relay.cut()
                await wait_for(lambda: client.state == "reconnecting")
                relay.blocked = False
                await wait_for(lambda: client.connected, timeout=15)
            rest = await read_process(process)
            out = (text["stdout"] + rest["stdout"]).split()
            err = (text["stderr"] + rest["stderr"]).split()
            assert out == [f"out-{i}" for i in range(1, n + 1)]
            assert err == [f"err-{i}" for i in range(1, n + 1)]
            assert process.exit is not None and process.exit.exit_code == 5
    finally:
        await relay.close()


async def test_a_slow_process_reader_loses_nothing(start_daemon) -> None:
    running = await start_daemon()
    async with Client(running.ws_url, TOKEN, stream_limit=4) as client:
        n = 2000
        process = await client.process.start(PROCESS_COUNTER.format(n=n, pause=0))
        out = {"stdout": "", "stderr": ""}
        for count in range(100_000):
            assert len(process.output) <= 4
            try:
                item = await process.output.get(20)
            except StopAsyncIteration:
                break
            out[item.stream] += item.data
            if count % 5 == 0:
                await asyncio.sleep(0.001)
        assert out["stdout"].split() == [f"out-{i}" for i in range(1, n + 1)]
        assert out["stderr"].split() == [f"err-{i}" for i in range(1, n + 1)]
