"""Boot terminals run as real terminal sessions that clients see and attach to."""

from __future__ import annotations

from tests.support import wait_for


async def _attach_and_read(client, session_id: str, marker: str) -> str:
    """Attach to `session_id` and read its output until `marker` appears."""
    await client.send({"channel": "terminal", "type": "create", "sessionId": session_id})
    seen = ""
    for _ in range(1000):
        frame = await client.expect_type("terminal", "output", sessionId=session_id)
        seen += frame["data"]
        if marker in seen:
            return seen
    raise AssertionError(f"{marker!r} never appeared in {session_id}")


async def test_setup_on_boot_and_autostart_terminals_are_sessions(start_daemon, workspace):
    (workspace / ".aether").mkdir()
    (workspace / ".aether" / "config.yaml").write_text(
        "setup_on_boot: echo BOOT_$((40 + 2))\n"
        "env:\n  GREETING: hello-from-config\n"
        "terminals:\n"
        "  - name: web\n"
        "    command: echo WEB_$GREETING; exec sleep 30\n"
        "    restart: never\n"
    )
    running = await start_daemon()
    boot = running.daemon.services.boot
    terminals = running.daemon.services.terminals
    await wait_for(
        lambda: terminals.find("boot:web") is not None and terminals.find("boot:web").alive
    )
    client = await running.connect()
    sessions = await client.expect_type("terminal", "sessions")
    assert "boot:web" in {s["sessionId"] for s in sessions["sessions"]}
    assert boot.setup_result == {"boot:setup": 0}
    # The setup session exited; attaching replays its output, then its close.
    setup_output = await _attach_and_read(client, "boot:setup", "BOOT_42")
    assert "BOOT_42" in setup_output
    closed = await client.expect_type("terminal", "close", sessionId="boot:setup")
    assert closed["exitCode"] == 0
    # The autostart terminal runs with the config's env, and can be attached to.
    assert "WEB_hello-from-config" in await _attach_and_read(
        client, "boot:web", "WEB_hello-from-config"
    )
    assert boot.status()["web"]["state"] == "running"


async def test_restart_policy_restarts_the_session_and_config_changes_apply(
    start_daemon, workspace
):
    (workspace / ".aether").mkdir()
    counter = workspace / "starts.txt"
    (workspace / ".aether" / "config.yaml").write_text(
        "terminals:\n"
        "  - name: flaky\n"
        f"    command: echo run >> {counter}; exit 3\n"
        "    restart: on-failure\n"
    )
    running = await start_daemon(boot_restart_delay=0.05, boot_restart_max_delay=0.1)
    boot = running.daemon.services.boot
    terminals = running.daemon.services.terminals
    await wait_for(lambda: counter.exists() and counter.read_text().count("run") >= 3)
    assert boot.status()["flaky"]["lastExit"] == 3
    # Remove it from the config: it stops being restarted and its session ends.
    client = await running.connect()
    reply = await client.request("config", "set", raw="terminals: []\n")
    assert reply["success"] is True
    await wait_for(lambda: "flaky" not in boot.status())
    await wait_for(
        lambda: terminals.find("boot:flaky") is None or not terminals.find("boot:flaky").alive
    )
    runs = counter.read_text().count("run")
    # A new terminal added live starts at once.
    reply = await client.request(
        "config", "set", raw="terminals:\n  - name: late\n    command: exec sleep 30\n"
    )
    assert reply["success"] is True
    await wait_for(
        lambda: terminals.find("boot:late") is not None and terminals.find("boot:late").alive
    )
    assert counter.read_text().count("run") == runs  # flaky never came back


async def test_interactive_terminals_get_the_config_env(start_daemon, workspace):
    running = await start_daemon()
    client = await running.connect()
    reply = await client.request("config", "set", raw="env:\n  PROJECT_MODE: from-config\n")
    assert reply["success"] is True
    await client.send(
        {
            "channel": "terminal",
            "type": "create",
            "sessionId": "t1",
            "command": "echo MODE=$PROJECT_MODE",
        }
    )
    seen = ""
    for _ in range(200):
        frame = await client.expect(
            lambda f: f.get("sessionId") == "t1" and f.get("type") in ("output", "close")
        )
        if frame["type"] == "close":
            break
        seen += frame["data"]
    assert "MODE=from-config" in seen
