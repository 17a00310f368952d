"""The typed frame core: the envelope guard, declared replies, encoders, per-peer slots."""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson
import pytest
from pydantic import Field

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Frame, Hub, Message, Model, Slot, encode, omitted
from aetherd.protocol.dispatch import check_unicode, decode_frame
from aetherd.protocol.frames import SuccessReply, error_frame, success_reply
from tests.support import wait_for


class Pong(Frame):
    channel: Literal["demo"] = "demo"
    type: Literal["pong"] = "pong"
    session_id: str
    exit_code: int | None
    signal: int | None = omitted()


def test_frame_pins_its_channel_and_type_and_serialises_camel_case():
    assert (Pong.CHANNEL, Pong.TYPE) == ("demo", "pong")
    text = encode(Pong(session_id="é", exit_code=None))
    # Compact, UTF-8 unescaped, None kept unless the field is `omitted()`.
    assert text == '{"channel":"demo","type":"pong","sessionId":"é","exitCode":null}'
    assert json.loads(encode(Pong(session_id="a", exit_code=0, signal=9)))["signal"] == 9


def test_encode_replaces_unencodable_text_instead_of_failing():
    text = encode(Pong(session_id="bad\udce9", exit_code=None))
    assert json.loads(text)["sessionId"] == "bad?"


def test_a_channel_refuses_a_frame_of_another_channel():
    with pytest.raises(ValueError, match="not a frame of channel"):
        Channel("other", pushes=(Pong,))


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (None, None),
        ({"a": 1, "b": [1, "x"]}, dict[str, Any]),
        ([], list[Pong]),
    ],
)
def test_success_reply_bytes_equal_the_model(data: Any, declared: Any):
    channel = Channel("demo")

    @channel.handler("get", Message, reply=declared)
    async def get(ctx, msg):
        return data

    data_json = channel.handlers["get"].encode_data(data)
    fast = success_reply("demo", "get", "r-1 ü", data_json)
    model = encode(SuccessReply(channel="demo", type="get", request_id="r-1 ü", data=data))
    assert fast == model


def test_a_result_that_is_not_the_declared_reply_is_refused():
    class Size(Model):
        cols: int

    channel = Channel("demo")

    @channel.handler("get", Message, reply=Size)
    async def get(ctx, msg):
        return {"cols": 1}

    assert channel.handlers["get"].encode_data(Size(cols=3)) == '{"cols":3}'
    with pytest.raises(Exception, match="Expected"):
        channel.handlers["get"].encode_data({"rows": 1})


def test_data_without_a_declared_reply_is_refused():
    channel = Channel("demo")

    @channel.handler("get", Message)
    async def get(ctx, msg):
        return {"cols": 1}

    assert channel.handlers["get"].encode_data(None) == "null"
    with pytest.raises(TypeError, match="declares no reply"):
        channel.handlers["get"].encode_data({"cols": 1})


def test_a_handler_annotated_to_return_data_must_declare_its_reply():
    channel = Channel("demo")

    async def get(ctx: Any, msg: Message) -> dict[str, int]:
        return {}

    with pytest.raises(ValueError, match="declares no reply"):
        channel.handler("get", Message)(get)

    async def ack(ctx: Any, msg: Message) -> None:
        return None

    channel.handler("ack", Message)(ack)
    assert channel.handlers["ack"].reply is None


def test_hub_broadcast_takes_models_not_dicts():
    hub = Hub()
    with pytest.raises(TypeError, match="Frame model"):
        hub.broadcast({"channel": "demo", "type": "pong"})  # type: ignore[arg-type]


def test_error_frame_carries_extra_fields_and_ref():
    err = AetherError(ErrorCode.LIMIT_EXCEEDED, "too many", limit=3)
    frame = json.loads(error_frame(err, {"channel": "terminal"}))
    assert frame == {
        "channel": "error",
        "type": "error",
        "code": "LIMIT_EXCEEDED",
        "error": "too many",
        "limit": 3,
        "ref": {"channel": "terminal"},
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"channel":"a","type":"b","n":9223372036854775808}',
        '{"channel":"a","type":"b","n":-9223372036854775809}',
        '{"channel":"a","type":"b","n":' + "9" * 5000 + "}",
        '{"channel":"a","type":"b","n":NaN}',
        '{"channel":"a","type":"b","n":-Infinity}',
        '{"channel":"a","type":"b","n":1e999}',
    ],
)
def test_numbers_the_protocol_does_not_carry_are_refused(text: str):
    with pytest.raises(AetherError) as info:
        decode_frame(text)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert "out of range" in info.value.message


def test_64_bit_edges_and_floats_pass():
    raw = decode_frame('{"a":9223372036854775807,"b":-9223372036854775808,"c":1.5e300}')
    assert raw == {"a": 2**63 - 1, "b": -(2**63), "c": 1.5e300}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"channel":"a","type":"b","requestId":"\\ud800"}', "requestId"),
        ('{"channel":"a","type":"b","env":{"K":["ok","x\\uDFFF"]}}', "env.K.1"),
        ('{"channel":"a","type":"b","env":{"\\udc80":"v"}}', "env"),
        ('{"channel":"\\udce9","type":"b"}', "channel"),
    ],
)
def test_lone_surrogates_are_refused_and_located(text: str, field: str):
    with pytest.raises(AetherError) as info:
        check_unicode(decode_frame(text), text)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.extra["field"] == field
    # The error itself is sendable.
    error_frame(info.value).encode("utf-8")


def test_surrogate_pairs_and_escaped_backslashes_pass():
    text = '{"emoji":"\\ud83d\\ude00","text":"\\\\ud800"}'
    raw = decode_frame(text)
    check_unicode(raw, text)
    assert raw == {"emoji": "😀", "text": "\\ud800"}


def test_malformed_json_keeps_its_own_code():
    with pytest.raises(AetherError) as info:
        decode_frame('{"a":')
    assert info.value.code is ErrorCode.INVALID_JSON


class Box:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


BOX = Slot("test.box", Box)


async def test_a_slot_lives_on_its_connection_and_closes_with_it(daemon):
    """Per-peer state: created on first use, one per connection, closed on disconnect."""
    first = await daemon.connect()
    second = await daemon.connect()
    await first.request("activity", "user_activity")
    await second.request("activity", "user_activity")
    conns = list(daemon.daemon.hub)
    assert len(conns) == 2
    a, b = (conn.slot(BOX) for conn in conns)
    assert a is not b and conns[0].slot(BOX) is a
    await first.close()
    await second.close()
    await wait_for(lambda: a.closed and b.closed)


class Bounded(Message):
    n: int = Field(ge=0)


def test_message_ignores_unknown_fields():
    assert Bounded.model_validate({"n": 1, "other": "x"}).n == 1


async def test_guarded_frames_over_the_socket_get_an_error_and_the_socket_stays(daemon):
    client = await daemon.connect()
    await client.send('{"channel":"activity","type":"user_activity","requestId":"\\ud800"}')
    error = await client.expect_type("error", "error")
    assert error["code"] == "INVALID_MESSAGE" and error["field"] == "requestId"
    assert error["ref"] == {"channel": "activity", "type": "user_activity"}
    # A clean requestId still gets its (failed) reply, so the request does not time out.
    await client.send(
        '{"channel":"agent","type":"history","requestId":"h1","beforeSeq":99999999999999999999}'
    )
    reply = await client.expect(lambda f: f.get("requestId") == "h1")
    assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"
    assert "out of range" in reply["error"] and reply["type"] == "history"
    await client.send('{"channel":"files","type":"stat","requestId":"s1","path":"/\\ud800"}')
    reply = await client.expect(lambda f: f.get("requestId") == "s1")
    assert reply["success"] is False and reply["field"] == "path"
    assert "\\ud800" not in json.dumps(reply) and "\ud800" not in reply["error"]
    reply = await client.request("activity", "user_activity")
    assert reply["success"] is True


# -- orjson parses frames; json decides whenever the two could differ ----------------


@pytest.mark.parametrize(
    "text",
    [
        '{"channel":"a","type":"b","n":18446744073709551615}',  # orjson: an int
        '{"channel":"a","type":"b","n":18446744073709551616}',  # orjson: silently a float
        '{"channel":"a","type":"b","n":-9223372036854775809}',  # orjson: silently a float
        '{"channel":"a","type":"b","n":100000000000000000000000000}',
        '{"channel":"a","type":"b","n":[1,{"m":-99999999999999999999}]}',
        '{"channel":"a","type":"b","n":Infinity}',
        '{"channel":"a","type":"b","n":-1e400}',
    ],
)
def test_big_integers_and_non_finite_numbers_are_refused_as_before(text: str):
    with pytest.raises(AetherError) as info:
        decode_frame(text)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert "out of range" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1,"a":2,"b":{"c":1,"c":[3]}}',  # duplicate keys: the last one wins
        '{"id":"12345678901234567890123","n":9223372036854775807}',  # digits in a string
        '{"f":-9.2233720368547758e18,"g":1e300,"h":-1.5e19}',  # wide floats: json decides
        '{"n":-9223372036854775808,"m":-0,"f":-0.0,"g":1E+2,"h":1e-400,"i":5e-324}',
        '{"s":"\\u00e9\\ud83d\\ude00\\u2028\\n\\"\\\\/","t":"é😀"}',
        ' {"nested":[[[{"x":[true,false,null]}]]]} ',
        '{"f":[0.1,2.2250738585072011e-308,1.7976931348623157e308,123456789.123456789]}',
        "[1,2]",
        '"text"',
    ],
)
def test_frames_decode_exactly_as_the_json_module_decodes_them(text: str):
    expected = json.loads(text)
    decoded = decode_frame(text)
    assert decoded == expected
    assert repr(decoded) == repr(expected)  # same types: -0.0 stays a float, 0 an int


def test_floats_decode_exactly_as_the_json_module_decodes_them():
    import random

    rng = random.Random(18)
    numbers = []
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 17)))
        point = rng.randint(0, len(digits))
        number = f"{digits[:point].lstrip('0') or '0'}.{digits[point:] or '0'}"
        if rng.random() < 0.5:
            number += f"e{rng.randint(-330, 310)}"
        numbers.append(("-" if rng.random() < 0.5 else "") + number)
    numbers += [repr(rng.uniform(-1e300, 1e300)) for _ in range(1000)]
    finite = [n for n in numbers if abs(float(n)) != float("inf")]  # json refuses the rest
    assert len(finite) > 3500
    text = '{"f":[' + ",".join(finite) + "]}"
    assert decode_frame(text) == json.loads(text)
    assert orjson.loads(text) == json.loads(text)  # the fast path took this frame


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"a":"x\ty"}', ErrorCode.INVALID_JSON),  # a raw control character
        ('{"a":1}x', ErrorCode.INVALID_JSON),
        ("[" * 5000 + "]" * 5000, ErrorCode.INVALID_JSON),  # deeper than either parser goes
        ("{'a':1}", ErrorCode.INVALID_JSON),
        ('{"a":NaN}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_what_orjson_refuses_gets_the_json_module_answer(text: str, code: ErrorCode):
    with pytest.raises(AetherError) as info:
        decode_frame(text)
    assert info.value.code is code
