"""aetherd.client: an asyncio client of the aetherd daemon, with reconnection.

```python
from aetherd.client import Client

async with Client("ws://127.0.0.1:3001/workspaces/local/ws", token) as client:
    term = await client.terminal.create(command="seq 3")
    async for output in term:
        print(output.data, end="")
```

It imports nothing of the daemon's services (no PTY, no inotify code): only aiohttp,
pydantic and the wire models in `aetherd.protocol`. See docs/client.md.
"""

from aetherd.client.core import Client, ClientOptions
from aetherd.client.errors import AetherdError, ConnectionLost
from aetherd.client.stream import Stream
from aetherd.client.target import Target, resolve
from aetherd.client.terminal import Terminal, exit_status

__all__ = [
    "AetherdError",
    "Client",
    "ClientOptions",
    "ConnectionLost",
    "Stream",
    "Target",
    "Terminal",
    "exit_status",
    "resolve",
]
