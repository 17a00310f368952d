"""Terminal frames: the hand-built `output` encoder equals the model, and the bytes stay.

The channel keeps one hand-built encoder on its hot path (`output`); these tests hold
it to `encode(TerminalOutput(...))` byte for byte, and pin the exact bytes of the other
frames so that moving them to models changed nothing on the wire.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aetherd.channels.terminal import STREAMS, output_json, output_prefix, session_info
from aetherd.protocol import encode
from aetherd.protocol.terminal import (
    TerminalClose,
    TerminalCloseResult,
    TerminalCreateResult,
    TerminalListResult,
    TerminalOutput,
    TerminalSessionInfo,
    TerminalSessions,
)
from tests.support import wait_for

OUTPUT_CASES = [
    ("s1", 0, "", False),
    ("s1", 0, "hello\r\n$ ", True),
    ("a.b:c-D_9", 7, "héllo wörld ✓ 😀 日本語", False),
    ("s", 3, "\x1b[1;31mred\x1b[0m\x07\x00\x08\x0b\x0c\x7f\x1f", True),
    ("s", 1, '"quoted" \\back\\slash\\ /slash/ \t\n\r', False),
    ("s", 2**53 + 1, "\u2028\u2029\ufffd\u0085", True),
    ("s", 2**63 - 1, "big offset", False),
    ("x" * 128, 123_456_789_012, "x" * 70_000, True),
]


@pytest.mark.parametrize(("sid", "offset", "data", "truncated"), OUTPUT_CASES)
def test_hand_built_output_equals_the_model(sid: str, offset: int, data: str, truncated: bool):
    fast = output_json(output_prefix(sid), offset, data, truncated)
    model = encode(
        TerminalOutput(
            session_id=sid, offset=offset, data=data, truncated=True if truncated else None
        )
    )
    assert fast == model.encode("utf-8")  # sent as a text frame: its UTF-8 bytes
    frame = json.loads(fast)
    assert frame["data"] == data and frame["offset"] == offset
    assert ("truncated" in frame) is truncated


# Every code point but the surrogates (the frame guard refuses those before a frame is
# built, and output text comes from bytes decoded with "replace"), in slices.
ALL_CHARACTERS = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def test_output_escapes_every_character_as_json_and_pydantic_do():
    """orjson (the hot path) escapes exactly what `json` and the models escape: the
    C0 controls (a short form such as backslash-n where JSON has one, else backslash-u
    00XX in lowercase hex), the quote and the backslash; DEL, C1 controls, U+2028,
    U+2029 and everything else go raw."""
    prefix = output_prefix("s")
    step = 0x8000
    for start in range(0, len(ALL_CHARACTERS), step):
        data = ALL_CHARACTERS[start : start + step]
        fast = output_json(prefix, start, data, False)
        std = (
            '{"channel":"terminal","type":"output","sessionId":"s",'
            f'"offset":{start},"data":{json.dumps(data, ensure_ascii=False)}}}'
        )
        assert fast == std.encode("utf-8")
        assert fast == encode(TerminalOutput(session_id="s", offset=start, data=data)).encode()


@settings(max_examples=300, deadline=None)
@given(
    data=st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
    offset=st.integers(0, 2**63 - 1),
    truncated=st.booleans(),
)
def test_output_bytes_equal_the_model_for_any_text(data: str, offset: int, truncated: bool):
    fast = output_json(output_prefix("s"), offset, data, truncated)
    model = TerminalOutput(
        session_id="s", offset=offset, data=data, truncated=True if truncated else None
    )
    assert fast == encode(model).encode("utf-8")
    assert json.loads(fast)["data"] == data


def test_output_never_says_truncated_false():
    with pytest.raises(ValueError):
        TerminalOutput(session_id="s", offset=0, data="", truncated=False)


def test_close_frame_bytes():
    assert (
        encode(TerminalClose(session_id="s1", exit_code=None, signal=9))
        == '{"channel":"terminal","type":"close","sessionId":"s1","exitCode":null,"signal":9}'
    )
    assert (
        encode(TerminalClose(session_id="é", exit_code=3, signal=None))
        == '{"channel":"terminal","type":"close","sessionId":"é","exitCode":3,"signal":null}'
    )


INFO = {
    "session_id": "s1",
    "pid": 42,
    "command": "bash",
    "cwd": "/",
    "cols": 80,
    "rows": 24,
    "created_at": "2026-12-02T21:00:00.123Z",
    "clients": 1,
    "exited": False,
    "exit_code": None,
    "signal": None,
    "offset": 10,
}
INFO_JSON = (
    '{"sessionId":"s1","pid":42,"command":"bash","cwd":"/","cols":80,"rows":24,'
    '"createdAt":"2026-12-02T21:00:00.123Z","clients":1,"exited":false,'
    '"exitCode":null,"signal":null,"offset":10}'
)


def test_session_frames_and_replies_bytes():
    info = TerminalSessionInfo(**INFO)
    assert encode(info) == INFO_JSON
    assert (
        encode(TerminalSessions(sessions=[info]))
        == '{"channel":"terminal","type":"sessions","sessions":[' + INFO_JSON + "]}"
    )
    assert encode(TerminalListResult(sessions=[])) == '{"sessions":[]}'
    assert encode(TerminalCreateResult(**INFO, attached=True)) == (
        INFO_JSON[:-1] + ',"attached":true}'
    )
    assert (
        encode(TerminalCloseResult(session_id="s1", exit_code=0, signal=None))
        == '{"sessionId":"s1","exitCode":0,"signal":null}'
    )


async def test_live_session_maps_to_the_listed_shape(daemon):
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    reply = await client.request("terminal", "create", sessionId="m1", command="sleep 60")
    assert reply["success"] is True
    data = reply["data"]
    assert list(data) == [*(TerminalSessionInfo.model_fields[k].alias for k in INFO), "attached"]
    session = daemon.daemon.services.terminals.get("m1")
    listed = json.loads(encode(session_info(session)))
    assert listed["sessionId"] == "m1" and listed["clients"] == 1
    assert listed["createdAt"].endswith("Z") and listed["pid"] == data["pid"]


async def test_streams_live_on_the_connection_and_close_with_it(daemon):
    terminals = daemon.daemon.services.terminals
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    for sid in ("p1", "p2"):
        reply = await client.request("terminal", "create", sessionId=sid, command="sleep 60")
        assert reply["success"] is True
    peers = list(daemon.daemon.hub)
    assert len(peers) == 1
    streams = peers[0].slot(STREAMS)
    assert len(streams) == 2
    assert [len(terminals.get(sid).attachments) for sid in ("p1", "p2")] == [1, 1]
    await client.close()
    await wait_for(
        lambda: all(not terminals.get(sid).attachments for sid in ("p1", "p2")),
        timeout=5,
    )
    assert len(streams) == 0  # the sessions themselves keep running
    assert all(terminals.get(sid).alive for sid in ("p1", "p2"))


async def test_a_cwd_whose_name_is_not_utf8_is_sent_replaced(daemon, workspace):
    """A session started in a directory whose name is not UTF-8 (reached through a link)."""
    os.mkdir(os.path.join(os.fsencode(workspace), b"caf\xe9"))
    os.symlink(os.fsdecode(b"caf\xe9"), workspace / "cafe")
    client = await daemon.connect()
    await client.expect_type("terminal", "sessions")
    reply = await client.request(
        "terminal", "create", sessionId="u1", cwd="/cafe", command="sleep 60"
    )
    assert reply["success"] is True, reply
    assert reply["data"]["cwd"] == "/caf\ufffd"
    listed = await client.request("terminal", "list")
    assert [s["cwd"] for s in listed["data"]["sessions"]] == ["/caf\ufffd"]
