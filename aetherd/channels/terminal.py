"""The terminal channel (PROTOCOL.md). Handlers arrive with the terminal issue."""

from aetherd.protocol import Channel

channel = Channel("terminal")
