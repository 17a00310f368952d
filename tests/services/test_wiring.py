"""The workspace config applies live to the other services, end to end over a socket."""

from __future__ import annotations

import subprocess
import sys

from tests.support import free_port, wait_for

LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "time.sleep(60)\n"
)


async def _set_config(client, raw: str) -> None:
    reply = await client.request("config", "set", raw=raw)
    assert reply["success"] is True, reply


async def test_port_labels_and_ignores_apply_live(start_daemon):
    running = await start_daemon()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port)])
    try:
        client = await running.connect()
        first = await client.expect_type("ports", "open", port=port)
        assert first["label"] is None
        await _set_config(client, f"ports:\n  {port}:\n    label: web\n")
        labelled = await client.expect_type("ports", "open", port=port, label="web")
        assert labelled["pid"] == proc.pid
        await _set_config(client, f"ports:\n  {port}:\n    ignore: true\n")
        await client.expect_type("ports", "close", port=port)
        reply = await client.request("ports", "list")
        assert port not in [p["port"] for p in reply["data"]]
    finally:
        proc.kill()
        proc.wait(5)


async def test_agent_defaults_env_and_ignores_apply_live(start_daemon):
    running = await start_daemon()
    agent = running.daemon.services.agent
    client = await running.connect()
    await _set_config(
        client,
        "env:\n  GREETING: hello\nagent:\n  provider: openai\n  model: m-from-config\n"
        "  permission_mode: full\nfiles:\n  ignore: ['*.log']\n",
    )
    await wait_for(lambda: agent.effective_settings().model == "m-from-config")
    effective = agent.effective_settings()
    assert effective.provider == "openai"
    assert effective.permission_mode == "full"
    assert agent.tools.bash_env()["GREETING"] == "hello"
    assert "*.log" in agent.tools.ignore
    await _set_config(client, "env: {}\n")
    await wait_for(lambda: "GREETING" not in agent.tools.bash_env())
    assert agent.effective_settings().model != "m-from-config"


async def test_watcher_ignores_from_config_apply_live(start_daemon, workspace):
    running = await start_daemon(watcher_debounce=0.05)
    client = await running.connect()
    (workspace / "generated").mkdir()
    await _set_config(client, "files:\n  ignore: ['generated']\n")
    watcher = running.daemon.services.watcher
    await wait_for(
        lambda: not any(path.endswith("/generated") for path in map(str, watcher.watched_dirs()))
    )
    (workspace / "generated" / "out.js").write_text("ignored")
    (workspace / "marker.txt").write_text("seen")
    await client.expect_type("files", "change", path="/marker.txt")
    ignored = [
        f
        for f in client.backlog
        if f.get("channel") == "files" and "/generated/" in str(f.get("path"))
    ]
    assert ignored == []
    # Lift the ignore: the directory is watched again and its changes are reported.
    await _set_config(client, "files:\n  ignore: []\n")
    await wait_for(lambda: any(str(path).endswith("/generated") for path in watcher.watched_dirs()))
    (workspace / "generated" / "again.js").write_text("reported")
    await client.expect_type("files", "change", path="/generated/again.js")


async def test_config_edits_that_keep_the_ignores_do_not_rewalk_the_tree(start_daemon, monkeypatch):
    running = await start_daemon()
    watcher = running.daemon.services.watcher
    walks: list[list[str]] = []
    original = watcher.set_extra_ignores

    async def counting(patterns):
        walks.append(list(patterns))
        await original(patterns)

    monkeypatch.setattr(watcher, "set_extra_ignores", counting)
    client = await running.connect()
    await _set_config(client, "files:\n  ignore: ['tmp']\n")
    await wait_for(lambda: walks == [["tmp"]])
    await _set_config(client, "files:\n  ignore: ['tmp']\nenv:\n  A: b\n")
    await wait_for(lambda: running.daemon.services.agent.tools.bash_env().get("A") == "b")
    await _set_config(client, "files:\n  ignore: ['tmp', 'out']\n")
    await wait_for(lambda: len(walks) == 2)
    assert walks == [["tmp"], ["tmp", "out"]]
