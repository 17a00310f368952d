"""The client's command line, run as real processes: `aetherd attach` in tmux (typed into
and read off the screen), `aetherd cp`, `ls`, `logs`, `ports`, against a real daemon."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from aetherd.client import Client
from aetherd.client.cli import EscapeParser, ProgressBar
from tests.client.relay import Relay
from tests.client.tmux import Tmux
from tests.conftest import TOKEN
from tests.fake_providers import FakeProvider, ToolUse, Turn
from tests.support import aetherd_command, child_env, wait_for

PROMPT = re.compile(r"[#$] $")


@pytest.fixture
async def tmux():
    terminal = Tmux()
    yield terminal
    await terminal.close()


class Setup:
    """A daemon, a relay in front of it, and the environment a CLI process needs."""

    def __init__(self, running: Any, relay: Relay, tmp_path: Path) -> None:
        self.running = running
        self.relay = relay
        self.url = f"ws://127.0.0.1:{relay.port}/workspaces/ws-test/ws"
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        self.env = child_env(
            tmp_path, AETHERD_URL=self.url, AETHERD_TOKEN=TOKEN, HOME=str(home), TERM="xterm"
        )
        self.env = {k: v for k, v in self.env.items() if k in KEEP_ENV}

    def client(self) -> Client:
        return Client(self.url, TOKEN)

    async def cli(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *aetherd_command(),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


KEEP_ENV = {
    "PATH",
    "PYTHONPATH",
    "XDG_DATA_HOME",
    "HOME",
    "TERM",
    "LANG",
    "LC_ALL",
    "AETHERD_URL",
    "AETHERD_TOKEN",
    "VIRTUAL_ENV",
}


@pytest.fixture
async def setup(start_daemon, tmp_path):
    running = await start_daemon()
    relay = await Relay(running.server.port).start()
    yield Setup(running, relay, tmp_path)
    await relay.close()


async def shell_session(setup: Setup, session_id: str) -> None:
    """Start a shell session and wait for its prompt (typeahead before it may be lost)."""
    async with setup.client() as client:
        term = await client.terminal.create(session_id, cols=100, rows=30)
        text = ""
        for _ in range(1000):
            text += (await term.output.get(20)).data
            if PROMPT.search(text):
                break
        await term.detach()


# -- attach in a real terminal ------------------------------------------------------------


async def test_attach_runs_vim_detaches_reattaches_and_exits_with_the_shell_code(
    setup, tmux, workspace
) -> None:
    await shell_session(setup, "s1")
    await tmux.start([*aetherd_command(), "attach", "s1"], setup.env)
    await tmux.keys("echo mark-$((6*7))", "Enter")
    await tmux.wait("mark-42")
    await tmux.keys("vim -u NONE notes.txt", "Enter")
    await tmux.wait(lambda s: s.count("~") > 5)
    await tmux.keys("ihello from vim", "Escape")
    await tmux.wait("hello from vim")
    # ssh's escape: Enter, then ~ and . at the start of a line.
    await tmux.keys("Enter")
    await tmux.keys("~.", literal=True)
    await tmux.wait("[detached from s1]")
    assert await tmux.exit_code() == 0
    async with setup.client() as client:
        (session,) = [s for s in await client.terminal.list() if s.session_id == "s1"]
        assert not session.exited  # vim is still running in it
    # Reattach: the replayed screen shows vim with the text; save and quit.
    await tmux.start([*aetherd_command(), "attach", "s1"], setup.env)
    await tmux.wait("hello from vim")
    await tmux.keys("Escape")
    await tmux.keys(":wq", "Enter")
    await wait_for(lambda: (workspace / "notes.txt").exists(), timeout=10)
    # the line was split at the cursor by the Enter before the escape; both halves saved
    assert "from vim" in (workspace / "notes.txt").read_text()
    await tmux.keys("exit 5", "Enter")
    assert await tmux.exit_code() == 5


async def test_attach_survives_a_network_cut_with_nothing_lost(setup, tmux) -> None:
    await shell_session(setup, "s2")
    await tmux.start([*aetherd_command(), "attach", "s2"], setup.env)
    await tmux.keys("clear", "Enter")
    n = 150
    await tmux.keys(
        f"for i in $(seq 1 {n}); do echo line-$i; sleep 0.02; done; echo fin-$((2+3))", "Enter"
    )
    await tmux.wait("line-40", whole=True)
    setup.relay.blocked = True
    setup.relay.cut()
    await tmux.wait("aetherd: reconnecting")
    refused = setup.relay.accepted
    await wait_for(lambda: setup.relay.accepted > refused + 1, timeout=20)  # it keeps trying
    setup.relay.blocked = False
    await tmux.wait("fin-5", whole=True, timeout=30)
    lines = [x for x in (await tmux.history()).splitlines() if re.fullmatch(r"line-\d+", x)]
    history = await tmux.history()
    assert lines == [f"line-{i}" for i in range(1, n + 1)], history
    assert "reconnecting" not in await tmux.screen()  # the status line was cleared
    await tmux.keys("exit 3", "Enter")
    assert await tmux.exit_code() == 3


async def test_attach_without_a_session_offers_the_live_ones(setup, tmux) -> None:
    await shell_session(setup, "s3")
    await tmux.start([*aetherd_command(), "attach"], setup.env)
    await tmux.wait("1) s3")
    await tmux.keys("1", "Enter")
    await tmux.keys("echo in-$((3*3))", "Enter")
    await tmux.wait("in-9")
    await tmux.keys("Enter")
    await tmux.keys("~.", literal=True)
    assert await tmux.exit_code() == 0


async def test_attach_creates_a_session_when_there_is_none(setup, tmux) -> None:
    await tmux.start([*aetherd_command(), "attach", "--command", "echo made; exit 4"], setup.env)
    assert await tmux.exit_code() == 4
    assert "made" in await tmux.screen()


def test_the_escape_sequence_is_sshs() -> None:
    parser = EscapeParser()
    assert parser.feed(b"ls\r") == (b"ls\r", False)
    assert parser.feed(b"~~x\r") == (b"~x\r", False)  # ~~ sends one ~
    assert parser.feed(b"~") == (b"", False)  # held
    assert parser.feed(b"a") == (b"~a", False)  # not an escape: both sent
    assert parser.feed(b"b~.") == (b"b~.", False)  # not at the start of a line
    assert parser.feed(b"\r~.") == (b"\r", True)
    fresh = EscapeParser()
    assert fresh.feed(b"~.") == (b"", True)  # the very start counts as a line start


def test_the_progress_bar_shows_percent_size_and_rate() -> None:
    bar = ProgressBar("big.bin", enabled=True)
    line = bar.line(50 * 1024 * 1024, 100 * 1024 * 1024, 2.0)
    assert "50%" in line and "50.0 MiB / 100.0 MiB" in line and "25.0 MiB/s" in line
    assert "[##########..........]" in line
    assert bar.line(10, None, 1.0).startswith("big.bin  10 B")


# -- cp, ls, logs, ports ------------------------------------------------------------------


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def test_cp_copies_100_mib_both_ways_byte_identical(setup, tmp_path, workspace) -> None:
    local = tmp_path / "big.bin"
    with local.open("wb") as handle:
        for _ in range(100):
            handle.write(os.urandom(1 << 20))
    code, _, err = await setup.cli("cp", str(local), ":/data/")
    assert (code, err) == (0, "")  # not a terminal: no progress bar
    assert digest(workspace / "data" / "big.bin") == digest(local)
    back = tmp_path / "back.bin"
    code, _, err = await setup.cli("cp", ":/data/big.bin", str(back))
    assert (code, err) == (0, "")
    assert digest(back) == digest(local)


async def test_cp_recursive_both_ways_and_errors(setup, tmp_path, workspace) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "a" / "b" / "deep.bin").write_bytes(bytes(range(256)) * 10)
    (tree / "top.txt").write_text("héllo\n")
    code, _, err = await setup.cli("cp", str(tree), ":/")
    assert (
        code == 1 and err.strip() == f"aetherd: error: IS_DIRECTORY: {tree} is a directory (use -r)"
    )
    code, _, err = await setup.cli("cp", "-r", str(tree), ":/")
    assert (code, err) == (0, "")
    assert (workspace / "tree" / "a" / "b" / "deep.bin").read_bytes() == bytes(range(256)) * 10
    assert (workspace / "tree" / "empty").is_dir()
    code, _, err = await setup.cli("cp", "-r", ":/tree", str(tmp_path / "copy"))
    assert (code, err) == (0, "")
    copied = sorted(
        p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*")
    )
    assert copied == ["a", "a/b", "a/b/deep.bin", "empty", "top.txt"]
    assert (tmp_path / "copy" / "top.txt").read_text() == "héllo\n"
    code, _, err = await setup.cli("cp", ":/missing", str(tmp_path / "x"))
    assert code == 1 and err.startswith("aetherd: error: NOT_FOUND") and "Traceback" not in err
    code, _, err = await setup.cli("cp", "a", "b")
    assert code == 1 and "exactly one of SOURCE and DEST" in err


async def test_ls_logs_and_ports(setup) -> None:
    async with setup.client() as client:
        term = await client.terminal.create("logged", command="echo one; echo two; cat")
        await term.read_until("two")
        await term.detach()
    code, out, _ = await setup.cli("ls")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["SESSION", "PID", "SIZE"]
    assert any(row.split()[0] == "logged" and "running" in row for row in rows)
    code, out, _ = await setup.cli("ls", "--json")
    assert [s["sessionId"] for s in json.loads(out)] == ["logged"]
    code, out, _ = await setup.cli("logs", "logged")
    assert code == 0 and "one\r\ntwo\r\n" in out
    code, _, err = await setup.cli("logs", "nope")
    assert code == 1 and err == "aetherd: error: SESSION_NOT_FOUND: no session 'nope'\n"
    code, out, _ = await setup.cli("ports", "--json")
    assert code == 0 and isinstance(json.loads(out), list)
    code, out, _ = await setup.cli("ports")
    assert code == 0 and out.split()[:3] == ["PORT", "ADDRESS", "PID"]


async def test_a_daemon_that_is_not_there_is_one_line(setup, tmp_path) -> None:
    setup.env["AETHERD_URL"] = "ws://127.0.0.1:9/workspaces/x/ws"
    code, out, err = await setup.cli("ls")
    assert code == 1 and out == ""
    assert err.startswith("aetherd: error: cannot reach the daemon at ws://127.0.0.1:9/")
    assert len(err.splitlines()) == 1
    setup.env["AETHERD_URL"] = setup.url
    setup.env["AETHERD_TOKEN"] = "wrong"
    code, _, err = await setup.cli("ls")
    assert code == 1 and err == "aetherd: error: UNAUTHORIZED: the daemon refused the token\n"


# -- agent --------------------------------------------------------------------------------


@pytest.fixture
async def agent_setup(start_daemon, tmp_path, monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    provider = await FakeProvider("anthropic").start()
    running = await start_daemon(
        anthropic_api_key="sk-ant-test", anthropic_base_url=provider.base_url
    )
    relay = await Relay(running.server.port).start()
    yield Setup(running, relay, tmp_path), provider
    await relay.close()
    await provider.close()


def write_turns(provider: FakeProvider) -> None:
    write = ToolUse("write_file", json.dumps({"path": "/hello.txt", "content": "hi\n"}))
    provider.add(
        Turn(text=["I'll ", "write it."], tools=[write]),
        Turn(text=["Done."]),
    )


async def test_agent_streams_events_as_json_lines(agent_setup, workspace) -> None:
    setup, provider = agent_setup
    write_turns(provider)
    code, out, err = await setup.cli("agent", "--json", "--task-id", "t1", "write hello")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["taskId"] for e in events} == {"t1"}
    kinds = [e["type"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "done" and "tool_result" in kinds
    assert "".join(e["content"] for e in events if e["type"] == "text") == "I'll write it.Done."
    assert (workspace / "hello.txt").read_text() == "hi\n"


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_agent_asks_for_approval_in_ask_mode(agent_setup, workspace, answer) -> None:
    setup, provider = agent_setup
    write_turns(provider)
    async with setup.client() as client:
        await client.agent.settings(permission_mode="ask")
    code, out, err = await setup.cli("agent", "write hello", stdin=f"{answer}\n".encode())
    assert code == 0, err
    assert "Allow write_file" in err  # the question
    assert "▸ write_file" in out and "I'll write it." in out and "Done." in out
    assert (workspace / "hello.txt").exists() == (answer == "y")
    assert ("✓" in out) == (answer == "y") and ("✗" in out) == (answer == "n")


async def test_agent_without_a_provider_key_is_one_line(setup, monkeypatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    code, out, err = await setup.cli("agent", "hello")
    assert code == 1 and out == ""
    assert err.startswith("aetherd: error: PROVIDER_NOT_CONFIGURED: ") and err.count("\n") == 1


# -- exec ---------------------------------------------------------------------------------


async def test_exec_exit_codes_streams_stdin_and_options(setup, workspace) -> None:
    assert (await setup.cli("exec", "--", "sh", "-c", "exit 7"))[0] == 7
    code, out, err = await setup.cli("exec", "--", "sh", "-c", "echo out; echo err >&2")
    assert (code, out, err) == (0, "out\n", "err\n")
    code, out, _ = await setup.cli("exec", "--", "cat", stdin=b"hi\nthere\n")
    assert (code, out) == (0, "hi\nthere\n")  # cat saw the end of its input
    code, out, _ = await setup.cli("exec", "--", "wc", "-c", stdin=b"")
    assert (code, out.strip()) == (0, "0")
    assert (await setup.cli("exec", "--", "sh", "-c", "kill -TERM $$"))[0] == 128 + 15
    (workspace / "sub").mkdir()
    code, out, _ = await setup.cli(
        "exec", "--cwd", "/sub", "--env", "A=b c", "--", "sh", "-c", 'pwd; echo "$A"'
    )
    assert code == 0 and out.splitlines() == [str(workspace / "sub"), "b c"]
    code, _, err = await setup.cli("exec", "--", "/no/such/program")
    assert code == 1 and err.startswith("aetherd: error: NOT_FOUND")
    code, _, err = await setup.cli("exec")
    assert code == 1 and "no command" in err


async def test_exec_output_is_byte_exact(setup) -> None:
    proc = await asyncio.create_subprocess_exec(
        *aetherd_command(),
        "exec",
        "--",
        "printf",
        "\\377\\000\\376",
        stdout=asyncio.subprocess.PIPE,
        env=setup.env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out) == (0, b"\xff\x00\xfe")


async def test_exec_forwards_ctrl_c_as_sigint(setup) -> None:
    proc = await asyncio.create_subprocess_exec(
        *aetherd_command(),
        "exec",
        "--",
        "sleep",
        "30",
        stdin=asyncio.subprocess.DEVNULL,
        env=setup.env,
    )
    try:
        async with setup.client() as client:

            async def started() -> bool:
                return any(
                    p.argv == ["sleep", "30"] and not p.exited for p in await client.process.list()
                )

            for _ in range(200):
                if await started():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the process never started")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 128 + signal.SIGINT
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
