"""The files channel (PROTOCOL.md). Every frame needs a requestId. Handlers arrive with the files issue."""

from aetherd.protocol import Channel

channel = Channel("files", require_request_id=True)
