"""Channels: thin handlers that validate a frame, call a service, and return `data`.

The order of CHANNELS is the order of the pushes on connect (PROTOCOL.md section 1):
terminal sessions, then ports, then the agent history.

The agent and git channels are `LazyChannel`s: an idle daemon imports neither them nor
the agent runner, the transcript store (sqlite3) or the git service behind them
(docs/performance.md, "Issue 18, second pass"). The agent channel loads at the first
connection (its history push), the git channel at its first frame; both also load for
the schema (`aetherd schema`, `/protocol.json`).
"""

from aetherd.channels import activity, config, files, ports, process, terminal
from aetherd.protocol import Channel
from aetherd.protocol.registry import LazyChannel

CHANNELS: list[Channel] = [
    terminal.channel,
    ports.channel,
    LazyChannel("agent", "aetherd.channels.agent", connect=True),
    files.channel,
    config.channel,
    activity.channel,
    process.channel,
    LazyChannel("git", "aetherd.channels.git"),
]
