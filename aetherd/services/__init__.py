"""Services: plain asyncio classes with the daemon's real logic. No aiohttp, no frames.

This package holds no container: `aetherd.daemon` builds and owns the services, so
importing one service never imports the others (nor the agent).
"""
