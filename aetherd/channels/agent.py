"""The agent channel (PROTOCOL.md). Handlers arrive with the agent issue."""

from aetherd.protocol import Channel

channel = Channel("agent")
