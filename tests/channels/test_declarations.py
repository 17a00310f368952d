"""Every channel declares its frames completely: request models, replies, pushes.

The generated schema (aetherd/protocol/schema.py) reads these declarations, so a
handler without a declared reply, or a push not listed on its channel, would be a
hole in the published protocol.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel

from aetherd.channels import CHANNELS, activity, agent, config, files, ports, terminal
from aetherd.protocol import Empty, Frame, Message, Model
from aetherd.protocol.registry import Deferred, Wire

TYPED = [terminal, files, ports, config, activity, agent]


def _models(tp: Any) -> list[type[BaseModel]]:
    """The model classes named by a reply type (`X`, `list[X]`, `X | None`)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models(arg)]


def _declared(returns: Any) -> Any:
    """What a handler's return annotation says it replies with: `Wire[X]` stands for X
    (X's data in wire form), and a `Deferred` result is that same reply, later."""
    union = typing.get_origin(returns) in (typing.Union, types.UnionType)
    members = typing.get_args(returns) if union else (returns,)
    kept = [
        typing.get_args(m)[0] if typing.get_origin(m) is Wire else m
        for m in members
        if m is not Deferred
    ]
    return kept[0] if len(kept) == 1 and kept[0] is not returns else returns


@pytest.mark.parametrize("module", TYPED, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_requests_replies_and_pushes_come_from_the_channels_protocol_module(
    module: types.ModuleType,
):
    channel = module.channel
    models = importlib.import_module(f"aetherd.protocol.{channel.name}")
    for handler in channel.handlers.values():
        assert handler.model is Empty or (
            issubclass(handler.model, Message) and handler.model.__module__ == models.__name__
        ), f"{channel.name}/{handler.type}: request model {handler.model}"
        for reply in _models(handler.reply):
            assert issubclass(reply, Model) and not issubclass(reply, Frame)
            assert reply.__module__ == models.__name__, f"{channel.name}/{handler.type}"
        returns = _declared(inspect.signature(handler.func, eval_str=True).return_annotation)
        assert returns == handler.reply or (returns is None and handler.reply is None), (
            f"{channel.name}/{handler.type} returns {returns}, declares {handler.reply}"
        )
    declared = {
        obj
        for obj in vars(models).values()
        if isinstance(obj, type)
        and issubclass(obj, Frame)
        and obj.__module__ == models.__name__
        and obj.TYPE  # a frame class without a pinned type is a base, not a push
    }
    assert set(channel.pushes) == declared
    for frame in channel.pushes:
        assert (frame.CHANNEL, frame.model_fields["channel"].default) == (channel.name,) * 2


def test_pushes_are_declared_where_the_protocol_pushes():
    pushes = {c.name: {f.TYPE for f in c.pushes} for c in CHANNELS}
    assert pushes["terminal"] == {"output", "close", "sessions"}
    assert pushes["files"] == {"change", "resync"}
    assert pushes["ports"] == {"open", "close"}
    assert pushes["config"] == {"changed"}
    assert pushes["activity"] == {"resources"}
    assert pushes["agent"] == {
        "status",
        "text",
        "thinking",
        "tool_invocation",
        "permission_request",
        "tool_result",
        "done",
        "plan",
        "history",
        "error",
    }


@pytest.mark.parametrize("module", TYPED, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_no_module_level_mutable_state(module: types.ModuleType):
    """Per-connection state lives in a connection's slot, never in a module global."""
    mutable = {
        name: type(value).__name__
        for name, value in vars(module).items()
        if isinstance(value, (dict, list, set, bytearray)) and not name.startswith("__")
    }
    assert mutable == {}
