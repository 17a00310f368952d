"""Config frames are models: their bytes are the ones the hand-built dicts produced."""

from __future__ import annotations

import json

from aetherd.channels.config import changed_frame
from aetherd.protocol import dumps, encode
from aetherd.protocol.config import ConfigSnapshot, ConfigValidation
from aetherd.services.config import ConfigEvent, WorkspaceConfig
from tests.channels.test_config import FAST, config_file


def test_changed_frame_bytes():
    config = WorkspaceConfig.model_validate({"env": {"A": "é"}, "ports": {3000: {"label": "W"}}})
    errors = [
        {"loc": ["terminals", 0, "restart"], "line": 3, "column": 5, "message": "bad"},
        {"loc": [], "line": None, "column": None, "message": "x"},
    ]
    event = ConfigEvent(config, "ab" * 16, False, errors, "disk", "/.aether/config.yaml")
    expected = {
        "channel": "config",
        "type": "changed",
        "config": config.model_dump(mode="json"),
        "version": "ab" * 16,
        "valid": False,
        "errors": errors,
        "source": "disk",
        "path": "/.aether/config.yaml",
    }
    assert encode(changed_frame(event)) == dumps(expected)
    assert json.loads(encode(changed_frame(event)))["config"]["ports"]["3000"]["label"] == "W"


async def test_snapshot_and_validation_bytes_equal_the_service_dicts(start_daemon, workspace):
    config_file(workspace).parent.mkdir()
    config_file(workspace).write_text("terminals:\n  - name: a\n    command: x\n    restart: no\n")
    running = await start_daemon(**FAST)
    store = running.daemon.services.config
    snapshot = store.snapshot()
    assert snapshot["valid"] is False and snapshot["errors"][0]["line"] == 4
    assert encode(ConfigSnapshot.model_validate(snapshot)) == dumps(snapshot)
    for result in (
        await store.validate("env: [1\n"),
        await store.validate("a: 1\n"),
        await store.validate_object({"terminals": [{"name": "b"}]}),
    ):
        assert result["valid"] is False and result["errors"]
        assert encode(ConfigValidation.model_validate(result)) == dumps(result)
    client = await running.connect()
    reply = await client.request("config", "get")
    assert reply["data"] == json.loads(dumps(store.snapshot()))
