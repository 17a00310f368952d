"""Channels: thin handlers that validate a frame, call a service, and return `data`.

The order of CHANNELS is the order of the pushes on connect (PROTOCOL.md section 1):
terminal sessions, then ports, then the agent history.
"""

from aetherd.channels import activity, agent, config, files, ports, process, terminal
from aetherd.protocol import Channel

CHANNELS: list[Channel] = [
    terminal.channel,
    ports.channel,
    agent.channel,
    files.channel,
    config.channel,
    activity.channel,
    process.channel,
]
