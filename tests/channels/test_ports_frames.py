"""Ports frames are models: their bytes are the ones the hand-built dicts produced."""

from __future__ import annotations

import json

import pytest

from aetherd.channels.ports import event_frame, open_frame, port_entry
from aetherd.protocol import encode
from aetherd.protocol.ports import PortEntry, PortsKillResult, PortsOpen
from aetherd.services.ports import PortEvent, PortInfo

INFO = PortInfo(
    port=5173,
    pid=4242,
    process="node",
    command="node /app/node_modules/.bin/vite",
    address="::1",
    addresses=("::1", "::ffff:127.0.0.1"),
    local_only=True,
    url="http://localhost:5173",
    label=None,
)


def test_open_frame_bytes_follow_the_service_fields():
    text = encode(open_frame(INFO))
    # The example of docs/protocol.md section 5, field for field and in order.
    assert text == (
        '{"channel":"ports","type":"open","port":5173,"pid":4242,"process":"node",'
        '"command":"node /app/node_modules/.bin/vite","address":"::1",'
        '"addresses":["::1","::ffff:127.0.0.1"],"localOnly":true,'
        '"url":"http://localhost:5173","label":null}'
    )
    assert json.loads(text) == {"channel": "ports", "type": "open", **INFO.to_wire()}


def test_a_list_item_is_an_open_frame_without_channel_and_type():
    assert set(PortEntry.model_fields) | {"channel", "type"} == set(PortsOpen.model_fields)
    assert encode(port_entry(INFO)) == json.dumps(
        INFO.to_wire(), ensure_ascii=False, separators=(",", ":")
    )


def test_unknown_owner_and_label():
    info = PortInfo(3000, None, None, None, "0.0.0.0", ("0.0.0.0", "::"), False, "u", "web é")
    frame = json.loads(encode(open_frame(info)))
    assert (frame["pid"], frame["process"], frame["command"]) == (None, None, None)
    assert frame["label"] == "web é"


def test_event_frames():
    assert encode(event_frame(PortEvent("close", 8080))) == (
        '{"channel":"ports","type":"close","port":8080}'
    )
    assert encode(event_frame(PortEvent("open", 5173, INFO))) == encode(open_frame(INFO))


def test_kill_result_and_bounds():
    assert encode(PortsKillResult(port=80, pids=[12, 13])) == '{"port":80,"pids":[12,13]}'
    with pytest.raises(ValueError):
        PortsKillResult(port=0, pids=[])
