"""The ports channel (PROTOCOL.md). Handlers arrive with the ports issue."""

from aetherd.protocol import Channel

channel = Channel("ports")
