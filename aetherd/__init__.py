"""aetherd: the workspace daemon (terminals, files, agent, ports, config over one WebSocket)."""

__version__ = "0.1.0"
