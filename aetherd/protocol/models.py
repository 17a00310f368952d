"""The base classes of every wire message, in both directions.

- `Message`: a client→server frame. camelCase on the wire, unknown fields ignored (so
  older and newer clients keep working), frozen once validated.
- `Model`: a server→client object (a reply's `data`, or an item inside a frame).
  camelCase on the wire; a field declared with `omitted()` is left out when it is None.
- `Frame`: a server→client push frame. A subclass pins `channel` and `type` with
  `Literal` defaults, so the model alone says where the frame goes, and the schema
  generator can read both:

      class TerminalClose(Frame):
          channel: Literal["terminal"] = "terminal"
          type: Literal["close"] = "close"
          session_id: str
          exit_code: int | None

`encode(frame)` is the one serialiser of outgoing models. A hot path may build its
JSON by hand (terminal output), but then a test proves its bytes equal `encode` of the
model.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticSerializationError

log = logging.getLogger("aetherd.protocol")


class Message(BaseModel):
    """Base of every client frame model: camelCase on the wire, unknown fields ignored."""

    model_config = ConfigDict(
        extra="ignore",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        defer_build=True,
    )


class Empty(Message):
    """A frame with no fields beyond the envelope."""


def _is_none(value: Any) -> bool:
    return value is None


def omitted(default: Any = None, **kwargs: Any) -> Any:
    """A field that is left out of the wire form while it is None."""
    return Field(default, exclude_if=_is_none, **kwargs)


class Model(BaseModel):
    """Base of every server→client object: camelCase on the wire, serialised by alias."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="forbid",
        defer_build=True,
    )


class Frame(Model):
    """Base of every server→client push frame; subclasses pin `channel` and `type`."""

    channel: str
    type: str

    # Set on subclasses by `__pydantic_init_subclass__` from the Literal defaults.
    CHANNEL: ClassVar[str] = ""
    TYPE: ClassVar[str] = ""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        channel = cls.model_fields["channel"].default
        type_ = cls.model_fields["type"].default
        if isinstance(channel, str) and isinstance(type_, str):
            cls.CHANNEL = channel
            cls.TYPE = type_


def encode(model: BaseModel) -> str:
    """The wire form of an outgoing model: compact JSON, UTF-8 kept as is.

    Text that cannot be encoded (a lone surrogate from an undecodable name) becomes
    `?` rather than failing the frame.
    """
    try:
        return model.model_dump_json()
    except PydanticSerializationError:
        log.warning("frame with unencodable text replaced", extra={"model": type(model).__name__})
        text = json.dumps(model.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "replace").decode("utf-8")
