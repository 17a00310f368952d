"""The generated protocol description: `aetherd schema` and GET /workspaces/{id}/protocol.json.

The document is checked against the official AsyncAPI 3.0.0 JSON Schema (vendored in
tests/protocol/asyncapi/, from the AsyncAPI Initiative's spec package, Apache-2.0), its
JSON Schemas against the Draft 2020-12 meta-schema, and real frames from a running
daemon against the message schemas.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from aetherd.channels import CHANNELS
from aetherd.errors import ErrorCode
from aetherd.protocol import Registry
from aetherd.protocol.schema import build_document, document_json, protocol_document
from tests.conftest import TOKEN
from tests.support import run_cli

ASYNCAPI_SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json"


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `aetherd schema` prints, run as a real process."""
    result = run_cli(tmp_path_factory.mktemp("cli"), "schema")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.fixture(scope="module")
def document(cli_output: str) -> dict[str, Any]:
    return json.loads(cli_output)


def payload_validator(document: dict[str, Any], message: str) -> jsonschema.Draft202012Validator:
    """A validator for the payload of `components.messages[message]`, refs resolved."""
    assert message in document["components"]["messages"], message
    schema = {
        "$ref": f"#/components/messages/{message}/payload",
        "components": document["components"],
    }
    return jsonschema.Draft202012Validator(schema)


def assert_valid(document: dict[str, Any], message: str, frame: dict[str, Any]) -> None:
    errors = [e.message for e in payload_validator(document, message).iter_errors(frame)]
    assert errors == [], f"{message}: {frame} does not match: {errors}"


# --- the command and the document ---------------------------------------------------


def test_the_cli_prints_the_document_of_the_registry(cli_output: str) -> None:
    assert cli_output == protocol_document()
    assert cli_output.endswith("}\n")


def test_the_document_is_sorted_and_stable(cli_output: str) -> None:
    text = json.dumps(json.loads(cli_output), indent=2, sort_keys=True, ensure_ascii=False)
    assert cli_output == text + "\n"
    first = build_document(Registry(CHANNELS))
    second = build_document(Registry(CHANNELS))
    assert first == second


def test_the_document_is_built_once_per_registry() -> None:
    registry = Registry(CHANNELS)
    assert document_json(registry) is document_json(registry)


def test_the_document_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    meta = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(meta)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    assert document["asyncapi"] == "3.0.0"
    # The validator does look inside: a wrong action, or a reply without its
    # channel's address, is refused.
    broken = copy.deepcopy(document)
    broken["operations"]["terminal.create.request"]["action"] = "shout"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(document)
    broken["channels"]["terminal"]["address"] = 42
    assert not validator.is_valid(broken)


def test_every_schema_is_valid_json_schema(document: dict[str, Any]) -> None:
    check = jsonschema.Draft202012Validator.check_schema
    assert document["components"]["schemas"]
    for name, schema in document["components"]["schemas"].items():
        check(schema)
        assert isinstance(name, str)
    for message in document["components"]["messages"].values():
        check(message["payload"])


def test_every_handler_and_push_is_described(document: dict[str, Any]) -> None:
    operations = document["operations"]
    for channel in CHANNELS:
        assert channel.name in document["channels"]
        for type_, handler in channel.handlers.items():
            operation = operations[f"{channel.name}.{type_}.request"]
            assert operation["action"] == "receive"
            assert operation["x-direction"] == "client-to-server"
            assert (operation["x-channel"], operation["x-type"]) == (channel.name, type_)
            expected = {code.value for code in handler.errors}
            expected |= {"INVALID_MESSAGE", "INTERNAL_ERROR"}
            assert operation["x-errors"] == sorted(expected)
            assert operation["x-request-id"] == (
                "required" if channel.require_request_id else "optional"
            )
            replies = [ref["$ref"] for ref in operation["reply"]["messages"]]
            assert replies == [
                f"#/channels/{channel.name}/messages/{channel.name}.{type_}.reply",
                f"#/channels/{channel.name}/messages/errorReply",
            ]
        for frame in channel.pushes:
            operation = operations[f"{frame.CHANNEL}.{frame.TYPE}.push"]
            assert operation["action"] == "send"
            assert operation["x-direction"] == "server-to-client"
    assert operations["error.error.push"]["action"] == "send"
    codes = [code.value for code in ErrorCode]
    assert document["x-error-codes"] == sorted(codes)
    assert set(document["x-envelope-errors"]) <= set(codes)


# --- spot checks of a few messages ----------------------------------------------------


def test_terminal_create_carries_the_session_id_pattern(document: dict[str, Any]) -> None:
    payload = document["components"]["messages"]["terminal.create.request"]["payload"]
    session_id = payload["properties"]["sessionId"]
    assert session_id["pattern"] == "^[A-Za-z0-9._:-]+$"
    assert (session_id["minLength"], session_id["maxLength"]) == (1, 128)
    assert payload["required"] == ["channel", "type", "sessionId"]
    assert payload["properties"]["type"] == {"const": "create", "type": "string"}
    request_id = document["components"]["schemas"]["RequestId"]
    assert (request_id["minLength"], request_id["maxLength"]) == (1, 128)
    assert_valid(
        document,
        "terminal.create.request",
        {"channel": "terminal", "type": "create", "sessionId": "a:1"},
    )
    bad = payload_validator(document, "terminal.create.request")
    assert not bad.is_valid({"channel": "terminal", "type": "create", "sessionId": "a b"})
    assert not bad.is_valid({"channel": "terminal", "type": "create", "sessionId": "a", "cols": 0})
    assert not bad.is_valid(
        {"channel": "terminal", "type": "create", "sessionId": "a", "requestId": ""}
    )


def test_files_requests_require_a_request_id(document: dict[str, Any]) -> None:
    payload = document["components"]["messages"]["files.read.request"]["payload"]
    assert "requestId" in payload["required"]
    assert document["operations"]["files.read.request"]["x-request-id"] == "required"
    assert document["operations"]["terminal.list.request"]["x-request-id"] == "optional"


def test_the_terminal_list_reply_is_a_list_of_sessions(document: dict[str, Any]) -> None:
    reply = document["components"]["messages"]["terminal.list.reply"]["payload"]
    assert reply["required"] == ["channel", "type", "requestId", "success", "data"]
    data = reply["properties"]["data"]
    name = data["$ref"].rsplit("/", 1)[1]
    result = document["components"]["schemas"][name]
    sessions = result["properties"]["sessions"]
    assert sessions["type"] == "array"
    item = document["components"]["schemas"][sessions["items"]["$ref"].rsplit("/", 1)[1]]
    assert {"sessionId", "pid", "createdAt", "exitCode", "offset"} <= set(item["properties"])
    # Serialization mode: every field the daemon always sends is required.
    assert set(item["required"]) == set(item["properties"])
    # A bare acknowledgement has `data: null`.
    ack = document["components"]["messages"]["terminal.input.reply"]["payload"]
    assert ack["properties"]["data"] == {"type": "null"}


def test_a_field_left_out_while_null_is_not_required(document: dict[str, Any]) -> None:
    output = document["components"]["messages"]["terminal.output.push"]["payload"]
    assert "truncated" in output["properties"]
    assert "truncated" not in output["required"]
    assert {"channel", "type", "sessionId", "offset", "data"} <= set(output["required"])
    frame = document["components"]["messages"]["error.error.push"]["payload"]
    assert "ref" not in frame["required"] and "code" in frame["required"]


# --- real frames match their schemas ---------------------------------------------------


async def test_frames_of_a_running_daemon_match_the_schema(daemon, document) -> None:
    client = await daemon.connect()
    sessions = await client.expect_type("terminal", "sessions")
    assert_valid(document, "terminal.sessions.push", sessions)
    reply = await client.request(
        "terminal", "create", sessionId="schema-1", command="echo hi; sleep 30"
    )
    assert reply["success"] is True
    assert_valid(document, "terminal.create.reply", reply)
    listed = await client.request("terminal", "list")
    assert listed["data"]["sessions"]
    assert_valid(document, "terminal.list.reply", listed)
    output = await client.expect_type("terminal", "output", sessionId="schema-1")
    assert_valid(document, "terminal.output.push", output)
    failed = await client.request("terminal", "resize", sessionId="nope", cols=10, rows=10)
    assert failed["success"] is False and failed["code"] == "SESSION_NOT_FOUND"
    assert_valid(document, "errorReply", failed)
    await client.send({"channel": "nowhere", "type": "x"})
    error = await client.expect_type("error", "error")
    assert_valid(document, "error.error.push", error)
    got = await client.request("config", "get")
    assert_valid(document, "config.get.reply", got)
    history = await client.expect_type("agent", "history")
    assert_valid(document, "agent.history.push", history)
    (daemon.settings.root / "notes.txt").write_text("hello\n", encoding="utf-8")
    listing = await client.request("files", "list", path="/")
    assert any(entry["name"] == "notes.txt" for entry in listing["data"])
    assert_valid(document, "files.list.reply", listing)
    stat = await client.request("files", "stat", path="/notes.txt")
    assert_valid(document, "files.stat.reply", stat)
    ports = await client.request("ports", "list")
    assert_valid(document, "ports.list.reply", ports)
    activity = await client.request("activity", "user_activity")
    assert_valid(document, "activity.user_activity.reply", activity)
    closed = await client.request("terminal", "close", sessionId="schema-1")
    assert_valid(document, "terminal.close.reply", closed)
    pushed = await client.expect_type("terminal", "close", sessionId="schema-1")
    assert_valid(document, "terminal.close.push", pushed)
    # A frame that breaks the schema is refused by it (the check is not vacuous).
    wrong = dict(reply, data={**reply["data"], "pid": "one"})
    assert not payload_validator(document, "terminal.create.reply").is_valid(wrong)


# --- over HTTP --------------------------------------------------------------------------


async def test_the_http_document_is_authenticated_and_equals_the_cli(daemon, cli_output) -> None:
    workspace = daemon.settings.workspace_id
    url = daemon.url(f"/workspaces/{workspace}/protocol.json")
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401
            assert await response.json() == {"error": "Unauthorized"}
        async with session.get(url, params={"token": "wrong"}) as response:
            assert response.status == 401
        other = daemon.url("/workspaces/someone-else/protocol.json")
        async with session.get(other, params={"token": TOKEN}) as response:
            assert response.status == 404
        for auth in (
            {"params": {"token": TOKEN}},
            {"headers": {"Authorization": f"Bearer {TOKEN}"}},
        ):
            async with session.get(url, **auth) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                assert await response.text() == cli_output


def test_the_daemon_does_not_import_the_schema_module_to_start() -> None:
    code = (
        "import sys, aetherd.app, aetherd.cli, aetherd.channels, aetherd.transport.routes;"
        "print('aetherd.protocol.schema' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
