"""The config channel's frames (docs/protocol.md section 6), in both directions.

Client → server: `get`, `set`, `validate` (every frame needs a `requestId`).
Server → client: the `changed` push; the replies of `get` and `set` (a snapshot) and
of `validate`.

`config` is the workspace config model (`aetherd.config_model.WorkspaceConfig`, the
same model the file is validated with) with its defaults filled in, snake_case keys as
in the file; its JSON Schema is also served at `GET /workspaces/{id}/config/schema`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aetherd.config_model import WorkspaceConfig
from aetherd.protocol.models import Frame, Message, Model

__all__ = [
    "ConfigChanged",
    "ConfigError",
    "ConfigSet",
    "ConfigSnapshot",
    "ConfigValidate",
    "ConfigValidation",
]

CONFIG_DESCRIPTION = "The config in force (the last good one), defaults filled in, snake_case keys"

# -- client → server --------------------------------------------------------------------


class ConfigSet(Message):
    """`set`: exactly one of `raw` (YAML text) or `config` (object); optional `version`."""

    raw: str | None = None
    config: dict[str, Any] | None = None
    version: str | None = None


class ConfigValidate(Message):
    """`validate`: `raw` YAML text (or, as an extension, a `config` object)."""

    raw: str | None = None
    config: dict[str, Any] | None = None


# -- server → client --------------------------------------------------------------------


class ConfigError(Model):
    """One problem of a config: where (keys and list indexes; line and column) and what."""

    loc: list[str | int] = Field(description="Keys and list indexes; [] for the document")
    line: int | None = Field(description="1-based; null when the input was an object")
    column: int | None = Field(description="1-based; null when the input was an object")
    message: str


class ConfigSnapshot(Model):
    """The reply of `get` and of `set`: the config in force and the file on disk."""

    config: WorkspaceConfig = Field(description=CONFIG_DESCRIPTION)
    raw: str = Field(description="The file's text as on disk; empty when there is no file")
    version: str = Field(description="First 32 hex digits of the SHA-256 of the file's bytes")
    path: str = Field(description="The workspace path of the file read")
    valid: bool = Field(description="Whether the file on disk is valid")
    errors: list[ConfigError]
    legacy: bool = Field(description="True when read from .aether/environment.json")


class ConfigValidation(Model):
    """The reply of `validate`; nothing is written."""

    valid: bool
    errors: list[ConfigError]


class ConfigChanged(Frame):
    """`changed`: the file changed (on disk, or by a client's `set`); sent to everyone."""

    channel: Literal["config"] = "config"
    type: Literal["changed"] = "changed"
    config: WorkspaceConfig = Field(description=CONFIG_DESCRIPTION)
    version: str
    valid: bool
    errors: list[ConfigError]
    source: Literal["client", "disk"]
    path: str
