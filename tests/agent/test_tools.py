"""The agent's tools on a real workspace: the jail, exact edits, ignores, caps, bash."""

from __future__ import annotations

import asyncio
import os

import pytest

from aetherd.agent.tools import ToolError, ToolLimits, Tools, glob_regex
from aetherd.services.jail import Jail


@pytest.fixture
def tools(workspace):
    return Tools(Jail(workspace), ToolLimits(timeout=5, output_max=1000, max_results=5))


async def test_read_write_edit(tools, workspace):
    assert "wrote 6 bytes" in await tools.run(
        "write_file", {"path": "/d/e/f.txt", "content": "a\nb\nc\n"}
    )
    assert (workspace / "d/e/f.txt").read_text() == "a\nb\nc\n"
    assert await tools.run("read_file", {"path": "d/e/f.txt", "offset": 2, "limit": 1}) == "b\n"
    await tools.run("edit_file", {"path": "/d/e/f.txt", "old_string": "b\n", "new_string": "B\n"})
    assert (workspace / "d/e/f.txt").read_text() == "a\nB\nc\n"
    with pytest.raises(ToolError, match="not found"):
        await tools.run("edit_file", {"path": "/d/e/f.txt", "old_string": "zzz", "new_string": "y"})
    (workspace / "dup.txt").write_text("x x")
    with pytest.raises(ToolError, match="occurs 2 times"):
        await tools.run("edit_file", {"path": "dup.txt", "old_string": "x", "new_string": "y"})
    assert (workspace / "dup.txt").read_text() == "x x"
    with pytest.raises(ToolError, match="does not exist"):
        await tools.run("read_file", {"path": "missing"})
    (workspace / "bin").write_bytes(b"\x00\x01")
    with pytest.raises(ToolError, match="binary"):
        await tools.run("read_file", {"path": "bin"})
    big = "y" * 5000
    (workspace / "big.txt").write_text(big)
    out = await tools.run("read_file", {"path": "big.txt"})
    assert len(out) <= 1000 and "characters omitted" in out


async def test_the_jail_holds(tools, workspace, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    os.symlink(outside, workspace / "link")
    for call in (
        ("read_file", {"path": "../outside.txt"}),
        ("read_file", {"path": "link"}),
        ("write_file", {"path": "/../../x", "content": "x"}),
        ("list_files", {"path": "/.."}),
    ):
        with pytest.raises(ToolError, match="invalid path"):
            await tools.run(*call)
    assert "secret" not in await tools.run("grep", {"pattern": "secret"})
    assert outside.read_text() == "secret"


async def test_list_glob_grep_honour_ignores_and_caps(tools, workspace):
    for name in (
        "node_modules/pkg/index.js",
        ".git/config",
        "src/a.py",
        "src/sub/b.py",
        "README.md",
    ):
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("needle\n")
    listing = await tools.run("list_files", {})
    assert listing.splitlines() == ["src/", "README.md"]
    found = await tools.run("glob", {"pattern": "**/*.py"})
    assert found.splitlines() == ["/src/a.py", "/src/sub/b.py"]
    assert await tools.run("glob", {"pattern": "*.md"}) == "/README.md"
    hits = await tools.run("grep", {"pattern": "need"})
    assert "node_modules" not in hits and ".git" not in hits
    assert "/src/a.py:1: needle" in hits
    assert (
        await tools.run("grep", {"pattern": "needle", "glob": "*.md"})
    ) == "/README.md:1: needle"
    for i in range(10):
        (workspace / f"many{i}.txt").write_text("needle\n")
    capped = await tools.run("grep", {"pattern": "needle"})
    assert capped.splitlines()[-1] == "… stopped after 5 matches"
    with pytest.raises(ToolError, match="invalid regular expression"):
        await tools.run("grep", {"pattern": "("})
    tools.ignore = (*tools.ignore, "*.txt")
    assert "many" not in await tools.run("glob", {"pattern": "*"})


def test_glob_regex():
    assert glob_regex("**/*.py").match("a/b/c.py")
    assert glob_regex("**/*.py").match("c.py")
    assert not glob_regex("*.py").match("a/c.py")
    assert glob_regex("src/[ab].?s").match("src/a.ts")


async def test_bash_env_exit_code_cap_and_timeout(tools, workspace, monkeypatch):
    monkeypatch.setenv("AETHERD_TOKEN", "do-not-leak")
    tools.env = {"GREETING": "hi there"}
    out, err = await tools.bash({"command": 'echo "$GREETING" "${AETHERD_TOKEN:-none}"; pwd'})
    assert not err and out.splitlines() == ["hi there none", str(workspace)]
    out, err = await tools.bash({"command": "echo oops >&2; exit 3"})
    assert err and "oops" in out and "[exit code 3]" in out
    out, err = await tools.bash({"command": "head -c 100000 /dev/zero | tr '\\0' x; echo END"})
    assert not err and len(out) <= 1000 and out.rstrip().endswith("END") and "omitted" in out
    out, err = await tools.bash({"command": "echo started; sleep 30", "timeout": 0.3})
    assert err and "started" in out and "timed out" in out


async def test_cancelling_bash_kills_its_process_group(tools, workspace):
    task = asyncio.ensure_future(
        tools.bash({"command": "sleep 60 & echo $! > child.txt; echo $$ > pid.txt; wait"})
    )
    for _ in range(500):
        if (workspace / "child.txt").exists() and (workspace / "pid.txt").exists():
            break
        await asyncio.sleep(0.01)
    child = int((workspace / "child.txt").read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"

    for _ in range(300):
        if not alive(child):
            break
        await asyncio.sleep(0.01)
    assert not alive(child)


async def test_only_file_tools_run_through_run(tools):
    for name in ("bash", "ask_user", "walk", "read_text", "nope"):
        with pytest.raises(ToolError, match="unknown tool"):
            await tools.run(name, {})
