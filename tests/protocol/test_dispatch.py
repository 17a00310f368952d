"""Dispatch without a network: a fake peer collects frames (Home Assistant's style)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import Field

from aetherd.daemon import Daemon, Services
from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol import Channel, Hub, Message, Registry, registry
from aetherd.protocol.dispatch import Dispatcher
from aetherd.protocol.models import Model
from aetherd.protocol.registry import Deferred, Wire


class FakePeer:
    """Collects frames in a list, like HA's `send_message = list.append`."""

    def __init__(self) -> None:
        self.id = "peer-1"
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.cleanups: list[Any] = []

    def send(self, frame):
        self.sent.append(json.loads(frame) if isinstance(frame, str) else frame)

    def add_cleanup(self, func):
        self.cleanups.append(func)

    def add_stream(self, stream):
        return lambda: None

    def wake(self):
        pass

    queued_bytes = 0


class Resize(Message):
    session_id: str = Field(min_length=1)
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


def make_dispatcher(make_settings) -> tuple[Dispatcher, FakePeer, dict[str, Any]]:
    seen: dict[str, Any] = {}
    demo = Channel("demo")
    strict = Channel("strict", require_request_id=True)

    @demo.handler("resize", Resize, reply=dict[str, int])
    async def resize(ctx, msg: Resize):
        seen["resize"] = msg
        return {"cols": msg.cols}

    @demo.handler("boom", Message)
    async def boom(ctx, msg):
        raise RuntimeError("secret internals")

    @demo.handler("missing", Message)
    async def missing(ctx, msg):
        raise AetherError(ErrorCode.SESSION_NOT_FOUND, "no such session", sessionId="x")

    @demo.handler("slow", Message, reply=str, concurrent=True)
    async def slow(ctx, msg):
        await asyncio.sleep(0.05)
        return "slow"

    @demo.handler("fast", Message, reply=str)
    async def fast(ctx, msg):
        return "fast"

    class Pair(Model):
        first_name: str
        count: int = Field(ge=0)

    @demo.handler("wire", Message, reply=Pair)
    async def wire(ctx, msg):
        return Wire({"firstName": "é\u2028\x01", "count": 2})

    @demo.handler("miswired", Message, reply=Pair)
    async def miswired(ctx, msg):
        return Wire({"count": 2, "firstName": "x"})  # not the model's field order

    @strict.handler("get", Message, reply=dict[str, bool])
    async def get(ctx, msg):
        return {"ok": True}

    settings = make_settings()
    daemon = Daemon(settings, Services(settings), Hub(), Registry([demo, strict]))
    peer = FakePeer()
    return Dispatcher(daemon, peer), peer, seen


async def test_valid_frame_reaches_handler_with_camelcase_fields(make_settings):
    dispatcher, peer, seen = make_dispatcher(make_settings)
    await dispatcher.handle_text(
        json.dumps(
            {
                "channel": "demo",
                "type": "resize",
                "sessionId": "s",
                "cols": 100,
                "rows": 30,
                "extra": 1,
            }
        )
    )
    assert seen["resize"].session_id == "s" and seen["resize"].cols == 100
    assert peer.sent == []  # no requestId, no reply


async def test_reply_convention(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text(
        json.dumps(
            {
                "channel": "demo",
                "type": "resize",
                "requestId": "r1",
                "sessionId": "s",
                "cols": 100,
                "rows": 30,
            }
        )
    )
    assert peer.sent == [
        {
            "channel": "demo",
            "type": "resize",
            "requestId": "r1",
            "success": True,
            "data": {"cols": 100},
        }
    ]


async def test_invalid_field_is_named(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text(
        json.dumps({"channel": "demo", "type": "resize", "sessionId": "s", "cols": 0, "rows": 30})
    )
    [frame] = peer.sent
    assert frame["channel"] == "error" and frame["code"] == "INVALID_MESSAGE"
    assert frame["field"] == "cols" and "cols" in frame["error"]
    assert frame["ref"] == {"channel": "demo", "type": "resize", "sessionId": "s"}
    peer.sent.clear()
    await dispatcher.handle_text(
        json.dumps({"channel": "demo", "type": "resize", "requestId": "r2", "cols": 5, "rows": 5})
    )
    [reply] = peer.sent
    assert reply["success"] is False and reply["code"] == "INVALID_MESSAGE"
    assert reply["requestId"] == "r2" and "sessionId" in reply["error"]


@pytest.mark.parametrize(
    ("text", "code", "field"),
    [
        ("{not json", "INVALID_JSON", None),
        ("[1, 2]", "INVALID_MESSAGE", None),
        ('{"type": "resize"}', "INVALID_MESSAGE", "channel"),
        ('{"channel": "demo"}', "INVALID_MESSAGE", "type"),
        ('{"channel": 5, "type": "x"}', "INVALID_MESSAGE", "channel"),
        ('{"channel": "demo", "type": "resize", "requestId": 7}', "INVALID_MESSAGE", "requestId"),
        (
            '{"channel": "demo", "type": "resize", "requestId": "' + "x" * 129 + '"}',
            "INVALID_MESSAGE",
            "requestId",
        ),
        ('{"channel": "nope", "type": "x"}', "UNKNOWN_CHANNEL", None),
        ('{"channel": "demo", "type": "nope"}', "UNKNOWN_TYPE", None),
        ('{"channel": "strict", "type": "get"}', "INVALID_MESSAGE", "requestId"),
        ('{"channel": "demo", "type": "missing", "sessionId": "x"}', "SESSION_NOT_FOUND", None),
    ],
)
async def test_error_frames(make_settings, text, code, field):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text(text)
    [frame] = peer.sent
    assert frame["channel"] == "error" and frame["type"] == "error"
    assert frame["code"] == code
    assert isinstance(frame["error"], str) and frame["error"]
    if field:
        assert frame["field"] == field


async def test_unknown_type_error_frame_is_exact(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"demo","type":"foo","sessionId":"s1"}')
    assert peer.sent == [
        {
            "channel": "error",
            "type": "error",
            "code": "UNKNOWN_TYPE",
            "error": "unknown type 'foo' on channel 'demo'",
            "ref": {"channel": "demo", "type": "foo", "sessionId": "s1"},
        }
    ]


@pytest.mark.expect_log(r"handler demo/boom failed.*secret internals")
async def test_unexpected_exception_is_internal_error_without_details(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"demo","type":"boom","requestId":"r"}')
    [reply] = peer.sent
    assert reply["code"] == "INTERNAL_ERROR" and reply["success"] is False
    assert "secret internals" not in reply["error"]


async def test_concurrent_handlers_reply_out_of_order(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"demo","type":"slow","requestId":"a"}')
    await dispatcher.handle_text('{"channel":"demo","type":"fast","requestId":"b"}')
    for _ in range(200):
        if len(peer.sent) == 2:
            break
        await asyncio.sleep(0.01)
    assert [f["requestId"] for f in peer.sent] == ["b", "a"]
    await dispatcher.close()


def test_channel_rejects_duplicate_registration():
    channel = Channel("x")

    @channel.handler("a", Message)
    async def a(ctx, msg):
        return None

    with pytest.raises(ValueError):
        channel.handler("a", Message)(a)
    with pytest.raises(ValueError):
        Registry([channel, Channel("x")])


def deferred_dispatcher(make_settings) -> tuple[Dispatcher, FakePeer, dict[str, Any]]:
    """A channel whose `later` handler records its first step, then defers its reply."""
    state: dict[str, Any] = {"steps": [], "release": asyncio.Event()}
    demo = Channel("later")

    async def finish(fail: bool) -> str:
        await state["release"].wait()
        if fail:
            raise AetherError(ErrorCode.CONFLICT, "deferred failure")
        return "done"

    @demo.handler("start", Message, reply=str)
    async def start(ctx, msg) -> Deferred:
        state["steps"].append("start")  # the in-order first step
        return Deferred(finish(False))

    @demo.handler("fail", Message, reply=str)
    async def fail(ctx, msg) -> Deferred:
        return Deferred(finish(True))

    @demo.handler("next", Message)
    async def next_(ctx, msg) -> None:
        state["steps"].append("next")

    settings = make_settings()
    daemon = Daemon(settings, Services(settings), Hub(), Registry([demo]))
    peer = FakePeer()
    return Dispatcher(daemon, peer), peer, state


async def test_a_deferred_reply_keeps_frame_order_and_comes_later(make_settings):
    dispatcher, peer, state = deferred_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"later","type":"start","requestId":"a"}')
    await dispatcher.handle_text('{"channel":"later","type":"fail","requestId":"f"}')
    await dispatcher.handle_text('{"channel":"later","type":"next","requestId":"b"}')
    # The first step ran before the next frame; the next frame did not wait for the reply.
    assert state["steps"] == ["start", "next"]
    assert [f["requestId"] for f in peer.sent] == ["b"]
    state["release"].set()
    for _ in range(200):
        if len(peer.sent) == 3:
            break
        await asyncio.sleep(0.01)
    replies = {f["requestId"]: f for f in peer.sent}
    assert replies["a"]["success"] is True and replies["a"]["data"] == "done"
    assert replies["f"]["success"] is False and replies["f"]["code"] == "CONFLICT"
    await dispatcher.close()


async def test_a_deferred_reply_is_cancelled_with_the_connection(make_settings):
    dispatcher, peer, state = deferred_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"later","type":"start","requestId":"a"}')
    await dispatcher.close()
    state["release"].set()
    await asyncio.sleep(0.05)
    assert peer.sent == []


async def test_wire_data_is_sent_as_its_model_would_send_it(make_settings):
    dispatcher, peer, _ = make_dispatcher(make_settings)
    raw: list[str] = []
    peer.send = raw.append  # type: ignore[method-assign]
    await dispatcher.handle_text('{"channel":"demo","type":"wire","requestId":"w"}')
    handler = dispatcher.daemon.registry.channel("demo").handlers["wire"]  # type: ignore[union-attr]
    model = handler.reply.model_validate({"firstName": "é\u2028\x01", "count": 2})
    declared = handler.adapter.dump_json(model).decode()  # type: ignore[union-attr]
    prefix = '{"channel":"demo","type":"wire","requestId":"w","success":true,"data":'
    assert raw == [prefix + declared + "}"]


@pytest.mark.expect_log(r"demo/miswired returned data its reply does not declare")
async def test_wire_data_that_differs_from_its_model_is_caught_in_tests(make_settings):
    assert registry.CHECK_WIRE  # tests/conftest.py turns the check on
    dispatcher, peer, _ = make_dispatcher(make_settings)
    await dispatcher.handle_text('{"channel":"demo","type":"miswired","requestId":"m"}')
    [reply] = peer.sent
    assert reply["code"] == "INTERNAL_ERROR" and reply["requestId"] == "m"
