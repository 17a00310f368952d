"""The machine-readable description of the wire protocol, generated from the registry.

`build_document(registry)` walks every channel of `aetherd.channels.CHANNELS` (or any
`Registry`) and returns an AsyncAPI 3.0 document:

- one AsyncAPI channel per wire channel (all at the same address, the workspace
  socket), plus the channel `error` of the error frame;
- for every handler, an operation `<channel>.<type>.request` with `action: receive`
  (the document describes the daemon, which receives requests), the message
  `<channel>.<type>.request` (the whole frame: `channel`, `type`, `requestId`, and the
  handler model's fields, validation mode) and a `reply` naming the success reply
  `<channel>.<type>.reply` (its `data` is the handler's declared `reply=` type,
  serialization mode; `null` when it declares none) and the generic `errorReply`;
- for every push frame (`Channel(pushes=...)`), an operation `<channel>.<type>.push`
  with `action: send` and its message;
- the envelope models of `aetherd.protocol.frames` (`SuccessReply`, `ErrorReply`,
  `ErrorFrame`) and every model they or the messages use, in `components.schemas`.

What AsyncAPI has no field for is carried by `x-` extensions:

- `x-channel`, `x-type`, `x-direction` (`client-to-server` or `server-to-client`)
  on every message and operation;
- `x-request-id` (`required` or `optional`) on requests;
- `x-errors` on requests: the codes a reply may carry, the handler's `errors=` plus the
  generic ones every handler can answer (`INVALID_MESSAGE`, `INTERNAL_ERROR`);
- `x-error-codes` (all codes) and `x-envelope-errors` (the codes the envelope layer
  itself sends) at the top level.

In serialization mode a field is `required` unless it is left out while None
(`omitted()`): the daemon always sends the others, defaults included.

The document is deterministic (keys sorted, lists in a fixed order) so two versions can
be diffed. It is built on first use only (`aetherd schema`, or the first
`GET /workspaces/{id}/protocol.json`) and kept for the life of the process.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from aetherd import __version__
from aetherd.errors import ErrorCode
from aetherd.protocol.dispatch import MAX_REQUEST_ID
from aetherd.protocol.frames import ErrorFrame, ErrorReply, SuccessReply

if TYPE_CHECKING:
    from aetherd.protocol.registry import Channel, Handler, Registry

__all__ = [
    "ENVELOPE_ERRORS",
    "HANDLER_ERRORS",
    "build_document",
    "document_json",
    "protocol_document",
]

ASYNCAPI_VERSION = "3.0.0"
SOCKET_ADDRESS = "/workspaces/{workspaceId}/ws"
REF_TEMPLATE = "#/components/schemas/{model}"
CLIENT_TO_SERVER = "client-to-server"
SERVER_TO_CLIENT = "server-to-client"
ERROR_REPLY = "errorReply"
ERROR_CHANNEL = "error"

# Codes every handler may answer with besides its own `errors=`: a frame that fails
# its model (INVALID_MESSAGE) and an unexpected failure (INTERNAL_ERROR).
HANDLER_ERRORS = (ErrorCode.INVALID_MESSAGE, ErrorCode.INTERNAL_ERROR)
# Codes sent by the envelope layer itself (aetherd/protocol/dispatch.py, the socket
# handler): a reply when the frame's requestId could be read, else an error frame.
ENVELOPE_ERRORS = (
    ErrorCode.INVALID_JSON,
    ErrorCode.INVALID_MESSAGE,
    ErrorCode.UNKNOWN_CHANNEL,
    ErrorCode.UNKNOWN_TYPE,
    ErrorCode.UNSUPPORTED_FRAME,
    ErrorCode.INTERNAL_ERROR,
)


# The envelope, listed in components.schemas whether or not a message refers to it.
ENVELOPE_MODELS = (SuccessReply, ErrorReply, ErrorFrame)


def _reachable(roots: list[Any], schemas: dict[str, Any]) -> set[str]:
    """The names of the component schemas that `roots` refer to, directly or not."""
    found: set[str] = set()
    stack = list(roots)
    prefix = REF_TEMPLATE.format(model="")
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix):
                name = ref[len(prefix) :]
                if name not in found:
                    found.add(name)
                    stack.append(schemas[name])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class WireSchema(GenerateJsonSchema):
    """pydantic's generator, with `required` meaning "always on the wire" when serialising.

    An outgoing model sends every field, defaults included, except those declared with
    `omitted()` (`exclude_if`), which are left out while None.
    """

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization" and field["type"] != "typed-dict-field":
            return field.get("serialization_exclude_if") is None and not field.get(
                "serialization_exclude"
            )
        return super().field_is_required(field, total)


def _ref(*parts: str) -> dict[str, str]:
    path = "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)
    return {"$ref": f"#/{path}"}


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _codes(codes: Any) -> list[str]:
    return sorted({ErrorCode(code).value for code in codes})


def _frame_payload(
    channel: str,
    type_: str,
    model_schema: dict[str, Any],
    envelope: dict[str, Any],
    envelope_required: list[str],
) -> dict[str, Any]:
    """The schema of a whole frame: the envelope's fields, then the model's, flat."""
    properties = {
        "channel": {"const": channel, "type": "string"},
        "type": {"const": type_, "type": "string"},
        **envelope,
    }
    for name, prop in model_schema.get("properties", {}).items():
        if name not in ("channel", "type"):
            properties[name] = prop
    required = ["channel", "type", *envelope_required]
    required += [name for name in model_schema.get("required", []) if name not in required]
    payload: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    for key in ("title", "description", "additionalProperties"):
        if key in model_schema:
            payload[key] = model_schema[key]
    return payload


class _Builder:
    """Collects the JSON schemas of every model in one pass, then lays out the document."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.handlers: list[Handler] = [
            handler
            for channel in registry.channels.values()
            for handler in channel.handlers.values()
        ]

    def _schemas(self) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[str, Any]]:
        inputs: list[tuple[tuple[str, ...], Any, TypeAdapter[Any]]] = []
        for handler in self.handlers:
            key = (handler.channel, handler.type)
            inputs.append((("request", *key), "validation", TypeAdapter(handler.model)))
            if handler.reply is not None:
                inputs.append((("reply", *key), "serialization", TypeAdapter(handler.reply)))
        for channel in self.registry.channels.values():
            for frame in channel.pushes:
                inputs.append(
                    (("push", frame.CHANNEL, frame.TYPE), "serialization", TypeAdapter(frame))
                )
        for model in ENVELOPE_MODELS:
            inputs.append((("envelope", model.__name__), "serialization", TypeAdapter(model)))
        keyed, definitions = TypeAdapter.json_schemas(
            [(key, mode, adapter) for key, mode, adapter in inputs],
            ref_template=REF_TEMPLATE,
            schema_generator=WireSchema,
        )
        defs = definitions.get("$defs", {})
        return {key: schema for (key, _mode), schema in keyed.items()}, defs

    @staticmethod
    def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return dict(defs[ref.rsplit("/", 1)[1]])
        return schema

    def build(self) -> dict[str, Any]:
        keyed, defs = self._schemas()
        schemas: dict[str, Any] = dict(defs)
        schemas["RequestId"] = {
            "description": "Chosen by the client; echoed in the reply.",
            "maxLength": MAX_REQUEST_ID,
            "minLength": 1,
            "title": "RequestId",
            "type": "string",
        }
        messages: dict[str, Any] = {}
        operations: dict[str, Any] = {}
        channels: dict[str, Any] = {}

        def socket_channel(name: str, description: str) -> dict[str, Any]:
            return {
                "address": SOCKET_ADDRESS,
                "description": description,
                "messages": {},
                "parameters": {"workspaceId": _ref("components", "parameters", "workspaceId")},
                "title": name,
                "x-channel": name,
            }

        channel_objects: dict[str, Channel] = dict(self.registry.channels)
        for name in sorted(channel_objects):
            channels[name] = socket_channel(
                name, f'Frames whose `channel` is "{name}", on the workspace socket.'
            )
            channels[name]["messages"][ERROR_REPLY] = _ref("components", "messages", ERROR_REPLY)
        channels[ERROR_CHANNEL] = socket_channel(
            ERROR_CHANNEL, "Error frames: a problem with a frame that had no requestId to reply to."
        )

        for handler in sorted(self.handlers, key=lambda h: (h.channel, h.type)):
            channel = channel_objects[handler.channel]
            required = channel.require_request_id
            base = f"{handler.channel}.{handler.type}"
            request_schema = self._resolve(keyed[("request", handler.channel, handler.type)], defs)
            request = _frame_payload(
                handler.channel,
                handler.type,
                request_schema,
                {"requestId": {"$ref": REF_TEMPLATE.format(model="RequestId")}},
                ["requestId"] if required else [],
            )
            if handler.reply is None:
                data: dict[str, Any] = {"type": "null"}
            else:
                data = keyed[("reply", handler.channel, handler.type)]
            reply = {
                "properties": {
                    "channel": {"const": handler.channel, "type": "string"},
                    "type": {"const": handler.type, "type": "string"},
                    "requestId": {"$ref": REF_TEMPLATE.format(model="RequestId")},
                    "success": {"const": True, "type": "boolean"},
                    "data": data,
                },
                "required": ["channel", "type", "requestId", "success", "data"],
                "title": f"{handler.channel}/{handler.type} reply",
                "type": "object",
            }
            common = {"x-channel": handler.channel, "x-type": handler.type}
            messages[f"{base}.request"] = {
                "contentType": "application/json",
                "correlationId": _ref("components", "correlationIds", "requestId"),
                "name": f"{handler.channel}/{handler.type}",
                "payload": request,
                "summary": _summary(handler.model.__doc__) or f"{handler.channel}/{handler.type}",
                "title": f"{handler.channel}/{handler.type}",
                "x-direction": CLIENT_TO_SERVER,
                **common,
            }
            messages[f"{base}.reply"] = {
                "contentType": "application/json",
                "correlationId": _ref("components", "correlationIds", "requestId"),
                "name": f"{handler.channel}/{handler.type} reply",
                "payload": reply,
                "summary": f"The success reply to {handler.channel}/{handler.type}.",
                "title": f"{handler.channel}/{handler.type} reply",
                "x-direction": SERVER_TO_CLIENT,
                **common,
            }
            for suffix in ("request", "reply"):
                channels[handler.channel]["messages"][f"{base}.{suffix}"] = _ref(
                    "components", "messages", f"{base}.{suffix}"
                )
            operations[f"{base}.request"] = {
                "action": "receive",
                "channel": _ref("channels", handler.channel),
                "messages": [_ref("channels", handler.channel, "messages", f"{base}.request")],
                "reply": {
                    "channel": _ref("channels", handler.channel),
                    "messages": [
                        _ref("channels", handler.channel, "messages", f"{base}.reply"),
                        _ref("channels", handler.channel, "messages", ERROR_REPLY),
                    ],
                },
                "summary": _summary(handler.func.__doc__) or messages[f"{base}.request"]["summary"],
                "title": f"{handler.channel}/{handler.type}",
                "x-concurrent": handler.concurrent,
                "x-direction": CLIENT_TO_SERVER,
                "x-errors": _codes((*handler.errors, *HANDLER_ERRORS)),
                "x-request-id": "required" if required else "optional",
                **common,
            }

        pushes: list[tuple[str, str, dict[str, Any], str]] = []
        for channel in channel_objects.values():
            for frame in channel.pushes:
                schema = self._resolve(keyed[("push", frame.CHANNEL, frame.TYPE)], defs)
                pushes.append((frame.CHANNEL, frame.TYPE, schema, _summary(frame.__doc__)))
        error_frame = self._resolve(keyed[("envelope", "ErrorFrame")], defs)
        pushes.append((ERROR_CHANNEL, ERROR_CHANNEL, error_frame, _summary(ErrorFrame.__doc__)))
        for channel_name, type_, schema, summary in sorted(pushes, key=lambda p: (p[0], p[1])):
            key = f"{channel_name}.{type_}.push"
            if key in messages:
                raise ValueError(f"push frame {channel_name}/{type_} is declared twice")
            common = {"x-channel": channel_name, "x-type": type_}
            messages[key] = {
                "contentType": "application/json",
                "name": f"{channel_name}/{type_}",
                "payload": _frame_payload(channel_name, type_, schema, {}, []),
                "summary": summary or f"{channel_name}/{type_}",
                "title": f"{channel_name}/{type_}",
                "x-direction": SERVER_TO_CLIENT,
                **common,
            }
            channels[channel_name]["messages"][key] = _ref("components", "messages", key)
            operations[key] = {
                "action": "send",
                "channel": _ref("channels", channel_name),
                "messages": [_ref("channels", channel_name, "messages", key)],
                "summary": messages[key]["summary"],
                "title": f"{channel_name}/{type_}",
                "x-direction": SERVER_TO_CLIENT,
                **common,
            }

        messages[ERROR_REPLY] = {
            "contentType": "application/json",
            "correlationId": _ref("components", "correlationIds", "requestId"),
            "name": "error reply",
            "payload": {"$ref": REF_TEMPLATE.format(model="ErrorReply")},
            "summary": _summary(ErrorReply.__doc__),
            "title": "error reply",
            "x-direction": SERVER_TO_CLIENT,
        }

        roots: list[Any] = [messages, *(schemas[m.__name__] for m in ENVELOPE_MODELS)]
        keep = _reachable(roots, schemas) | {m.__name__ for m in ENVELOPE_MODELS}
        schemas = {name: schema for name, schema in schemas.items() if name in keep}

        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": "aetherd workspace protocol",
                "version": __version__,
                "description": (
                    "The WebSocket protocol of the aetherd workspace daemon, generated from "
                    "its channel registry (`aetherd schema`). Every frame is one JSON object "
                    "with `channel` and `type`; a request may carry `requestId`, and its reply "
                    "echoes `channel`, `type` and `requestId` with `success`. The prose "
                    "reference is docs/protocol.md."
                ),
            },
            "defaultContentType": "application/json",
            "servers": {
                "workspace": {
                    "description": "The daemon of one workspace (`aetherd serve`).",
                    "host": "{host}",
                    "protocol": "ws",
                    "security": [
                        _ref("components", "securitySchemes", "token"),
                        _ref("components", "securitySchemes", "bearer"),
                    ],
                    "variables": {
                        "host": {
                            "default": "127.0.0.1:3001",
                            "description": "Address and port (settings `host`, `port`).",
                        }
                    },
                }
            },
            "channels": channels,
            "operations": operations,
            "components": {
                "correlationIds": {
                    "requestId": {
                        "description": "A reply carries the requestId of its request.",
                        "location": "$message.payload#/requestId",
                    }
                },
                "messages": messages,
                "parameters": {
                    "workspaceId": {"description": "The workspace id the daemon serves."}
                },
                "schemas": schemas,
                "securitySchemes": {
                    "bearer": {
                        "description": (
                            "`Authorization: Bearer TOKEN`, or the WebSocket subprotocol "
                            "pair `Bearer, TOKEN` (browsers). A static token or a JWT."
                        ),
                        "scheme": "bearer",
                        "type": "http",
                    },
                    "token": {
                        "description": "The `token` query parameter.",
                        "in": "query",
                        "name": "token",
                        "type": "httpApiKey",
                    },
                },
            },
            "x-envelope-errors": _codes(ENVELOPE_ERRORS),
            "x-error-codes": sorted(code.value for code in ErrorCode),
        }


def build_document(registry: Registry) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every channel in `registry` (a fresh dict)."""
    return _Builder(registry).build()


@functools.lru_cache(maxsize=4)
def document_json(registry: Registry) -> str:
    """`build_document(registry)` as JSON: sorted keys, two-space indent, a final newline.

    Built once per registry and process (the registry does not change once the daemon
    runs); the cache holds the text, which is immutable.
    """
    document = build_document(registry)
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def protocol_document() -> str:
    """The document of the daemon's own channels (`aetherd.channels.CHANNELS`)."""
    return document_json(_default_registry())


@functools.lru_cache(maxsize=1)
def _default_registry() -> Registry:
    from aetherd.channels import CHANNELS
    from aetherd.protocol.registry import Registry

    return Registry(CHANNELS)


if __name__ == "__main__":  # pragma: no cover - `python -m aetherd.protocol.schema`
    print(protocol_document(), end="")
