"""Frame building: serialization, replies, error frames. Every reply is made here."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, ValidationError

from aetherd.errors import AetherError, ErrorCode
from aetherd.protocol.models import Model, encode, omitted

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
_string = json.encoder.encode_basestring  # C accelerated, keeps UTF-8 as is


def dumps(frame: dict[str, Any]) -> str:
    """Serialize a frame compactly (UTF-8 kept as is; `default=str` for paths and dates)."""
    return _encoder.encode(frame)


class SuccessReply(Model):
    """The reply to a request that succeeded: its `data` is the handler's declared reply."""

    channel: str
    type: str
    request_id: str
    success: Literal[True] = True
    data: Any = None


class ErrorReply(Model):
    """The reply to a request that failed. Some codes add fields (for example `errors`)."""

    model_config = ConfigDict(extra="allow")

    channel: str
    type: str
    request_id: str
    success: Literal[False] = False
    error: str
    code: ErrorCode


class ErrorFrame(Model):
    """An error about a frame that had no `requestId` to reply to."""

    model_config = ConfigDict(extra="allow")

    channel: Literal["error"] = "error"
    type: Literal["error"] = "error"
    code: ErrorCode
    error: str
    ref: dict[str, str] | None = omitted()


def success_reply(channel: str, type_: str, request_id: str, data_json: str) -> str:
    """`{channel, type, requestId, success: true, data}`, with `data` already encoded.

    The bytes equal `encode(SuccessReply(...))` (a test holds them to it); building the
    string directly saves decoding and re-encoding every reply's data.
    """
    return (
        f'{{"channel":{_string(channel)},"type":{_string(type_)},'
        f'"requestId":{_string(request_id)},"success":true,"data":{data_json}}}'
    )


def error_reply(channel: str, type_: str, request_id: str, err: AetherError) -> str:
    """`{channel, type, requestId, success: false, error, code, ...extra}`."""
    return encode(
        ErrorReply(
            channel=channel,
            type=type_,
            request_id=request_id,
            error=err.message,
            code=err.code,
            **err.extra,
        )
    )


def error_frame(err: AetherError, ref: dict[str, str] | None = None) -> str:
    """`{channel: "error", type: "error", code, error, ref}` for frames without a requestId."""
    return encode(ErrorFrame(code=err.code, error=err.message, ref=ref or None, **err.extra))


REF_KEYS = ("channel", "type", "sessionId", "taskId", "processId")


def _sendable(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_ref(raw: dict[str, Any]) -> dict[str, str]:
    """The readable identifying fields of an offending frame (text that can be sent)."""
    return {key: raw[key] for key in REF_KEYS if _sendable(raw.get(key))}


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "frame"


def validation_error(exc: ValidationError) -> AetherError:
    """INVALID_MESSAGE naming the first bad field, e.g. `cols: Input should be ... `."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    field = _loc(first["loc"])
    if first["type"] == "missing":
        message = f"missing field '{field}'"
    else:
        message = f"invalid field '{field}': {first['msg']}"
    return AetherError(ErrorCode.INVALID_MESSAGE, message, field=field)
