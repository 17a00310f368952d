"""aetherd: the workspace daemon (terminals, files, agent, ports, config over one WebSocket)."""

import time as _time

__version__ = "0.1.0"
# When this process began importing the daemon (a reload's fingerprint trusts only
# files that have not changed since: aetherd.reload.code_fingerprint).
IMPORTED_AT = _time.time()
