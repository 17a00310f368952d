"""The config channel (PROTOCOL.md). Every frame needs a requestId. Handlers arrive with the config issue."""

from aetherd.protocol import Channel

channel = Channel("config", require_request_id=True)
