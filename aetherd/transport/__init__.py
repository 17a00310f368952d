"""The aiohttp edge: routes, authentication, the WebSocket connection."""
