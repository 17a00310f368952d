"""The config channel end to end over a real socket, and the schema endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from aetherd.config_model import config_schema, version_of
from tests.conftest import TOKEN

FAST = {"config_debounce": 0.05, "config_poll_interval": 0}


def config_file(root: Path) -> Path:
    return root / ".aether" / "config.yaml"


async def test_get_on_a_missing_file(start_daemon):
    running = await start_daemon(**FAST)
    client = await running.connect()
    reply = await client.request("config", "get")
    assert reply["success"] is True
    data = reply["data"]
    assert data["valid"] is True and data["errors"] == [] and data["raw"] == ""
    assert data["version"] == version_of(b"") and data["path"] == "/.aether/config.yaml"
    assert data["config"]["terminals"] == [] and data["config"]["agent"]["model"] is None


async def test_set_pushes_changed_to_every_connection(start_daemon, workspace):
    running = await start_daemon(**FAST)
    first, second = await running.connect(), await running.connect()
    version = (await first.request("config", "get"))["data"]["version"]
    raw = "env:\n  A: '1'\nports:\n  3000: {label: Web}\n"
    reply = await first.request("config", "set", raw=raw, version=version)
    assert reply["success"] is True, reply
    assert reply["data"]["version"] == version_of(raw.encode())
    assert config_file(workspace).read_text() == raw
    for client in (first, second):
        frame = await client.expect_type("config", "changed")
        assert frame["source"] == "client" and frame["valid"] is True
        assert frame["version"] == version_of(raw.encode())
        assert frame["config"]["ports"] == {
            "3000": {"label": "Web", "visibility": "private", "ignore": False}
        }
    got = await second.request("config", "get")
    assert got["data"]["raw"] == raw and got["data"]["config"]["env"] == {"A": "1"}


async def test_set_with_a_config_object(start_daemon, workspace):
    running = await start_daemon(**FAST)
    client = await running.connect()
    reply = await client.request(
        "config", "set", config={"agent": {"provider": "anthropic", "model": "m"}}
    )
    assert reply["success"] is True
    assert "provider: anthropic" in config_file(workspace).read_text()
    assert reply["data"]["config"]["agent"]["provider"] == "anthropic"


async def test_stale_version_gets_conflict(start_daemon, workspace):
    path = config_file(workspace)
    path.parent.mkdir()
    path.write_text("setup: one\n")
    running = await start_daemon(**FAST)
    client = await running.connect()
    reply = await client.request("config", "set", raw="setup: two\n", version="0" * 32)
    assert reply["success"] is False and reply["code"] == "CONFLICT"
    assert reply["currentVersion"] == version_of(b"setup: one\n")
    assert path.read_text() == "setup: one\n"


async def test_invalid_set_gets_invalid_config_with_lines(start_daemon, workspace):
    running = await start_daemon(**FAST)
    client = await running.connect()
    cases = [
        ("setup: make\nterminals: [\n", [], "YAML syntax error"),
        ("setup: make\nsetup_on_boot: {a: 1}\n", ["setup_on_boot"], "valid string"),
        ("setup: make\nagent:\n  modle: x\n", ["agent", "modle"], "unknown key 'modle'"),
    ]
    for raw, loc, text in cases:
        reply = await client.request("config", "set", raw=raw)
        assert reply["success"] is False and reply["code"] == "INVALID_CONFIG", raw
        error = reply["errors"][0]
        assert error["loc"] == loc and text in error["message"], error
        assert error["line"] in (2, 3)
        assert "invalid config: line" in reply["error"]
    assert not config_file(workspace).exists()


async def test_set_needs_exactly_one_of_raw_or_config(start_daemon):
    running = await start_daemon(**FAST)
    client = await running.connect()
    for fields in ({}, {"raw": "setup: x\n", "config": {}}):
        reply = await client.request("config", "set", **fields)
        assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"
    reply = await client.request("config", "set", raw=5)
    assert reply["code"] == "INVALID_MESSAGE" and reply["field"] == "raw"


async def test_validate(start_daemon, workspace):
    running = await start_daemon(**FAST)
    client = await running.connect()
    ok = await client.request("config", "validate", raw="files:\n  ignore: [dist]\n")
    assert ok["data"] == {"valid": True, "errors": []}
    bad = await client.request("config", "validate", raw="files:\n  ignore: dist\n")
    assert bad["success"] is True and bad["data"]["valid"] is False
    assert bad["data"]["errors"][0]["loc"] == ["files", "ignore"]
    assert bad["data"]["errors"][0]["line"] == 2
    obj = await client.request("config", "validate", config={"terminals": [{"name": "a"}]})
    assert obj["data"]["errors"][0]["loc"] == ["terminals", 0, "command"]
    assert obj["data"]["errors"][0]["line"] is None
    neither = await client.request("config", "validate")
    assert neither["success"] is False and neither["code"] == "INVALID_MESSAGE"
    assert not config_file(workspace).exists()


async def test_frames_without_request_id_are_refused(start_daemon):
    running = await start_daemon(**FAST)
    client = await running.connect()
    await client.send({"channel": "config", "type": "get"})
    frame = await client.expect_type("error", "error")
    assert frame["code"] == "INVALID_MESSAGE" and frame["field"] == "requestId"


async def test_disk_edit_in_a_terminal_is_pushed_and_invalid_keeps_last_good(
    start_daemon, workspace
):
    path = config_file(workspace)
    path.parent.mkdir()
    path.write_text("setup: one\n")
    running = await start_daemon(**FAST)
    first, second = await running.connect(), await running.connect()
    path.write_text("setup: two\n")
    for client in (first, second):
        frame = await client.expect_type("config", "changed", source="disk")
        assert frame["config"]["setup"] == "two" and frame["valid"] is True
    path.write_text("setup: three\nbogus: 1\n")
    frame = await first.expect_type("config", "changed", source="disk")
    assert frame["valid"] is False
    assert frame["errors"] == [
        {"loc": ["bogus"], "line": 2, "column": 1, "message": "unknown key 'bogus'"}
    ]
    assert frame["config"]["setup"] == "two"  # the last good config stays in force
    got = (await first.request("config", "get"))["data"]
    assert got["valid"] is False and got["config"]["setup"] == "two"
    assert got["raw"] == "setup: three\nbogus: 1\n"


async def test_schema_endpoint_is_authenticated(start_daemon):
    running = await start_daemon(**FAST)
    url = running.url(f"/workspaces/{running.settings.workspace_id}/config/schema")
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url, params={"token": "wrong"}) as response:
            assert response.status == 401
        other = running.url("/workspaces/someone-else/config/schema")
        async with session.get(other, params={"token": TOKEN}) as response:
            assert response.status == 404
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.content_type == "application/schema+json"
            assert json.loads(await response.text()) == config_schema()
