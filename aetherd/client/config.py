"""The workspace config: get, set, validate, and a stream of changes.

After a reconnect the client asks for the config again and, when its version differs
from the last one it saw, yields a `changed` of its own (`source: "disk"`), so a
change made while the socket was down is not missed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aetherd.client.stream import Stream, Subscribers
from aetherd.protocol.config import ConfigChanged, ConfigSnapshot, ConfigValidation

if TYPE_CHECKING:
    from aetherd.client.core import Client, Frame

__all__ = ["ConfigAPI"]


class ConfigAPI:
    """`client.config`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.version: str | None = None  # the last version seen
        self._subscribers: Subscribers[ConfigChanged] = Subscribers(client.options.stream_limit)
        client.on_push("config", "changed", self._on_changed)
        client.on_restore(self._restore)
        client.on_end(self._subscribers.end)

    async def get(self) -> ConfigSnapshot:
        """The config in force, the file's text, its version and validity."""
        result: ConfigSnapshot = await self.client.request("config", "get", reply=ConfigSnapshot)
        self.version = result.version
        return result

    async def set(
        self,
        raw: str | None = None,
        config: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> ConfigSnapshot:
        """Replace the config (YAML `raw` or a `config` object); `version` guards against
        a concurrent change (`CONFLICT`). Invalid input: `INVALID_CONFIG`, with the
        problems in the error's `frame["errors"]`."""
        result: ConfigSnapshot = await self.client.request(
            "config",
            "set",
            {"raw": raw, "config": config, "version": version},
            reply=ConfigSnapshot,
        )
        self.version = result.version
        return result

    async def validate(self, raw: str) -> ConfigValidation:
        """Check YAML text without writing it."""
        result: ConfigValidation = await self.client.request(
            "config", "validate", {"raw": raw}, reply=ConfigValidation
        )
        return result

    def changes(self) -> Stream[ConfigChanged]:
        """Every change of the config from now on."""
        return self._subscribers.add()

    def _feed(self, event: ConfigChanged) -> None:
        self.version = event.version
        self._subscribers.feed(event)

    def _on_changed(self, frame: Frame) -> None:
        self._feed(ConfigChanged.model_validate(frame, extra="ignore"))

    async def _restore(self, first: bool) -> None:
        if first or not self._subscribers or self.version is None:
            return
        snapshot: ConfigSnapshot = await self.client.request(
            "config", "get", reply=ConfigSnapshot, internal=True
        )
        if snapshot.version != self.version:
            self._feed(
                ConfigChanged(
                    config=snapshot.config,
                    version=snapshot.version,
                    valid=snapshot.valid,
                    errors=snapshot.errors,
                    source="disk",
                    path=snapshot.path,
                )
            )
