"""Frame building: serialization, replies, error frames. Every reply is made here."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from aetherd.errors import AetherError, ErrorCode

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def dumps(frame: dict[str, Any]) -> str:
    """Serialize a frame compactly (UTF-8 kept as is; `default=str` for paths and dates)."""
    return _encoder.encode(frame)


def success_reply(channel: str, type_: str, request_id: str, data: Any) -> dict[str, Any]:
    """`{channel, type, requestId, success: true, data}`."""
    return {
        "channel": channel,
        "type": type_,
        "requestId": request_id,
        "success": True,
        "data": data,
    }


def error_reply(channel: str, type_: str, request_id: str, err: AetherError) -> dict[str, Any]:
    """`{channel, type, requestId, success: false, error, code, ...extra}`."""
    frame: dict[str, Any] = {
        "channel": channel,
        "type": type_,
        "requestId": request_id,
        "success": False,
        "error": err.message,
        "code": err.code.value,
    }
    frame.update(err.extra)
    return frame


def error_frame(err: AetherError, ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{channel: "error", type: "error", code, error, ref}` for frames without a requestId."""
    frame: dict[str, Any] = {
        "channel": "error",
        "type": "error",
        "code": err.code.value,
        "error": err.message,
    }
    frame.update(err.extra)
    if ref:
        frame["ref"] = ref
    return frame


REF_KEYS = ("channel", "type", "sessionId", "taskId")


def make_ref(raw: dict[str, Any]) -> dict[str, Any]:
    """The readable identifying fields of an offending frame."""
    return {key: raw[key] for key in REF_KEYS if isinstance(raw.get(key), str)}


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
